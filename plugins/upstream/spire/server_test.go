package spire

import (
	"context"
	"crypto/ecdsa"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/lanyard-dev/lanyard/internal/testkit/fakeagent"
	"github.com/lanyard-dev/lanyard/test/spire/spiretest"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"golang.org/x/time/rate"
)

// These tests run the upstream against a real spire-server, with a sink
// that records what it is handed.

const testNodeID = "spiffe://example.org/node"

// waitEntries waits up to bound for cond on the entries the sink holds,
// keyed by ID (nil before the first set).
func waitEntries(t *testing.T, sink *fakeagent.Sink, bound time.Duration, what string, cond func(map[string]*agent.Entry) bool) {
	t.Helper()
	held := 0
	defer func() {
		if t.Failed() {
			t.Logf("the sink held %d entries", held)
		}
	}()
	sink.WaitFor(t, bound, what, func() bool {
		if sink.EntrySets() == 0 {
			return cond(nil)
		}
		m := sink.EntriesByID()
		held = len(m)
		return cond(m)
	})
}

// running is a Run in progress; done closes when it returns, with err.
type running struct {
	done chan struct{}
	err  error
}

// startUpstream builds the upstream for server s from an agent.conf and
// runs it until the test ends.
func startUpstream(t *testing.T, s *spiretest.Server, token string, sink agent.Sink, syncInterval string, tune ...func(*Spire)) (*Spire, *running) {
	t.Helper()
	dir := t.TempDir()
	bundle := filepath.Join(dir, "bundle.pem")
	if err := os.WriteFile(bundle, s.BundlePEM(t), 0o600); err != nil {
		t.Fatal(err)
	}
	host, port, _ := strings.Cut(s.Addr, ":")
	up, err := build(t, fmt.Sprintf(`agent {
  trust_domain = "example.org"
  data_dir = %q
  server_address = %q
  server_port = %s
  trust_bundle_path = %q
  join_token = %q
  sync_interval = %q
}
plugins {
  NodeAttestor "join_token" { plugin_data {} }
  KeyManager "disk" { plugin_data { directory = %q } }
  WorkloadAttestor "unix" { plugin_data {} }
}`, dir, host, port, bundle, token, syncInterval, dir))
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range tune {
		f(up)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{done: make(chan struct{})}
	go func() {
		r.err = up.Run(ctx, sink)
		close(r.done)
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case <-r.done:
		case <-time.After(30 * time.Second):
			t.Error("Run did not return within 30s of its context ending")
		}
	})
	return up, r
}

// createEntries creates n entries for the node.
func createEntries(t *testing.T, s *spiretest.Server, n int) {
	t.Helper()
	entries := make([]spiretest.Entry, n)
	for i := range entries {
		entries[i] = spiretest.Entry{
			SPIFFEID:  fmt.Sprintf("spiffe://example.org/w/%d", i),
			ParentID:  testNodeID,
			Selectors: []string{fmt.Sprintf("unix:uid:%d", 10000+i)},
		}
	}
	s.CreateEntries(t, entries)
}

// TestManyEntries syncs more entries than the server's page (500), so the
// server sends revisions and the agent asks for entries in pages; then it
// signs more SVIDs than one BatchNewX509SVID call takes.
func TestManyEntries(t *testing.T) {
	s := spiretest.StartServer(t, spiretest.WithCacheReloadInterval(time.Second))
	const n = 1100
	createEntries(t, s, n)
	sink := fakeagent.NewSink()
	start := time.Now()
	up, _ := startUpstream(t, s, s.JoinToken(t, testNodeID), sink, "500ms")
	waitEntries(t, sink, 60*time.Second, fmt.Sprintf("%d entries", n), func(m map[string]*agent.Entry) bool { return len(m) == n })
	t.Logf("attestation and first sync of %d entries: %s", n, time.Since(start).Round(time.Millisecond))

	entries, local := sink.EntriesByID(), sink.LocalBundle()
	// What the Debug API and the broker endpoint read of the agent itself.
	if up.LastSync().Before(start) {
		t.Errorf("LastSync = %v, want after the first sync", up.LastSync())
	}
	self, err := up.GetX509SVID()
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := x509svid.Verify(self.Certificates, x509bundle.FromX509Authorities(td, local.X509Authorities())); err != nil || !strings.HasPrefix(self.ID.Path(), "/spire/agent/join_token/") {
		t.Errorf("agent SVID %s does not verify against the bundle or is not a join_token agent ID: %v", self.ID, err)
	}
	var one *agent.Entry
	reqs := make([]agent.X509Request, 0, 600)
	for _, e := range entries {
		if len(reqs) == 600 {
			break
		}
		key := testkit.NewKey(t)
		reqs = append(reqs, agent.X509Request{Entry: e, Key: key})
		one = e
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	signStart := time.Now()
	results, err := up.MintX509SVIDs(ctx, reqs)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("signed %d X509-SVIDs in %s", len(reqs), time.Since(signStart).Round(time.Millisecond))
	roots := x509bundle.FromX509Authorities(td, local.X509Authorities())
	for i, r := range results {
		if r.Err != nil {
			t.Fatalf("result %d: %v", i, r.Err)
		}
		id, _, err := x509svid.Verify(r.Chain, roots)
		if err != nil || id != reqs[i].Entry.SPIFFEID {
			t.Fatalf("result %d is %v (%v), want an SVID for %s", i, id, err, reqs[i].Entry.SPIFFEID)
		}
		if !reqs[i].Key.Public().(*ecdsa.PublicKey).Equal(r.Chain[0].PublicKey) {
			t.Fatalf("result %d is not for the agent's key", i)
		}
	}

	tok, err := up.MintJWTSVID(ctx, one, []string{"db"})
	if err != nil {
		t.Fatal(err)
	}
	parsed, err := jwt.ParseSigned(tok.Token, []jose.SignatureAlgorithm{jose.ES256, jose.RS256, jose.ES384, jose.PS256})
	if err != nil {
		t.Fatal(err)
	}
	var claims jwt.Claims
	if err := parsed.UnsafeClaimsWithoutVerification(&claims); err != nil || claims.Subject != one.SPIFFEID.String() {
		t.Fatalf("JWT-SVID subject %q (%v), want %s", claims.Subject, err, one.SPIFFEID)
	}

	// Later syncs list revisions only: nothing more is fetched in full.
	fetched := up.syncer.fetched.Load()
	time.Sleep(2 * time.Second) // several sync intervals
	if more := up.syncer.fetched.Load() - fetched; more != 0 {
		t.Fatalf("%d entries were fetched again though none changed", more)
	}
	// An update reaches the sink as a new entry; the others stay the same
	// objects, so the cache keeps their SVIDs without comparing fields.
	s.CLI(t, "entry", "update", "-entryID", one.ID, "-parentID", testNodeID, "-spiffeID", one.SPIFFEID.String(),
		"-selector", one.Selectors[0].String(), "-hint", "updated")
	waitEntries(t, sink, 30*time.Second, "the updated entry", func(m map[string]*agent.Entry) bool {
		return m[one.ID] != nil && m[one.ID].Hint == "updated"
	})
	if more := up.syncer.fetched.Load() - fetched; more != 1 {
		t.Fatalf("%d entries were fetched for one update, want 1", more)
	}
	after := sink.EntriesByID()
	for id, e := range entries {
		if id != one.ID && after[id] != e {
			t.Fatalf("entry %s was replaced though it did not change", id)
		}
	}
	s.DeleteEntry(t, one.ID)
	waitEntries(t, sink, 30*time.Second, "the deleted entry gone", func(m map[string]*agent.Entry) bool {
		return len(m) == n-1 && m[one.ID] == nil
	})
}

// TestEvictedAgentStopsWithAdvice evicts the agent on the server: it must
// attest again, which its spent join token cannot, so Run stops with what
// to do and the stored SVID is dropped.
func TestEvictedAgentStopsWithAdvice(t *testing.T) {
	s := spiretest.StartServer(t)
	sink := fakeagent.NewSink()
	up, run := startUpstream(t, s, s.JoinToken(t, testNodeID), sink, "500ms")
	waitEntries(t, sink, 60*time.Second, "the first sync", func(m map[string]*agent.Entry) bool { return m != nil })
	s.CLI(t, "agent", "evict", "-spiffeID", up.identity.current().id().String())
	select {
	case <-run.done:
		if run.err == nil || !strings.Contains(run.err.Error(), "generate a new token") {
			t.Fatalf("Run returned %v, want advice to use a new join token", run.err)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("Run did not stop within 60s of the eviction")
	}
	if creds, _, _, err := up.identity.store.load(); err != nil || creds != nil {
		t.Fatalf("the stored SVID was kept after the server refused it: %v", err)
	}
}

// TestResyncBudget: syncs on demand share a sync already under way, keep
// their spacing, and stop at the budget, so a flood of callers with no
// identity cannot flood the server.
func TestResyncBudget(t *testing.T) {
	s := spiretest.StartServer(t)
	sink := fakeagent.NewSink()
	const firstSpacing, spacing = 50 * time.Millisecond, 200 * time.Millisecond
	up, _ := startUpstream(t, s, s.JoinToken(t, testNodeID), sink, "1h", func(up *Spire) {
		up.syncer.resync.budget = rate.NewLimiter(rate.Every(time.Hour), 20)
		up.syncer.resync.firstSpacing, up.syncer.resync.spacing = firstSpacing, spacing
	})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	waitEntries(t, sink, time.Minute, "the first sync", func(e map[string]*agent.Entry) bool { return e != nil })
	before := up.syncer.syncs.Load()

	// Twenty callers at once: the sync under way when a caller asks may
	// have missed its entry, so it takes one more, shared by everyone who
	// asked meanwhile. Far fewer syncs than callers, within the budget.
	var wg sync.WaitGroup
	var refused atomic.Int32
	start := make(chan struct{})
	for range 20 {
		wg.Go(func() {
			<-start
			ok, err := up.Resync(ctx)
			if err != nil {
				t.Error(err)
			}
			if !ok {
				refused.Add(1)
			}
		})
	}
	close(start)
	wg.Wait()
	n := up.syncer.syncs.Load() - before
	if n < 1 || n > 3 || refused.Load() > 0 {
		t.Fatalf("20 concurrent callers caused %d syncs and %d refusals; want them to share 1 to 3 syncs, none refused", n, refused.Load())
	}
	t.Logf("20 concurrent callers: %d syncs", n)

	up.syncer.lock.Acquire(context.Background(), 1)
	up.syncer.resync.budget = rate.NewLimiter(rate.Every(time.Hour), 3)
	up.syncer.resync.streak = 0
	up.syncer.lock.Release(1)
	before = up.syncer.syncs.Load()
	// One after another: spaced, until the budget is spent.
	var starts []time.Time
	for up.syncer.syncs.Load()-before < 3 {
		ok, err := up.Resync(ctx)
		if err != nil || !ok {
			t.Fatalf("refused before the budget of 3 was spent (%d syncs): %v", up.syncer.syncs.Load()-before, err)
		}
		starts = append(starts, up.lastSyncStart())
	}
	// Quick at first, then slower while they find nothing new.
	for i := 1; i < len(starts); i++ {
		want := firstSpacing
		if i == len(starts)-1 {
			want = spacing
		}
		if gap := starts[i].Sub(starts[i-1]); gap < want {
			t.Fatalf("syncs on demand %d and %d %s apart, want at least %s", i, i+1, gap, want)
		}
	}
	ok, err := up.Resync(ctx)
	if err != nil || ok {
		t.Fatalf("Resync with the budget spent = %v, %v; want false, nil", ok, err)
	}
	if n := up.syncer.syncs.Load() - before; n != 3 {
		t.Fatalf("%d syncs on demand, want the budget's 3", n)
	}

	// A caller that gives up while waiting for the spacing leaves at once.
	up.syncer.resync.budget.SetBurst(10)
	up.syncer.resync.spacing = time.Hour
	short, cancelShort := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancelShort()
	began := time.Now()
	if ok, err := up.Resync(short); ok || err == nil {
		t.Fatalf("Resync past its caller's deadline = %v, %v; want false and the context's error", ok, err)
	}
	if took := time.Since(began); took > 5*time.Second {
		t.Fatalf("Resync returned %s after its caller's 50ms deadline", took)
	}
}

// lastSyncStart is when the last sync started.
func (s *Spire) lastSyncStart() time.Time {
	s.syncer.lock.Acquire(context.Background(), 1)
	defer s.syncer.lock.Release(1)
	return s.syncer.lastSync
}
