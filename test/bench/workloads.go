package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"encoding/pem"
	"fmt"
	mrand "math/rand/v2"
	"os"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/test/spire/spiretest"

	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
)

const (
	streamOpenBound = 90 * time.Second
	// rotationBound covers spire-agent's and Lanyard's 5 s sync, twice.
	rotationBound = 40 * time.Second
	// streamSettle lets an agent finish the work of opening streams before
	// its RSS is read.
	streamSettle = time.Second
)

func (r *run) streamsWorkload(ctx context.Context) {
	if r.spire != nil && !r.cfg.Quick {
		// Fresh agents, so that what the fetch workloads left in memory
		// does not count here (the quick run saves the restart).
		for _, a := range r.agents {
			a.Stop()
		}
		r.agents = r.startSPIREPair()
	}
	for round := range r.cfg.StreamRounds {
		for j := range r.agents {
			t := r.agents[(round+j)%len(r.agents)]
			r.streamsRound(ctx, t)
		}
	}
	for _, a := range r.agents {
		r.report.Streams[a.Name].finish()
	}
}

func (r *run) streamsRound(ctx context.Context, t Target) {
	tb := r.tb
	m, err := StartMeter(t.Proc)
	if err != nil {
		tb.Fatalf("%s: %v", t.Name, err)
	}
	set, err := OpenStreams(ctx, t.Socket, r.cfg.Streams, streamOpenBound)
	if err != nil {
		tb.Fatalf("%s: opening %d streams: %v", t.Name, r.cfg.Streams, err)
	}
	defer set.Close()
	time.Sleep(streamSettle)
	round := StreamRound{RSS: t.rss(tb)}
	if r.spire != nil {
		// A new X.509 authority in the bundle: every stream must get it.
		t0 := time.Now()
		id := r.spire.PrepareX509Authority(tb)
		times, err := set.WaitBundleChange(ctx, rotationBound)
		if err != nil {
			tb.Fatalf("%s: rotation: %v", t.Name, err)
		}
		slices.SortFunc(times, time.Time.Compare)
		first, last := times[0], times[len(times)-1]
		round.FirstAfter, round.LastAfter, round.Spread = first.Sub(t0), last.Sub(t0), last.Sub(first)
		round.P50, round.P90 = times[len(times)/2].Sub(first), times[len(times)*9/10].Sub(first)
		// The next round prepares another one, once every agent has the
		// bundle as the server has it now, so that the next round's
		// streams do not see this round's change late.
		r.spire.ActivateX509Authority(tb, id)
		r.waitBundles()
	}
	u, err := m.Stop()
	if err != nil {
		tb.Fatalf("%s: %v", t.Name, err)
	}
	round.PeakRSS, round.CPUSeconds = u.PeakRSS, u.CPUSeconds
	st := r.report.Streams[t.Name]
	st.Streams = r.cfg.Streams
	st.Rounds = append(st.Rounds, round)
	msg := fmt.Sprintf("%s: %d streams, RSS %s", t.Name, r.cfg.Streams, mb(round.RSS))
	if r.spire != nil {
		msg += fmt.Sprintf(", rotation reached the first stream after %s, the last after %s (spread %s; half of them within %s, 90%% within %s of the first)",
			ms(round.FirstAfter), ms(round.LastAfter), ms(round.Spread), ms(round.P50), ms(round.P90))
	}
	r.logf("%s", msg)
}

// waitBundles waits until every agent serves the server's current bundle.
func (r *run) waitBundles() {
	tb := r.tb
	want := derOfPEM(tb, r.spire.BundlePEM(tb))
	deadline := time.Now().Add(rotationBound)
	for _, a := range r.agents {
		for {
			x509, _, err := cannedResponses(a.Socket)
			if err == nil && bytes.Equal(x509.Svids[0].Bundle, want) {
				break
			}
			if time.Now().After(deadline) {
				tb.Fatalf("%s did not get the server's bundle within %s (last error %v)", a.Name, rotationBound, err)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
}

// derOfPEM concatenates the DER of the certificates in a PEM bundle, as
// the Workload API sends a bundle.
func derOfPEM(tb testing.TB, b []byte) []byte {
	var der []byte
	for {
		var block *pem.Block
		block, b = pem.Decode(b)
		if block == nil {
			break
		}
		der = append(der, block.Bytes...)
	}
	if len(der) == 0 {
		tb.Fatal("the server's bundle has no certificate")
	}
	return der
}

// UIDs of the workloads of the entries workload; no account has them.
const (
	liveUID0   = 20000  // live workloads, one process each
	newUID0    = 40000  // workloads that connect right after their entry
	absentUID0 = 100000 // entries that match no process
	liveBound  = 120 * time.Second
	probeBound = 40 * time.Second
	syncSettle = 2 * time.Second
	// SPIRE's defaults: how often spire-server reloads the entries it
	// serves agents, and how often spire-agent (and Lanyard) sync.
	spireDefaultCacheReload = 5 * time.Second
	spireAgentSyncInterval  = 5 * time.Second
	probePrefix             = "spiffe://example.org/bench/probe/"
	// probeJitter is the longest random pause before a probe round:
	// SPIRE's sync and cache reload intervals.
	probeJitter = 5 * time.Second
)

func uidEntry(id string, uid int) spiretest.Entry {
	return spiretest.Entry{SPIFFEID: id, ParentID: nodeID, Selectors: []string{"unix:uid:" + strconv.Itoa(uid)}}
}

// createEntries creates entries on the run's server and returns their IDs.
func (r *run) createEntries(entries []spiretest.Entry) []string {
	return r.spire.CreateEntries(r.tb, entries)
}

func (r *run) entriesWorkload(ctx context.Context) {
	tb := r.tb
	cfg := r.cfg
	// Fresh agents, so that what earlier workloads left in memory does
	// not count here.
	for _, a := range r.agents {
		a.Stop()
	}
	r.agents = r.startSPIREPair()
	entryID := func(i int) string { return fmt.Sprintf("spiffe://example.org/bench/entry/%05d", i) }

	// Memory per entry: the agents' RSS before and after they sync the
	// entries that match no process, with no workload connected.
	time.Sleep(syncSettle)
	before := make([]uint64, len(r.agents))
	for i, a := range r.agents {
		before[i] = a.rss(tb)
	}
	absent := make([]spiretest.Entry, 0, cfg.Entries-cfg.Live)
	for i := cfg.Live; i < cfg.Entries; i++ {
		absent = append(absent, uidEntry(entryID(i), absentUID0+i))
	}
	if len(absent) > 0 {
		r.logf("creating %d registration entries for the node that match no process", len(absent))
		r.createEntries(absent)
		time.Sleep(r.entriesSyncWait())
		for i, a := range r.agents {
			es := r.report.Entries[a.Name]
			es.Absent, es.AbsentRSS, es.NoEntriesRSS = len(absent), a.rss(tb), before[i]
			r.logf("%s: RSS %s with no entries, %s with %d (%.0f B per entry)", a.Name, mb(es.NoEntriesRSS), mb(es.AbsentRSS), len(absent), es.PerEntry())
		}
	}

	live := make([]spiretest.Entry, 0, cfg.Live)
	for i := range cfg.Live {
		live = append(live, uidEntry(entryID(i), liveUID0+i))
	}
	r.logf("creating the %d registration entries of live workloads", cfg.Live)
	began := time.Now()
	r.createEntries(live)
	created := time.Now()
	r.logf("created in %s", created.Sub(began).Round(time.Millisecond))

	// One process per live workload, holding a stream on each agent.
	sockets := make([]string, len(r.agents))
	for i, a := range r.agents {
		sockets[i] = a.Socket
	}
	type ready struct {
		agent int
		at    time.Time
	}
	readyc := make(chan ready, cfg.Live*len(sockets))
	errc := make(chan error, cfg.Live)
	for i := range cfg.Live {
		c, err := r.exe.start(roleHolder, holderArgs{Sockets: sockets}, liveUID0+i, liveUID0+i)
		if err != nil {
			tb.Fatal(err)
		}
		tb.Cleanup(c.stop)
		go func() {
			for range sockets {
				line, err := c.line(liveBound)
				if err != nil {
					errc <- fmt.Errorf("live workload uid %d: %w", liveUID0+i, err)
					return
				}
				var a int
				if _, err := fmt.Sscanf(line, "ready %d", &a); err != nil {
					errc <- fmt.Errorf("live workload uid %d said %q", liveUID0+i, line)
					return
				}
				readyc <- ready{agent: a, at: time.Now()}
			}
		}()
	}
	last := make([]time.Time, len(sockets))
	for range cfg.Live * len(sockets) {
		select {
		case rd := <-readyc:
			last[rd.agent] = rd.at
		case err := <-errc:
			tb.Fatal(err)
		}
	}
	time.Sleep(syncSettle)
	for i, a := range r.agents {
		es := r.report.Entries[a.Name]
		es.Entries, es.Live, es.RSS = cfg.Entries, cfg.Live, a.rss(tb)
		es.AllLiveAfter = last[i].Sub(created)
		r.logf("%s: %d entries: all %d live workloads had an SVID %s after their entries were created; RSS %s",
			a.Name, cfg.Entries, cfg.Live, es.AllLiveAfter.Round(time.Millisecond), mb(es.RSS))
	}
	r.probeEntries(ctx, r.report.Entries)
}

// entriesSyncWait is long enough for both agents to have synced entries
// created now: the server's entry cache reload, the agents' 5 s sync
// interval, and a settle.
func (r *run) entriesSyncWait() time.Duration {
	reload := r.cfg.ServerCacheReload
	if reload <= 0 {
		reload = spireDefaultCacheReload
	}
	return reload + spireAgentSyncInterval + syncSettle
}

// freshServerProbe measures entry-to-SVID again against a spire-server
// that reloads its entry cache every cfg.FreshServerReload: at SPIRE's
// default (5 s) the server itself hides a new entry for up to 5 s, from
// any agent; here what is left is the agents' own sync policy.
func (r *run) freshServerProbe(ctx context.Context) {
	for _, a := range r.agents {
		a.Stop()
	}
	r.logf("starting a spire-server that reloads its entry cache every %s, and a fresh pair of agents", r.cfg.FreshServerReload)
	s := spiretest.StartServer(r.tb, spiretest.WithServerLogLevel("INFO"), spiretest.WithCacheReloadInterval(r.cfg.FreshServerReload))
	s.CreateEntry(r.tb, nodeID, workloadID, fmt.Sprintf("unix:uid:%d", os.Getuid()))
	r.spire = s
	r.agents = r.startSPIREPair()
	r.probeEntries(ctx, r.report.FreshProbe)
}

// svidCount is a message of a watched stream: when it came and how many
// SVIDs it held.
type svidCount struct {
	at time.Time
	n  int
}

// watchSVIDs holds a FetchX509SVID stream on socket and sends every
// message's SVID count.
func watchSVIDs(ctx context.Context, socket string) (<-chan svidCount, error) {
	conn, err := Dial(socket)
	if err != nil {
		return nil, err
	}
	stream, err := workload.NewSpiffeWorkloadAPIClient(conn).FetchX509SVID(WithHeader(ctx), &workload.X509SVIDRequest{})
	if err != nil {
		conn.Close()
		return nil, err
	}
	out := make(chan svidCount, 16)
	go func() {
		defer conn.Close()
		defer close(out)
		for {
			resp, err := stream.Recv()
			if err != nil {
				return
			}
			select {
			case out <- svidCount{at: time.Now(), n: len(resp.Svids)}:
			case <-ctx.Done():
				return
			}
		}
	}()
	return out, nil
}

// waitCount waits for a message with n SVIDs.
func waitCount(c <-chan svidCount, n int, bound time.Duration) (time.Time, error) {
	deadline := time.After(bound)
	for {
		select {
		case m, ok := <-c:
			if !ok {
				return time.Time{}, fmt.Errorf("the stream ended")
			}
			if m.n == n {
				return m.at, nil
			}
		case <-deadline:
			return time.Time{}, fmt.Errorf("no message with %d SVIDs within %s", n, bound)
		}
	}
}

// probeEntries measures, per round, the time from `entry create` to the
// SVID on a stream that is already open, and to the first SVID of a
// workload that connects right after its entry was created.
func (r *run) probeEntries(ctx context.Context, stats map[string]*EntriesStats) {
	tb := r.tb
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	watches := make([]<-chan svidCount, len(r.agents))
	for i, a := range r.agents {
		w, err := watchSVIDs(wctx, a.Socket)
		if err != nil {
			tb.Fatalf("%s: %v", a.Name, err)
		}
		if _, err := waitCount(w, 1, probeBound); err != nil {
			tb.Fatalf("%s: probe stream: %v", a.Name, err)
		}
		watches[i] = w
	}
	for p := range r.cfg.ProbeRounds {
		// A random pause, so that rounds meet the agents' and the
		// server's periodic work at different points of their cycles.
		time.Sleep(time.Duration(mrand.Int64N(int64(probeJitter))))
		uid := newUID0 + p
		ids := r.createEntries([]spiretest.Entry{
			uidEntry(fmt.Sprintf("%s%d", probePrefix, p), os.Getuid()),
			uidEntry(fmt.Sprintf("spiffe://example.org/bench/new/%d", p), uid),
		})
		t0 := time.Now()
		kids := make([]*child, len(r.agents))
		for i, a := range r.agents {
			c, err := r.exe.start(roleFirstFetch, firstFetchArgs{Socket: a.Socket}, uid, uid)
			if err != nil {
				tb.Fatal(err)
			}
			tb.Cleanup(c.stop)
			kids[i] = c
		}
		for i, a := range r.agents {
			es := stats[a.Name]
			at, err := waitCount(watches[i], 2, probeBound)
			if err != nil {
				tb.Fatalf("%s: open stream after entry create: %v", a.Name, err)
			}
			es.OpenStream = append(es.OpenStream, at.Sub(t0))
			line, err := kids[i].line(probeBound)
			if err != nil {
				tb.Fatalf("%s: new workload after entry create: %v", a.Name, err)
			}
			var ff FirstFetch
			if err := json.Unmarshal([]byte(line), &ff); err != nil {
				tb.Fatalf("%s: new workload said %q", a.Name, line)
			}
			if ff.Err != "" {
				tb.Fatalf("%s: new workload after entry create: %s", a.Name, ff.Err)
			}
			nw := time.Unix(0, ff.AtUnixNano).Sub(t0)
			es.NewWorkload = append(es.NewWorkload, nw)
			es.NewWorkloadDenied = append(es.NewWorkloadDenied, ff.Denied)
			r.logf("%s: entry create -> SVID on an open stream %s; on a new workload %s (%d PermissionDenied first)",
				a.Name, at.Sub(t0).Round(time.Millisecond), nw.Round(time.Millisecond), ff.Denied)
		}
		for _, id := range ids {
			r.spire.DeleteEntry(tb, id)
		}
		for i, a := range r.agents {
			if _, err := waitCount(watches[i], 1, probeBound); err != nil {
				tb.Fatalf("%s: open stream after entry delete: %v", a.Name, err)
			}
		}
	}
}
