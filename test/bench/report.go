package bench

import (
	"cmp"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"text/tabwriter"
	"time"
)

// Report is everything one run measured. Durations are in nanoseconds in
// the JSON.
type Report struct {
	Started  time.Time `json:"started"`
	Duration string    `json:"duration"`
	Host     Host      `json:"host"`
	Config   struct {
		Quick        bool   `json:"quick"`
		LocalOnly    bool   `json:"local_only"`
		Rounds       int    `json:"rounds"`
		Warmup       string `json:"warmup"`
		Window       string `json:"window"`
		Clients      []int  `json:"clients"`
		Streams      int    `json:"streams"`
		StreamRounds int    `json:"stream_rounds"`
		Entries      int    `json:"entries"`
		Live         int    `json:"live"`
		ProbeRounds  int    `json:"probe_rounds"`
		// ServerCacheReload is spire-server's entry cache reload interval;
		// empty: SPIRE's default (5s).
		ServerCacheReload string `json:"server_cache_reload,omitempty"`
		// FreshServerReload is the entry cache reload interval of the
		// second server of the fresh-server probe; empty: no such probe.
		FreshServerReload string `json:"fresh_server_reload,omitempty"`
		// HAOnly: only the SPIRE-HA section ran.
		HAOnly bool `json:"ha_only,omitempty"`
	} `json:"config"`
	Targets []string `json:"targets"`

	Idle      map[string]uint64        `json:"idle_rss_bytes"`
	IdleSplit map[string]Memory        `json:"idle_memory"`
	Fetch     []*FetchRow              `json:"fetch"`
	Streams   map[string]*StreamStats  `json:"streams"`
	Entries   map[string]*EntriesStats `json:"entries"`
	// FreshProbe is entry-to-SVID against a spire-server whose entry
	// cache is fresh (Config.FreshServerReload).
	FreshProbe map[string]*EntriesStats `json:"fresh_server_probe,omitempty"`
	// K8sBurst is the burst of new workloads on a Kubernetes node.
	K8sBurst map[string]*K8sBurstStats `json:"k8s_burst,omitempty"`
	// HA is the SPIRE-HA section: two servers behind one name.
	HA     *HAStats `json:"ha,omitempty"`
	Checks []Check  `json:"targets_checked"`
}

func newReport(cfg Config) *Report {
	r := &Report{
		Started:    time.Now().UTC(),
		Host:       hostInfo(),
		Idle:       map[string]uint64{},
		IdleSplit:  map[string]Memory{},
		Streams:    map[string]*StreamStats{},
		Entries:    map[string]*EntriesStats{},
		FreshProbe: map[string]*EntriesStats{},
		K8sBurst:   map[string]*K8sBurstStats{},
	}
	c := &r.Config
	c.Quick, c.LocalOnly, c.Rounds = cfg.Quick, cfg.LocalOnly, cfg.Rounds
	c.Warmup, c.Window, c.Clients = cfg.Warmup.String(), cfg.Window.String(), cfg.Clients
	c.Streams, c.StreamRounds = cfg.Streams, cfg.StreamRounds
	c.Entries, c.Live, c.ProbeRounds = cfg.Entries, cfg.Live, cfg.ProbeRounds
	c.HAOnly = cfg.HAOnly
	if cfg.ServerCacheReload > 0 {
		c.ServerCacheReload = cfg.ServerCacheReload.String()
	}
	if cfg.FreshServerReload > 0 && !cfg.LocalOnly {
		c.FreshServerReload = cfg.FreshServerReload.String()
	}
	r.Targets = []string{NameLanyard}
	agents := []string{NameLanyard}
	if !cfg.LocalOnly {
		r.Targets = append(r.Targets, NameSpire)
		agents = append(agents, NameSpire)
	}
	r.Targets = append(r.Targets, NameFloor)
	if cfg.BaselineBin != "" {
		r.Targets = append(r.Targets, NameBaseline)
	}
	for _, a := range agents {
		r.Streams[a] = &StreamStats{}
		if !cfg.LocalOnly {
			r.Entries[a] = &EntriesStats{}
			if cfg.FreshServerReload > 0 {
				r.FreshProbe[a] = &EntriesStats{}
			}
		}
	}
	return r
}

// FetchRow is one fetch workload at one concurrency, for every target.
type FetchRow struct {
	Kind    Kind                   `json:"kind"`
	Clients int                    `json:"clients"`
	Targets map[string]*FetchStats `json:"targets"`

	lat map[string][]time.Duration
}

// FetchStats is one target's figures for a FetchRow, over all rounds.
type FetchStats struct {
	Throughput       float64     `json:"throughput_per_s"` // all rounds' fetches over all rounds' windows
	RoundThroughputs []float64   `json:"round_throughputs_per_s"`
	Latency          Percentiles `json:"latency"`
	Ops              int         `json:"ops"`
	Errors           int         `json:"errors"`
	FirstErr         string      `json:"first_error,omitempty"`
	CPUSeconds       float64     `json:"cpu_seconds"` // the target's, over all rounds' windows
	CPUPerOp         float64     `json:"cpu_us_per_op"`
	PeakRSS          uint64      `json:"peak_rss_bytes"`

	window time.Duration
}

func (r *Report) fetchRow(kind Kind, clients int) *FetchRow {
	row := &FetchRow{Kind: kind, Clients: clients, Targets: map[string]*FetchStats{}, lat: map[string][]time.Duration{}}
	r.Fetch = append(r.Fetch, row)
	return row
}

func (row *FetchRow) add(target string, res *LoadResult, u Usage) {
	s := row.Targets[target]
	if s == nil {
		s = &FetchStats{}
		row.Targets[target] = s
	}
	s.Ops += res.Ops
	s.Errors += res.Errors
	if s.FirstErr == "" {
		s.FirstErr = res.FirstErr
	}
	s.window += res.Window
	s.RoundThroughputs = append(s.RoundThroughputs, res.Throughput())
	s.CPUSeconds += u.CPUSeconds
	s.PeakRSS = max(s.PeakRSS, u.PeakRSS)
	row.lat[target] = append(row.lat[target], res.Latencies...)
}

func (row *FetchRow) finish() {
	for name, s := range row.Targets {
		s.Latency = PercentilesOf(row.lat[name])
		if s.window > 0 {
			s.Throughput = float64(s.Ops) / s.window.Seconds()
		}
		if s.Ops > 0 {
			s.CPUPerOp = s.CPUSeconds / float64(s.Ops) * 1e6
		}
	}
	row.lat = nil
}

// StreamRound is one measurement of open streams on one agent.
type StreamRound struct {
	RSS        uint64        `json:"rss_bytes"` // with every stream open
	PeakRSS    uint64        `json:"peak_rss_bytes"`
	CPUSeconds float64       `json:"cpu_seconds"`
	FirstAfter time.Duration `json:"rotation_first_ns"` // from `localauthority x509 prepare` to the first stream with the new bundle
	LastAfter  time.Duration `json:"rotation_last_ns"`  // ... to the last
	Spread     time.Duration `json:"rotation_spread_ns"`
	P50        time.Duration `json:"rotation_p50_ns"` // after the first stream, half of them had it
	P90        time.Duration `json:"rotation_p90_ns"`
}

// StreamStats is one agent's open-streams figures: the rotation figures
// are medians over rounds.
type StreamStats struct {
	Streams int           `json:"streams"`
	Rounds  []StreamRound `json:"rounds"`
	RSS     uint64        `json:"rss_bytes"` // the least of the rounds
	Spread  time.Duration `json:"rotation_spread_ns"`
	Last    time.Duration `json:"rotation_last_ns"`
}

func (s *StreamStats) finish() {
	if len(s.Rounds) == 0 {
		return
	}
	// The least RSS of the rounds: later rounds on the same agent also
	// hold what the earlier ones left on its heap.
	s.RSS = slices.MinFunc(s.Rounds, func(a, b StreamRound) int { return cmp.Compare(a.RSS, b.RSS) }).RSS
	s.Spread = median(s.Rounds, func(r StreamRound) time.Duration { return r.Spread })
	s.Last = median(s.Rounds, func(r StreamRound) time.Duration { return r.LastAfter })
}

// EntriesStats is one agent's figures with many registration entries.
type EntriesStats struct {
	Entries      int           `json:"entries"`
	Live         int           `json:"live_workloads"`
	RSS          uint64        `json:"rss_bytes"`   // after every live workload had its SVID
	AllLiveAfter time.Duration `json:"all_live_ns"` // from the live workloads' entries' creation until then
	// Absent entries match no process; they are created first, and the
	// agent's RSS is read before and after it syncs them, with no
	// workload connected.
	Absent       int             `json:"absent_entries"`
	NoEntriesRSS uint64          `json:"no_entries_rss_bytes"`
	AbsentRSS    uint64          `json:"absent_entries_rss_bytes"`
	OpenStream   []time.Duration `json:"open_stream_ns"` // entry create -> SVID on an open stream, per round
	NewWorkload  []time.Duration `json:"new_workload_ns"`
	// NewWorkloadDenied counts the PermissionDenied answers the new
	// workload got before its SVID, per round.
	NewWorkloadDenied []int `json:"new_workload_denied"`
}

// PerEntry is the agent's RSS growth per entry that matches no process, in
// bytes: what a node with many entries costs, apart from its workloads.
func (e *EntriesStats) PerEntry() float64 {
	if e.Absent == 0 || e.AbsentRSS < e.NoEntriesRSS {
		return 0
	}
	return float64(e.AbsentRSS-e.NoEntriesRSS) / float64(e.Absent)
}

func median[T any, V uint64 | time.Duration](xs []T, f func(T) V) V {
	vs := make([]V, len(xs))
	for i, x := range xs {
		vs[i] = f(x)
	}
	slices.Sort(vs)
	return vs[len(vs)/2]
}

// WriteFiles writes the report as JSON, its table and its chart into dir,
// named bench-<time>.{json,txt,svg}, and returns the paths.
func (r *Report) WriteFiles(dir string) ([]string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	base := filepath.Join(dir, "bench-"+r.Started.Format("20060102-150405"))
	if r.Config.Quick {
		base += "-quick"
	}
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return nil, err
	}
	var table strings.Builder
	r.WriteTable(&table)
	files := map[string][]byte{
		base + ".json": append(b, '\n'),
		base + ".txt":  []byte(table.String()),
		base + ".svg":  []byte(r.SVG()),
	}
	var paths []string
	for _, ext := range []string{".json", ".txt", ".svg"} {
		p := base + ext
		if err := os.WriteFile(p, files[p], 0o644); err != nil {
			return nil, err
		}
		paths = append(paths, p)
	}
	return paths, nil
}

// WriteTable writes the figures as a table: each figure for every target
// (Lanyard, spire-agent, the floor, and a baseline Lanyard when there is
// one), with Lanyard's ratio to each of the others; then the targets.
func (r *Report) WriteTable(w io.Writer) {
	fmt.Fprintf(w, "Lanyard vs spire-agent %s, %d CPUs, %s, Go %s; %s\n", r.Host.SPIRE, r.Host.CPUs, r.Host.Kernel, r.Host.GoVersion, r.describe())
	if !r.Config.HAOnly {
		r.writeMainTable(w)
	}
	if r.HA != nil {
		r.HA.writeTable(w)
	}
	if len(r.Checks) > 0 {
		fmt.Fprintln(w, "\nTargets:")
		for _, c := range r.Checks {
			mark := "MET   "
			if !c.Met {
				mark = "MISSED"
			}
			fmt.Fprintf(w, "  %s %s: %s\n", mark, c.Name, c.Detail)
		}
	}
}

// writeMainTable writes the figures of the sections on one spire-server.
func (r *Report) writeMainTable(w io.Writer) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	others := slices.DeleteFunc(slices.Clone(r.Targets), func(n string) bool { return n == NameLanyard })
	fmt.Fprint(tw, "figure\t")
	for _, n := range r.Targets {
		fmt.Fprintf(tw, "%s\t", n)
	}
	for _, n := range others {
		fmt.Fprintf(tw, "L/%s\t", shortName(n))
	}
	fmt.Fprint(tw, "\n")
	// line writes one figure; get reports false where a target has none.
	line := func(label, unit string, get func(target string) (float64, bool)) {
		fmt.Fprintf(tw, "%s\t", label)
		for _, n := range r.Targets {
			if v, ok := get(n); ok {
				fmt.Fprintf(tw, "%s\t", num(v, unit))
			} else {
				fmt.Fprint(tw, "\t")
			}
		}
		l, lok := get(NameLanyard)
		for _, n := range others {
			if v, ok := get(n); ok && lok {
				fmt.Fprintf(tw, "%s\t", ratio(l, v))
			} else {
				fmt.Fprint(tw, "\t")
			}
		}
		fmt.Fprint(tw, "\n")
	}
	mb := func(b uint64) (float64, bool) { return float64(b) / 1e6, b > 0 }
	line("idle RSS (MB)", "MB", func(n string) (float64, bool) { return mb(r.Idle[n]) })
	for _, row := range r.Fetch {
		p := fmt.Sprintf("%s c=%d", row.Kind, row.Clients)
		stat := func(f func(*FetchStats) float64) func(string) (float64, bool) {
			return ofTarget(row.Targets, func(s *FetchStats) bool { return s.Ops > 0 }, f)
		}
		line(p+" fetches/s", "/s", stat(func(s *FetchStats) float64 { return s.Throughput }))
		line(p+" p50 (ms)", "ms", stat(func(s *FetchStats) float64 { return msf(s.Latency.P50) }))
		line(p+" p90 (ms)", "ms", stat(func(s *FetchStats) float64 { return msf(s.Latency.P90) }))
		line(p+" p99 (ms)", "ms", stat(func(s *FetchStats) float64 { return msf(s.Latency.P99) }))
		line(p+" CPU (µs/fetch)", "µs", stat(func(s *FetchStats) float64 { return s.CPUPerOp }))
		line(p+" CPU (s)", "s", stat(func(s *FetchStats) float64 { return s.CPUSeconds }))
		line(p+" peak RSS (MB)", "MB", stat(func(s *FetchStats) float64 { return float64(s.PeakRSS) / 1e6 }))
		errs := 0
		for _, s := range row.Targets {
			errs += s.Errors
		}
		if errs > 0 {
			line(p+" errors", "", stat(func(s *FetchStats) float64 { return float64(s.Errors) }))
		}
	}
	if ls := r.Streams[NameLanyard]; ls != nil && len(ls.Rounds) > 0 {
		p := fmt.Sprintf("%d open streams", ls.Streams)
		streams := func(f func(*StreamStats) float64) func(string) (float64, bool) {
			return ofTarget(r.Streams, func(s *StreamStats) bool { return len(s.Rounds) > 0 }, f)
		}
		line(p+": RSS (MB)", "MB", streams(func(s *StreamStats) float64 { return float64(s.RSS) / 1e6 }))
		if ls.Rounds[0].LastAfter > 0 {
			line(p+": rotation spread (ms)", "ms", streams(func(s *StreamStats) float64 { return msf(s.Spread) }))
			line(p+": rotation to last (s)", "s", streams(func(s *StreamStats) float64 { return s.Last.Seconds() }))
		}
	}
	if le := r.Entries[NameLanyard]; le != nil && le.Entries > 0 {
		p := fmt.Sprintf("%d entries", le.Entries)
		entries := func(f func(*EntriesStats) float64) func(string) (float64, bool) {
			return ofTarget(r.Entries, func(e *EntriesStats) bool { return e.Entries > 0 }, f)
		}
		line(p+": RSS (MB)", "MB", entries(func(e *EntriesStats) float64 { return float64(e.RSS) / 1e6 }))
		line(p+": RSS per entry, no workload (B)", "B", entries(func(e *EntriesStats) float64 { return e.PerEntry() }))
		line(p+": all live SVIDs after (s)", "s", entries(func(e *EntriesStats) float64 { return e.AllLiveAfter.Seconds() }))
		line(p+": create->open stream max (s)", "s", entries(func(e *EntriesStats) float64 { return maxDur(e.OpenStream).Seconds() }))
		line(p+": create->new workload max (s)", "s", entries(func(e *EntriesStats) float64 { return maxDur(e.NewWorkload).Seconds() }))
	}
	if lf := r.FreshProbe[NameLanyard]; lf != nil && len(lf.NewWorkload) > 0 {
		p := "fresh server (" + r.Config.FreshServerReload + " cache)"
		probe := func(f func(*EntriesStats) float64) func(string) (float64, bool) {
			return ofTarget(r.FreshProbe, func(e *EntriesStats) bool { return len(e.NewWorkload) > 0 }, f)
		}
		line(p+": create->open stream max (s)", "s", probe(func(e *EntriesStats) float64 { return maxDur(e.OpenStream).Seconds() }))
		line(p+": create->new workload max (s)", "s", probe(func(e *EntriesStats) float64 { return maxDur(e.NewWorkload).Seconds() }))
	}
	if lk := r.K8sBurst[NameLanyard]; lk != nil {
		p := fmt.Sprintf("k8s burst of %d, %d pods", lk.Workloads, lk.Pods)
		burst := func(f func(*K8sBurstStats) float64) func(string) (float64, bool) {
			return ofTarget(r.K8sBurst, func(*K8sBurstStats) bool { return true }, f)
		}
		line(p+": kubelet requests", "", burst(func(s *K8sBurstStats) float64 { return float64(s.KubeletRequests) }))
		line(p+": kubelet MB read", "MB", burst(func(s *K8sBurstStats) float64 { return float64(s.KubeletBytes) / 1e6 }))
		line(p+": peak RSS growth (MB)", "MB", burst(func(s *K8sBurstStats) float64 { return float64(s.PeakGrowth()) / 1e6 }))
		line(p+": time to SVID p50 (ms)", "ms", burst(func(s *K8sBurstStats) float64 { return msf(s.TimeToSVID.P50) }))
		line(p+": time to SVID p99 (ms)", "ms", burst(func(s *K8sBurstStats) float64 { return msf(s.TimeToSVID.P99) }))
	}
	tw.Flush()
}

func shortName(target string) string {
	switch target {
	case NameSpire:
		return "S"
	case NameBaseline:
		return "base"
	}
	return target
}

func (r *Report) describe() string {
	c := r.Config
	mode := "full"
	if c.Quick {
		mode = "quick"
	}
	if c.HAOnly {
		return fmt.Sprintf("%s run of the SPIRE-HA section only, took %s", mode, r.Duration)
	}
	d := fmt.Sprintf("%s run: %d round(s) of %s (after %s warm-up) per target and workload, took %s", mode, c.Rounds, c.Window, c.Warmup, r.Duration)
	if c.ServerCacheReload != "" {
		d += "; spire-server cache_reload_interval " + c.ServerCacheReload
	}
	return d
}

func msf(d time.Duration) float64 { return float64(d) / 1e6 }

func maxDur(ds []time.Duration) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	return slices.Max(ds)
}

func num(v float64, unit string) string {
	switch {
	case unit == "/s" || v >= 100:
		return fmt.Sprintf("%.0f", v)
	case v >= 10:
		return fmt.Sprintf("%.1f", v)
	default:
		return fmt.Sprintf("%.3g", v)
	}
}

func ratio(a, b float64) string {
	if b == 0 {
		return "-"
	}
	return fmt.Sprintf("%.2fx", a/b)
}

// ofTarget makes a report line's value for a target: f of its stats, or
// nothing where it has none or has says they measured nothing.
func ofTarget[S any](stats map[string]*S, has func(*S) bool, f func(*S) float64) func(string) (float64, bool) {
	return func(n string) (float64, bool) {
		s := stats[n]
		if s == nil || !has(s) {
			return 0, false
		}
		return f(s), true
	}
}
