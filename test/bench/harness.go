// Package bench measures Lanyard against spire-agent: one spire-server,
// Lanyard and spire-agent each attested to it with a join token and
// serving the same entries on their own socket, and a floor server (the
// least a Workload API server can do), all driven by the same load
// generator in alternating rounds on one machine, so that the ratios hold
// on a noisy machine; then (ha.go) both kinds of agent on two spire-servers
// that share a PostgreSQL database behind one name. cmd/lanyard-bench is
// the program; `make bench` runs it.
package bench

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/test/spire/spiretest"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"
)

const (
	// nodeID is the node alias both agents attest as, so that the same
	// registration entries are authorized for both.
	nodeID     = "spiffe://example.org/bench/node"
	workloadID = "spiffe://example.org/bench/workload"
	// SPIREVersion is the spire-server and spire-agent measured.
	SPIREVersion = "1.13.3"
)

// Config is what one run measures and how long it takes.
type Config struct {
	LanyardBin string // the lanyard binary to run
	// BaselineBin, when set, is another lanyard binary measured beside
	// LanyardBin on the fetch workloads, on its embedded CA.
	BaselineBin string
	Log         io.Writer // progress
	// LocalOnly runs Lanyard on its embedded CA and the floor only, with
	// no SPIRE (for a smoke test of the harness where SPIRE is not built).
	LocalOnly bool
	Quick     bool

	Rounds  int           // alternating rounds of each fetch workload
	Warmup  time.Duration // not counted, at the start of each round
	Window  time.Duration // counted, after the warm-up
	Clients []int         // concurrencies of each fetch workload
	Kinds   []Kind

	Streams      int // open FetchX509SVID streams held
	StreamRounds int // rotations measured per agent

	Entries     int // registration entries for the node
	Live        int // of which match a live workload
	ProbeRounds int // entry-to-SVID measurements

	// ServerCacheReload, when set, is spire-server's
	// experimental.cache_reload_interval: how often it reloads the entries
	// it serves to agents (SPIRE's default is 5 s). A new entry reaches no
	// agent sooner.
	ServerCacheReload time.Duration
	// FreshServerReload, when set, adds a probe of entry-to-SVID against a
	// second spire-server that reloads its entry cache this often, so that
	// the agents' own sync policy is all that is measured (0 skips it).
	FreshServerReload time.Duration

	// K8sBurst workloads attest at once with the k8s workload attestor, on
	// a node whose kubelet lists K8sPods pods (0 skips it).
	K8sBurst, K8sPods int

	// The SPIRE-HA section (ha.go): HAAgents agents of each kind on two
	// spire-servers behind one name, then HAFailoverRounds kills of the
	// server in use (0 and 0 skip it). HAOnly runs nothing else.
	HAAgents, HAFailoverRounds int
	HAOnly                     bool
}

// DefaultConfig is the full run, or the -quick one.
func DefaultConfig(quick bool) Config {
	c := Config{
		Log:          os.Stderr,
		Quick:        quick,
		Rounds:       3,
		Warmup:       time.Second,
		Window:       4 * time.Second,
		Clients:      []int{1, 16, 64},
		Kinds:        Kinds,
		Streams:      1000,
		StreamRounds: 3,
		Entries:      10000,
		Live:         100,
		ProbeRounds:  3,
		K8sBurst:     100,
		K8sPods:      500,

		HAAgents:         50,
		HAFailoverRounds: 5,

		FreshServerReload: 100 * time.Millisecond,
	}
	if quick {
		c.Rounds, c.Warmup, c.Window = 1, 300*time.Millisecond, time.Second
		c.StreamRounds = 1
		c.Entries, c.Live, c.ProbeRounds = 2000, 20, 1
		c.K8sBurst, c.K8sPods = 20, 100
		c.HAAgents, c.HAFailoverRounds = 10, 2
	}
	return c
}

// run is one benchmark run's state.
type run struct {
	tb      testing.TB
	cfg     Config
	exe     *exe
	spire   *spiretest.Server
	targets []Target // lanyard, spire-agent (unless LocalOnly), floor
	agents  []Target // lanyard, spire-agent
	report  *Report
}

func (r *run) logf(format string, args ...any) {
	fmt.Fprintf(r.cfg.Log, "%s  %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(format, args...))
}

// Run runs the benchmark. Errors and failures go through tb (a test, or a
// spiretest.Program).
func Run(tb testing.TB, cfg Config) *Report {
	tb.Helper()
	if cfg.Log == nil {
		cfg.Log = io.Discard
	}
	r := &run{tb: tb, cfg: cfg, report: newReport(cfg)}
	var err error
	if r.exe, err = newExe(tb.TempDir()); err != nil {
		tb.Fatalf("copying the harness for child processes: %v", err)
	}
	ctx := context.Background()
	start := time.Now()
	if !cfg.HAOnly {
		r.mainSections(ctx)
	}
	if (cfg.HAAgents > 0 || cfg.HAFailoverRounds > 0) && !cfg.LocalOnly {
		r.report.HA = newHAStats()
		r.haSection()
	}
	r.report.Duration = time.Since(start).Round(time.Second).String()
	r.report.check()
	return r.report
}

// mainSections measures the agents on one spire-server (or Lanyard on its
// embedded CA) against the floor.
func (r *run) mainSections(ctx context.Context) {
	tb, cfg := r.tb, r.cfg
	r.startAgents()
	r.startFloor()
	if cfg.BaselineBin != "" {
		r.logf("starting the baseline lanyard on its embedded CA")
		b := startLanyard(tb, cfg.BaselineBin, nil, "")
		b.Name = NameBaseline
		r.targets = append(r.targets, b)
	}
	r.measureIdle()
	for _, kind := range cfg.Kinds {
		for _, c := range cfg.Clients {
			r.fetchWorkload(ctx, kind, c)
		}
	}
	if cfg.Streams > 0 {
		r.streamsWorkload(ctx)
	}
	if cfg.Entries > 0 && r.spire != nil {
		r.entriesWorkload(ctx)
	}
	if cfg.FreshServerReload > 0 && cfg.ProbeRounds > 0 && r.spire != nil {
		r.freshServerProbe(ctx)
	}
	if cfg.K8sBurst > 0 && r.spire != nil {
		r.k8sBurstWorkload()
	}
}

func (r *run) startAgents() {
	tb := r.tb
	if r.cfg.LocalOnly {
		r.logf("starting lanyard on its embedded CA")
		l := startLanyard(tb, r.cfg.LanyardBin, nil, "")
		r.agents = []Target{l}
		r.targets = []Target{l}
		return
	}
	r.logf("starting spire-server %s", SPIREVersion)
	opts := []spiretest.ServerOption{spiretest.WithServerLogLevel("INFO")}
	if r.cfg.ServerCacheReload > 0 {
		opts = append(opts, spiretest.WithCacheReloadInterval(r.cfg.ServerCacheReload))
	}
	s := spiretest.StartServer(tb, opts...)
	r.spire = s
	s.CreateEntry(tb, nodeID, workloadID, fmt.Sprintf("unix:uid:%d", os.Getuid()))
	r.agents = r.startSPIREPair()
	r.targets = append([]Target(nil), r.agents...)
}

// startSPIREPair starts Lanyard and spire-agent against the server, each
// attested with a join token of its own for the same node alias, so that
// both serve the same entries.
func (r *run) startSPIREPair() []Target {
	tb, s := r.tb, r.spire
	r.logf("starting spire-agent and lanyard, each attested with a join token")
	sa := startSPIREAgent(tb, s, s.JoinToken(tb, nodeID))
	l := startLanyard(tb, r.cfg.LanyardBin, s, s.JoinToken(tb, nodeID))
	return []Target{l, sa}
}

// startFloor runs the floor in a child process, answering what Lanyard
// answers.
func (r *run) startFloor() {
	tb := r.tb
	x509, jwt, err := cannedResponses(r.agents[0].Socket)
	if err != nil {
		tb.Fatalf("fetching the answers for the floor to serve: %v", err)
	}
	xb, err := proto.Marshal(x509)
	if err != nil {
		tb.Fatal(err)
	}
	jb, err := proto.Marshal(jwt)
	if err != nil {
		tb.Fatal(err)
	}
	socket := filepath.Join(tb.TempDir(), "floor.sock")
	c, err := r.exe.start(roleFloor, floorArgs{Socket: socket, X509: xb, JWT: jb}, -1, -1)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(c.stop)
	if line, err := c.line(15 * time.Second); err != nil || line != "ready" {
		tb.Fatalf("the floor did not start: %q %v", line, err)
	}
	r.targets = append(r.targets, Target{Name: NameFloor, Socket: socket, Proc: Proc{PID: c.cmd.Process.Pid}})
}

// idleSettle lets an agent finish start-up work before its idle RSS is
// read.
const idleSettle = 2 * time.Second

func (r *run) measureIdle() {
	time.Sleep(idleSettle)
	for _, t := range r.targets {
		rss := t.rss(r.tb)
		r.report.Idle[t.Name] = rss
		msg := fmt.Sprintf("idle RSS %-12s %s", t.Name, mb(rss))
		if m, err := t.Proc.Memory(); err == nil {
			r.report.IdleSplit[t.Name] = m
			msg += fmt.Sprintf(" (anonymous %s, file-backed %s)", mb(m.Anon), mb(m.File))
		}
		r.logf("%s", msg)
	}
}

// roundPause lets closed connections drain between rounds.
const roundPause = 200 * time.Millisecond

func (r *run) fetchWorkload(ctx context.Context, kind Kind, clients int) {
	row := r.report.fetchRow(kind, clients)
	for round := range r.cfg.Rounds {
		// Rotate the order every round, so that no target always runs
		// right after the same one.
		n := len(r.targets)
		for j := range n {
			t := r.targets[(round+j)%n]
			var m *Meter
			var u Usage
			var merr error
			res, err := Load(ctx, t.Socket, kind, clients, r.cfg.Warmup, r.cfg.Window, func(open bool) {
				if open {
					m, merr = StartMeter(t.Proc)
				} else if merr == nil {
					u, merr = m.Stop()
				}
			})
			if err != nil {
				r.tb.Fatalf("%s %s c=%d: %v", t.Name, kind, clients, err)
			}
			if merr != nil {
				r.tb.Fatalf("%s: %v", t.Name, merr)
			}
			row.add(t.Name, res, u)
			time.Sleep(roundPause)
		}
	}
	row.finish()
	var b strings.Builder
	for _, t := range r.targets {
		s := row.Targets[t.Name]
		fmt.Fprintf(&b, "  %s %.0f/s p50 %s p99 %s", t.Name, s.Throughput, ms(s.Latency.P50), ms(s.Latency.P99))
	}
	r.logf("%s c=%d:%s", kind, clients, b.String())
}

// Host describes the machine.
type Host struct {
	CPUs      int    `json:"cpus"`
	Kernel    string `json:"kernel"`
	GoVersion string `json:"go_version"`
	SPIRE     string `json:"spire_version"`
}

func hostInfo() Host {
	h := Host{CPUs: runtime.NumCPU(), GoVersion: runtime.Version(), SPIRE: SPIREVersion}
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		h.Kernel = unix.ByteSliceToString(u.Release[:])
	}
	return h
}

func mb(b uint64) string { return fmt.Sprintf("%.1f MB", float64(b)/1e6) }

func ms(d time.Duration) string { return fmt.Sprintf("%.2fms", float64(d)/1e6) }
