package agent

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

func TestConcurrentFetchMintsOnce(t *testing.T) {
	c, up := newTestCache(t)
	e := entryA()
	hold(c, up, e)
	gate := make(chan struct{})
	up.SetGate(gate)

	const n = 16
	results := make(chan *X509SVID, n)
	errs := make(chan error, n)
	for range n {
		go func() {
			snap, err := c.X509Identities(context.Background(), mustSels("unix:uid:1"))
			if err != nil {
				errs <- err
				return
			}
			results <- snap.SVIDs[0]
		}()
	}
	testkit.WaitFor(t, waitLimit, "the first signing call", func() bool { return up.x509Calls.Load() >= 1 })
	// Give the other callers time to pile up on the signing in flight.
	time.Sleep(100 * time.Millisecond)
	close(gate)
	var first *X509SVID
	for range n {
		select {
		case err := <-errs:
			t.Fatal(err)
		case svid := <-results:
			if first == nil {
				first = svid
			} else if svid != first {
				t.Error("callers got different SVIDs for one entry")
			}
		case <-time.After(15 * time.Second):
			t.Fatal("callers did not return")
		}
	}
	if got := up.x509Calls.Load(); got != 1 {
		t.Errorf("the upstream was asked %d times, want once", got)
	}
}

func TestMintBatches(t *testing.T) {
	c, up := newTestCache(t)
	var entries []*Entry
	for i := range maxBatch + 1 {
		entries = append(entries, testEntry(string(rune('a'+i%26))+string(rune('0'+i/26)), "spiffe://example.org/w", int64(i), "unix:uid:1"))
	}
	c.SetEntries(entries)
	c.SetBundles(up.bundle(), nil)
	snap, err := c.X509Identities(t.Context(), mustSels("unix:uid:1"))
	if err != nil {
		t.Fatal(err)
	}
	if len(snap.SVIDs) != maxBatch+1 {
		t.Errorf("%d SVIDs, want %d", len(snap.SVIDs), maxBatch+1)
	}
	up.mu.Lock()
	batches := slices.Clone(up.batches)
	up.mu.Unlock()
	if !slices.Equal(batches, []int{maxBatch, 1}) {
		t.Errorf("signing batches %v, want [%d 1]", batches, maxBatch)
	}
}

func TestEntryChangedWhileMinting(t *testing.T) {
	c, up := newTestCache(t)
	e := testEntry("a", "spiffe://example.org/old", 1, "unix:uid:1")
	hold(c, up, e)
	gate := make(chan struct{})
	up.SetGate(gate)
	done := make(chan *X509Snapshot, 1)
	errc := make(chan error, 1)
	go func() {
		snap, err := c.X509Identities(context.Background(), mustSels("unix:uid:1"))
		if err != nil {
			errc <- err
			return
		}
		done <- snap
	}()
	testkit.WaitFor(t, waitLimit, "the signing call", func() bool { return up.x509Calls.Load() >= 1 })
	changed := clone(e)
	changed.SPIFFEID = spiffeid.RequireFromString("spiffe://example.org/new")
	c.SetEntries([]*Entry{changed})
	up.SetGate(nil)
	close(gate)
	select {
	case snap := <-done:
		if snap.SVIDs[0].ID != changed.SPIFFEID {
			t.Errorf("the caller got an SVID for %s after the entry changed to %s", snap.SVIDs[0].ID, changed.SPIFFEID)
		}
	case err := <-errc:
		t.Fatal(err)
	case <-time.After(15 * time.Second):
		t.Fatal("X509Identities did not return")
	}
}

func TestUpstreamErrors(t *testing.T) {
	c, up := newTestCache(t)
	e := entryA()
	hold(c, up, e)
	for _, tc := range []struct {
		name string
		set  func(u *testUpstream)
		want string
	}{
		{"call fails", func(u *testUpstream) { u.SetFail(errors.New("upstream down")) }, "upstream down"},
		{"one result fails", func(u *testUpstream) {
			u.hook = func(r []X509Result) []X509Result { return []X509Result{{Err: errors.New("entry refused")}} }
		}, "entry refused"},
		{"wrong SPIFFE ID", func(u *testUpstream) {
			u.hook = func(r []X509Result) []X509Result {
				leaf, err := u.ca.SignSVID(r[0].Chain[0].PublicKey, "spiffe://example.org/else", time.Now(), time.Now().Add(time.Hour))
				return []X509Result{{Chain: []*x509.Certificate{leaf}, Err: err}}
			}
		}, "not spiffe://example.org/a"},
		{"too few results", func(u *testUpstream) {
			u.hook = func([]X509Result) []X509Result { return nil }
		}, "answered 0 of 1"},
		{"empty chain", func(u *testUpstream) {
			u.hook = func([]X509Result) []X509Result { return []X509Result{{}} }
		}, "empty chain"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up.SetFail(nil)
			up.set(func(u *testUpstream) { u.hook = nil })
			up.set(tc.set)
			_, err := c.X509Identities(t.Context(), mustSels("unix:uid:1"))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %v, want one saying %q", err, tc.want)
			}
			if c.svidOf("a") != nil {
				t.Error("a failed signing left an SVID")
			}
		})
	}
	up.SetFail(nil)
	up.set(func(u *testUpstream) { u.hook = nil })
	snap, err := c.X509Identities(t.Context(), mustSels("unix:uid:1"))
	if err != nil {
		t.Fatalf("after the upstream recovered: %v", err)
	}
	checkSVID(t, snap.SVIDs[0], e, up.bundle())
}

// TestKeyGenerationFailureSendsNoKeylessRequest: an entry whose key could
// not be generated fails alone; the others of the batch are still signed,
// and the upstream never gets a request without a key.
func TestKeyGenerationFailureSendsNoKeylessRequest(t *testing.T) {
	c, up := newTestCache(t)
	c.SetEntries([]*Entry{testEntry("a", "spiffe://example.org/a", 1, "unix:uid:1"), testEntry("b", "spiffe://example.org/b", 1, "unix:uid:1")})
	c.SetBundles(up.bundle(), nil)
	var calls atomic.Int32
	c.signer.newKey = func() (*ecdsa.PrivateKey, error) {
		if calls.Add(1) == 1 {
			return nil, errors.New("no entropy")
		}
		return ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	}
	svids, errs := c.signer.sign(t.Context(), []*mintCall{{entry: c.store.entry("a")}, {entry: c.store.entry("b")}})
	if errs[0] == nil || !strings.Contains(errs[0].Error(), "no entropy") || svids[0] != nil {
		t.Errorf("the call whose key failed: %v, %v", svids[0], errs[0])
	}
	if errs[1] != nil || svids[1] == nil {
		t.Errorf("the other call of the batch: %v, %v", svids[1], errs[1])
	}
}

// Upstreams backdate NotBefore (SPIRE and the local CA by 10s). An SVID's
// renewal time must still lie ahead of the moment it was minted, or a short
// TTL makes rotation re-sign it in a busy loop.
func TestRenewAtAfterMinting(t *testing.T) {
	c, up := newTestCache(t)
	up.backdate = 10 * time.Second
	e := entryA()
	e.X509SVIDTTL = 2 * time.Second
	hold(c, up, e)
	before := time.Now()
	snap, err := c.X509Identities(t.Context(), mustSels("unix:uid:1"))
	if err != nil {
		t.Fatal(err)
	}
	svid := snap.SVIDs[0]
	if !svid.RenewAt.After(before) || !svid.RenewAt.Before(svid.NotAfter) {
		t.Errorf("RenewAt %v is not between the minting time %v and NotAfter %v", svid.RenewAt, before, svid.NotAfter)
	}
}

func TestRenewAtJitter(t *testing.T) {
	now := time.Now()
	na := now.Add(time.Hour)
	seen := map[time.Time]bool{}
	for range 200 {
		r := renewAt(now, na)
		if r.Before(now.Add(27*time.Minute)) || r.After(now.Add(33*time.Minute)) {
			t.Fatalf("renewAt %v is outside half-life +-10%%", r.Sub(now))
		}
		seen[r] = true
	}
	if len(seen) < 2 {
		t.Error("renewAt has no jitter")
	}
	// A certificate at or past its end is not renewed in a busy loop.
	for _, end := range []time.Time{now, now.Add(-time.Minute), now.Add(time.Millisecond)} {
		if r := renewAt(now, end); r.Before(now.Add(minRenewInterval)) {
			t.Errorf("renewAt with %v left = %v from now, under %v", end.Sub(now), r.Sub(now), minRenewInterval)
		}
	}
}

// TestClaimSharesInFlight: a second caller for an entry being signed waits
// on that signing; an entry another signing completed is not claimed.
func TestClaimSharesInFlight(t *testing.T) {
	c, _ := newTestCache(t)
	a, b := testEntry("a", "spiffe://example.org/a", 1, "unix:uid:1"), testEntry("b", "spiffe://example.org/b", 2, "unix:uid:1")
	mine, theirs := c.signer.claim([]*Entry{a}, nil)
	if len(mine) != 1 || len(theirs) != 0 || !c.signer.signing("a") {
		t.Fatalf("first claim: %d mine, %d theirs", len(mine), len(theirs))
	}
	mine2, theirs2 := c.signer.claim([]*Entry{a, b}, func(e *Entry) bool { return e.ID != "b" })
	if len(mine2) != 0 || len(theirs2) != 1 || theirs2[0] != mine[0] {
		t.Errorf("second claim: %d mine, %d theirs; want to share the first's and skip b", len(mine2), len(theirs2))
	}
}
