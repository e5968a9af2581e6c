package agent

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testkit"
)

func TestRotationRenewsShortLivedSVID(t *testing.T) {
	c, up := newTestCache(t)
	signedAt := recordSigningTimes(up)
	e := entryA()
	e.X509SVIDTTL = 2 * time.Second
	_, first := fetchFirst(t, c, up, e)
	s := c.Subscribe()
	defer s.Close()
	startRotation(t, c)
	deadline := time.After(15 * time.Second)
	for c.svidOf("a") == first {
		select {
		case <-s.C:
		case <-deadline:
			t.Fatal("the SVID was not renewed")
		}
	}
	renewed := c.svidOf("a")
	// Certificate times have one-second resolution: with a 2s TTL renewed
	// after about 1s, both may end in the same second. When each was signed
	// tells when each ends.
	renewedAt, firstAt := signedAt(renewed), signedAt(first)
	if !renewedAt.After(firstAt) {
		t.Errorf("renewed SVID signed at %v, not after the old at %v: it ends no later", renewedAt, firstAt)
	}
	if renewedAt.Before(first.RenewAt) {
		t.Errorf("renewed at %v, before the old SVID's renewal time %v", renewedAt, first.RenewAt)
	}
	if renewed.Key == first.Key {
		t.Error("renewal reused the private key")
	}
	checkSVID(t, renewed, e, up.bundle())
	snap, err := c.X509Identities(t.Context(), e.Selectors)
	if err != nil || snap.SVIDs[0] != renewed {
		t.Errorf("X509Identities after renewal = %v, %v; want the renewed SVID", snap, err)
	}
}

// recordSigningTimes has up note when it signs each X509-SVID (finer than
// certificate times) and returns the lookup by SVID; call it before up signs,
// for tests whose signings do not overlap.
func recordSigningTimes(up *testUpstream) func(*X509SVID) time.Time {
	var mu sync.Mutex
	var now time.Time
	signed := map[string]time.Time{}
	up.set(func(u *testUpstream) {
		u.now = func() time.Time {
			mu.Lock()
			defer mu.Unlock()
			now = time.Now()
			return now
		}
		u.hook = func(out []X509Result) []X509Result {
			mu.Lock()
			defer mu.Unlock()
			for _, r := range out {
				if r.Err == nil {
					signed[r.Chain[0].SerialNumber.String()] = now
				}
			}
			return out
		}
	})
	return func(s *X509SVID) time.Time {
		mu.Lock()
		defer mu.Unlock()
		return signed[s.Chain[0].SerialNumber.String()]
	}
}

func TestFailedRenewalKeepsOldSVID(t *testing.T) {
	c, up, clock := newClockedCache(t)
	e := entryA()
	_, first := fetchFirst(t, c, up, e)
	up.SetFail(errors.New("upstream down"))
	clock.Set(first.RenewAt.Add(time.Second))

	startRotation(t, c)
	testkit.WaitFor(t, waitLimit, "a renewal attempt", func() bool { return up.x509Calls.Load() >= 2 })
	if c.svidOf("a") != first {
		t.Fatal("a failed renewal dropped the SVID")
	}
	snap, err := c.X509Identities(t.Context(), e.Selectors)
	if err != nil || snap.SVIDs[0] != first {
		t.Fatalf("X509Identities during failed renewals = %v, want the old SVID", err)
	}
	// It retries, and succeeds once the upstream is back.
	up.SetFail(nil)
	testkit.WaitFor(t, waitLimit, "a retried renewal", func() bool { return c.svidOf("a") != first })
	if got := c.svidOf("a"); !got.NotAfter.After(first.NotAfter) {
		t.Error("the retried renewal did not extend the SVID")
	}
}

func TestNewCARenewsAtOnce(t *testing.T) {
	c, up := newTestCache(t)
	e := entryA()
	_, first := fetchFirst(t, c, up, e)
	renewAt := first.RenewAt
	oldCA := up.ca

	startRotation(t, c)

	// A bundle that still holds the old CA keeps the SVID.
	newCA := newTestCA(t, testTD)
	both := up.bundle()
	both.AddX509Authority(newCA.Cert)
	c.SetBundles(both, nil)
	kept := c.svidOf("a") == first && first.RenewAt.Equal(renewAt) && !first.replace.Load()
	if !kept {
		t.Error("adding a CA to the bundle scheduled a renewal of SVIDs that still chain")
	}

	up.set(func(u *testUpstream) { u.ca = newCA })
	c.SetBundles(up.bundle(), nil)
	testkit.WaitFor(t, waitLimit, "renewal under the new CA", func() bool { return c.svidOf("a") != first })
	renewed := c.svidOf("a")
	if err := renewed.Chain[0].CheckSignatureFrom(newCA.Cert); err != nil {
		t.Errorf("the renewed SVID is not signed by the new CA: %v", err)
	}
	if renewed.Chain[0].CheckSignatureFrom(oldCA.Cert) == nil {
		t.Error("the renewed SVID is still signed by the old CA")
	}
	checkSVID(t, renewed, e, up.bundle())
}

// TestUnfetchedSVIDIsNotRenewed: an SVID no workload fetched since it was
// signed (its workload is gone) is not renewed, is served while it lasts,
// and is dropped when it expires or must be replaced; a workload that asks
// for it again gets it renewed.
func TestUnfetchedSVIDIsNotRenewed(t *testing.T) {
	c, up, clock := newClockedCache(t)
	sels, first := fetchFirst(t, c, up, entryA())
	startRotation(t, c)
	advance := func(to time.Time) {
		clock.Set(to)
		c.kickRenewal()
	}

	// Fetched: renewed at its renewal time.
	second := renewedOnce(t, c, clock, first)
	calls := up.x509Calls.Load()

	// Not fetched since: its renewal time passes and it is kept, not renewed.
	advance(second.RenewAt.Add(time.Second))
	for range 20 {
		c.kickRenewal()
		time.Sleep(5 * time.Millisecond)
	}
	if c.svidOf("a") != second || up.x509Calls.Load() != calls {
		t.Fatal("an SVID no workload fetched was renewed")
	}
	// Fetched again past its renewal time: re-signed before it is handed
	// out, so the workload gets as much lifetime as from a renewed one.
	snap, err := c.X509Identities(t.Context(), sels)
	if err != nil || snap.SVIDs[0] == second || !snap.SVIDs[0].NotAfter.After(second.NotAfter) {
		t.Fatalf("fetch of the unrenewed SVID = %v, %v; want a fresh one", snap, err)
	}
	if c.svidOf("a") != snap.SVIDs[0] || up.x509Calls.Load() != calls+1 {
		t.Fatalf("the fresh SVID was not kept, or took %d signing calls", up.x509Calls.Load()-calls)
	}
	refreshed := snap.SVIDs[0]

	// The same with the upstream failing: the still-valid SVID is served,
	// and renewed once the upstream is back.
	unrenewed := renewedOnce(t, c, clock, refreshed)
	advance(unrenewed.RenewAt.Add(time.Second))
	up.SetFail(errors.New("upstream down"))
	snap, err = c.X509Identities(t.Context(), sels)
	if err != nil || snap.SVIDs[0] != unrenewed {
		t.Fatalf("fetch with the upstream down = %v, %v; want the still-valid SVID", snap, err)
	}
	up.SetFail(nil)
	testkit.WaitFor(t, waitLimit, "the renewal once fetched and the upstream back", func() bool {
		c.kickRenewal()
		return c.svidOf("a") != unrenewed
	})
	third := c.svidOf("a")

	// Not fetched, and expired: dropped.
	advance(third.NotAfter.Add(time.Second))
	testkit.WaitFor(t, waitLimit, "the expired unfetched SVID dropped", func() bool { return c.svidOf("a") == nil })
	calls = up.x509Calls.Load()
	if snap, err = c.X509Identities(t.Context(), sels); err != nil || up.x509Calls.Load() != calls+1 {
		t.Fatalf("a workload asking after the drop: %v, %d signing calls; want a new SVID", err, up.x509Calls.Load()-calls)
	}
	if snap.SVIDs[0] == third || !snap.SVIDs[0].NotAfter.After(clock.Now()) {
		t.Fatal("the workload asking after the drop did not get a new, valid SVID")
	}

	// Renewed once fetched, then not fetched, then its CA leaves the
	// bundle: dropped at once instead of re-signed.
	renewedOnce(t, c, clock, snap.SVIDs[0])
	calls = up.x509Calls.Load()
	up.set(func(u *testUpstream) { u.ca = newTestCA(t, testTD) })
	c.SetBundles(up.bundle(), nil)
	testkit.WaitFor(t, waitLimit, "the unfetched SVID of a replaced CA dropped", func() bool { return c.svidOf("a") == nil })
	if up.x509Calls.Load() != calls {
		t.Fatal("an unfetched SVID was re-signed for the new CA")
	}
}

// TestAbandonedRefreshIsRenewedLater: a caller that stops waiting for the
// refresh of an SVID whose renewal was skipped is handed the old SVID; when
// that refresh then fails, the rotation loop still renews the SVID, which
// is now served, once the upstream is back.
func TestAbandonedRefreshIsRenewedLater(t *testing.T) {
	c, up, clock := newClockedCache(t)
	sels, first := fetchFirst(t, c, up, entryA())
	startRotation(t, c)
	unfetched := renewedOnce(t, c, clock, first)

	// Not fetched past its renewal time; then fetched while the upstream
	// hangs past refreshWait and then fails.
	clock.Set(unfetched.RenewAt.Add(time.Second))
	gate := make(chan struct{})
	up.SetGate(gate)
	up.SetFail(errors.New("upstream down"))
	snap, err := c.X509Identities(t.Context(), sels)
	if err != nil || snap.SVIDs[0] != unfetched {
		t.Fatalf("fetch while the refresh hangs = %v, %v; want the still-valid SVID", snap, err)
	}
	// Let the rotation loop take the kick the fetch gave (the SVID is now
	// served) while the refresh is still in flight, as it would when the
	// upstream hangs for longer.
	testkit.WaitFor(t, waitLimit, "the rotation loop to take its kick", func() bool { return len(c.rotator.kick) == 0 })
	time.Sleep(100 * time.Millisecond)
	close(gate)
	up.SetGate(nil)
	testkit.WaitFor(t, waitLimit, "the failed refresh", func() bool { return c.Health().UpstreamErr != nil })
	up.SetFail(nil)
	// No kick from the test: the loop must come back by itself.
	testkit.WaitFor(t, waitLimit, "the renewal after the upstream came back", func() bool { return c.svidOf("a") != unfetched })
}

// TestDetachedRefreshEndsWithTheAgent: signing a caller stopped waiting for
// does not outlive the rotation loop (the agent's run).
func TestDetachedRefreshEndsWithTheAgent(t *testing.T) {
	c, up, clock := newClockedCache(t)
	sels, first := fetchFirst(t, c, up, entryA())
	stop := startRotation(t, c)
	unfetched := renewedOnce(t, c, clock, first)
	clock.Set(unfetched.RenewAt.Add(time.Second))
	up.SetGate(make(chan struct{})) // never opens
	if _, err := c.X509Identities(t.Context(), sels); err != nil {
		t.Fatal(err)
	}
	inflight := c.signer.inFlight()
	if inflight != 1 {
		t.Fatalf("%d signings in flight after the caller stopped waiting, want 1", inflight)
	}
	stop()
	testkit.WaitFor(t, waitLimit, "the detached signing to end with the agent", func() bool {
		return c.signer.inFlight() == 0
	})
}

// TestDetachedMintEndsWithTheAgent: a caller's signing of an SVID it does
// not hold yet runs detached (others may wait on it), yet ends when the
// agent stops rather than at mintTimeout, and so does the caller: a hung
// upstream cannot hold the agent's stop past its grace.
func TestDetachedMintEndsWithTheAgent(t *testing.T) {
	c, up := newTestCache(t)
	e := entryA()
	c.SetEntries([]*Entry{e})
	c.SetBundles(up.bundle(), nil)
	stop := startRotation(t, c)
	up.SetGate(make(chan struct{})) // never opens
	fetched := make(chan error, 1)
	go func() {
		_, err := c.X509Identities(context.Background(), e.Selectors)
		fetched <- err
	}()
	testkit.WaitFor(t, waitLimit, "the signing in flight", func() bool { return up.x509Calls.Load() == 1 })
	stop()
	select {
	case err := <-fetched:
		if err == nil {
			t.Fatal("the fetch succeeded with the upstream hung")
		}
	case <-time.After(waitLimit):
		t.Fatal("the caller still waits on its signing after the agent stopped")
	}
	if n := c.signer.inFlight(); n != 0 {
		t.Fatalf("%d signings in flight after the agent stopped", n)
	}
}

func TestBackoff(t *testing.T) {
	b := NewBackoff(time.Second, 8*time.Second)
	for i, ceiling := range []time.Duration{1, 2, 4, 8, 8, 8} {
		ceiling *= time.Second
		d := b.Next()
		if d < ceiling/2 || d > ceiling {
			t.Errorf("step %d: %v, want within [%v, %v]", i, d, ceiling/2, ceiling)
		}
	}
	b.Reset()
	if d := b.Next(); d > time.Second {
		t.Errorf("after reset: %v, want at most 1s", d)
	}
}

// startRotation runs c's rotation loop until the test ends or stop is
// called, and fails the test if the loop does not stop then.
func startRotation(t *testing.T, c *SVIDManager) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = c.Rotator().Run(ctx)
	}()
	stop = sync.OnceFunc(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(15 * time.Second):
			t.Error("the rotator did not return after its context ended")
		}
	})
	t.Cleanup(stop)
	return stop
}

// renewedOnce moves the clock past the renewal time of svid, entry "a"'s
// (see fetchFirst), and returns the SVID the rotation loop renews it into.
func renewedOnce(t *testing.T, c *SVIDManager, clock *fakeClock, svid *X509SVID) *X509SVID {
	t.Helper()
	clock.Set(svid.RenewAt.Add(time.Second))
	c.kickRenewal()
	testkit.WaitFor(t, waitLimit, "the renewal of a fetched SVID", func() bool { return c.svidOf("a") != svid })
	return c.svidOf("a")
}

// fetchFirst gives the cache one entry, "a" for unix:uid:1, and fetches its
// SVID.
func TestSVIDState(t *testing.T) {
	now := time.Now()
	svid := func(renew, end time.Duration, served, replace bool) *X509SVID {
		s := &X509SVID{RenewAt: now.Add(renew), NotAfter: now.Add(end)}
		s.served.Store(served)
		s.replace.Store(replace)
		return s
	}
	for _, tc := range []struct {
		name string
		svid *X509SVID
		want svidState
	}{
		{"before its renewal", svid(time.Minute, time.Hour, true, false), svidValid},
		{"before its renewal, unfetched", svid(time.Minute, time.Hour, false, false), svidValid},
		{"due and fetched", svid(-time.Minute, time.Hour, true, false), svidRenewDue},
		{"due and unfetched", svid(-time.Minute, time.Hour, false, false), svidUnused},
		{"expired", svid(-time.Hour, -time.Minute, true, false), svidExpired},
		{"marked for replacement", svid(time.Minute, time.Hour, false, true), svidTainted},
	} {
		if got := tc.svid.state(now); got != tc.want {
			t.Errorf("%s: state %d, want %d", tc.name, got, tc.want)
		}
	}
}

// TestRotatorReadsOnlyWhatIsDue: a wake-up looks at the items of the queue
// that are due, not at every SVID, and the next wake-up is the earliest
// renewal time.
func TestRotatorReadsOnlyWhatIsDue(t *testing.T) {
	c, up, clock := newClockedCache(t)
	var entries []*Entry
	for i := range 50 {
		entries = append(entries, testEntry(fmt.Sprint("e", i), fmt.Sprint("spiffe://example.org/w", i), int64(i), fmt.Sprint("unix:uid:", i)))
	}
	c.SetEntries(entries)
	c.SetBundles(up.bundle(), nil)
	for i := range entries {
		if _, err := c.X509Identities(t.Context(), mustSels(fmt.Sprint("unix:uid:", i))); err != nil {
			t.Fatal(err)
		}
	}
	// Signing woke each entry: the first look places them at their
	// renewal times.
	if due, unused, _ := c.rotator.takeDue(clock.Now()); len(due)+len(unused) != 0 {
		t.Fatalf("fresh SVIDs due: %d, unused: %d", len(due), len(unused))
	}
	if n := len(c.rotator.queue); n != len(entries) {
		t.Fatalf("%d queued, want one per entry (%d)", n, len(entries))
	}
	first := slices.MinFunc(entries, func(a, b *Entry) int { return c.svidOf(a.ID).RenewAt.Compare(c.svidOf(b.ID).RenewAt) })
	_, _, next := c.rotator.takeDue(clock.Now())
	if want := c.svidOf(first.ID).RenewAt; !next.Equal(want) {
		t.Errorf("next wake-up %v, want the earliest renewal %v", next, want)
	}
	due, _, _ := c.rotator.takeDue(next)
	if len(due) != 1 || due[0].ID != first.ID {
		t.Errorf("due at the earliest renewal: %v, want only %s", entryIDsOf(due), first.ID)
	}
	if n := len(c.rotator.queue); n != len(entries)-1 {
		t.Errorf("%d queued after taking one, want %d", n, len(entries)-1)
	}
}

func entryIDsOf(entries []*Entry) []string {
	var ids []string
	for _, e := range entries {
		ids = append(ids, e.ID)
	}
	return ids
}

// TestRotatorLeavesWhatACallerRenewedSinceItLooked: after a new CA, the
// rotator takes an SVID as due and a caller re-signs it before the rotator
// claims its signing; the rotator then leaves the caller's SVID be.
func TestRotatorLeavesWhatACallerRenewedSinceItLooked(t *testing.T) {
	c, up := newTestCache(t)
	sels, _ := fetchFirst(t, c, up, entryA())
	up.set(func(u *testUpstream) { u.ca = newTestCA(t, testTD) })
	c.SetBundles(up.bundle(), nil)
	due, _, _ := c.rotator.takeDue(time.Now())
	if len(due) != 1 {
		t.Fatalf("due after a new CA: %v, want a", entryIDsOf(due))
	}
	snap, err := c.X509Identities(t.Context(), sels)
	if err != nil {
		t.Fatal(err)
	}
	calls := up.x509Calls.Load()
	if !c.rotator.renew(t.Context(), due) {
		t.Fatal("the renewal failed")
	}
	if up.x509Calls.Load() != calls || c.svidOf("a") != snap.SVIDs[0] {
		t.Fatal("the rotator re-signed the SVID a caller had just signed under the new CA")
	}
}

// TestKicksWaitOutTheRenewalBackoff: once a renewal failed, the wake-ups
// the loop gets (callers fetching, or failing to sign, during an outage)
// do not have it try the upstream again before its backoff ends.
func TestKicksWaitOutTheRenewalBackoff(t *testing.T) {
	c, up, clock := newClockedCache(t)
	_, first := fetchFirst(t, c, up, entryA())
	up.SetFail(errors.New("upstream down"))
	c.rotator.retry = NewBackoff(time.Hour, time.Hour) // the test ends first
	clock.Set(first.RenewAt.Add(time.Second))
	startRotation(t, c)
	testkit.WaitFor(t, waitLimit, "a failed renewal", func() bool { return up.x509Calls.Load() >= 2 })
	// The loop takes a kick only once it is done with the one before.
	kick := func() {
		c.kickRenewal()
		testkit.WaitFor(t, waitLimit, "the loop to take its kick", func() bool { return len(c.rotator.kick) == 0 })
	}
	kick()
	calls := up.x509Calls.Load()
	for range 5 {
		kick()
	}
	kick()
	if n := up.x509Calls.Load() - calls; n != 0 {
		t.Fatalf("%d renewal attempts on kicks during the backoff, want none", n)
	}
}
