package agent

import (
	"context"
	"crypto/x509"
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/attestor/selector"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

func TestMatchIsSubset(t *testing.T) {
	c, up := newTestCache(t)
	a := testEntry("a", "spiffe://example.org/a", 1, "unix:uid:1")
	ab := testEntry("ab", "spiffe://example.org/ab", 2, "unix:uid:1", "unix:gid:2")
	cc := testEntry("c", "spiffe://example.org/c", 3, "unix:uid:3")
	hold(c, up, cc, ab, a)
	sel := func(s string) selector.Selector { return mustSels(s)[0] }
	for _, tc := range []struct {
		name string
		sels []selector.Selector
		want []string
	}{
		{"one selector", mustSels("unix:uid:1"), []string{"a"}},
		{"two selectors", mustSels("unix:uid:1", "unix:gid:2"), []string{"a", "ab"}},
		{"superset", mustSels("k8s:ns:x", "unix:uid:1", "unix:gid:2", "unix:uid:3"), []string{"a", "ab", "c"}},
		{"part of an entry", mustSels("unix:gid:2"), nil},
		{"unrelated", mustSels("unix:uid:9"), nil},
		{"none", nil, nil},
		{"unsorted", []selector.Selector{sel("unix:uid:3"), sel("unix:gid:2"), sel("unix:uid:1")}, []string{"a", "ab", "c"}},
		// A repeated selector must not stand in for a missing one.
		{"duplicates", []selector.Selector{sel("unix:uid:1"), sel("unix:uid:1")}, []string{"a"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			snap, err := c.X509Identities(t.Context(), tc.sels)
			if tc.want == nil {
				if !errors.Is(err, ErrNoIdentity) {
					t.Fatalf("X509Identities = %v, %v; want ErrNoIdentity", snap, err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := entryIDs(snap); !slices.Equal(got, tc.want) {
				t.Fatalf("entries %v, want %v", got, tc.want)
			}
			for i, svid := range snap.SVIDs {
				checkSVID(t, svid, c.store.entry(tc.want[i]), up.bundle())
			}
			if snap.Local == nil || !snap.Local.Equal(up.bundle()) {
				t.Error("the snapshot lacks the local bundle")
			}
		})
	}
}

func TestOrderAndHints(t *testing.T) {
	c, up := newTestCache(t)
	z := testEntry("z", "spiffe://example.org/z", 5, "unix:uid:1")
	y := testEntry("y", "spiffe://example.org/y", 1, "unix:uid:1")
	y.Hint = "h"
	a := testEntry("a", "spiffe://example.org/a", 5, "unix:uid:1")
	a.Hint = "h" // younger than y: dropped
	w := testEntry("w", "spiffe://example.org/w", 7, "unix:uid:1")
	hold(c, up, z, a, w, y)
	snap, err := c.X509Identities(t.Context(), mustSels("unix:uid:1"))
	if err != nil {
		t.Fatal(err)
	}
	if got := entryIDs(snap); !slices.Equal(got, []string{"y", "z", "w"}) {
		t.Errorf("entries %v, want [y z w]: oldest first, ties by ID, one per hint", got)
	}
	if !slices.Equal(snap.Hints, []string{"h", "", ""}) {
		t.Errorf("hints %q", snap.Hints)
	}
	// Without the older entry, the younger one gets the hint.
	c.SetEntries([]*Entry{z, a, w})
	snap, err = c.X509Identities(t.Context(), mustSels("unix:uid:1"))
	if err != nil {
		t.Fatal(err)
	}
	if got := entryIDs(snap); !slices.Equal(got, []string{"a", "z", "w"}) || snap.Hints[0] != "h" {
		t.Errorf("entries %v hints %q, want [a z w] with a holding the hint", got, snap.Hints)
	}
}

func TestNotReady(t *testing.T) {
	c, up := newTestCache(t)
	ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
	defer cancel()
	if _, err := c.X509Identities(ctx, mustSels("unix:uid:1")); !errors.Is(err, ErrNotReady) {
		t.Errorf("X509Identities before the upstream delivered = %v, want ErrNotReady", err)
	}
	c.SetEntries(nil)
	select {
	case <-c.Ready():
		t.Fatal("ready with entries but no bundles")
	default:
	}
	c.SetBundles(up.bundle(), nil)
	select {
	case <-c.Ready():
	default:
		t.Fatal("not ready with entries and bundles")
	}
	// An empty entry list is a valid state: nobody has an identity.
	if _, err := c.X509Identities(t.Context(), mustSels("unix:uid:1")); !errors.Is(err, ErrNoIdentity) {
		t.Errorf("X509Identities with no entries = %v, want ErrNoIdentity", err)
	}
}

func TestSetEntriesKeepsAndDropsSVIDs(t *testing.T) {
	c, up := newTestCache(t)
	e, other := entryA(), testEntry("b", "spiffe://example.org/b", 2, "unix:uid:2")
	hold(c, up, e, other)
	fetch := func() *X509Snapshot {
		t.Helper()
		snap, err := c.X509Identities(t.Context(), mustSels("unix:uid:1"))
		if err != nil {
			t.Fatal(err)
		}
		return snap
	}
	first := fetch().SVIDs[0]
	if c.svidOf("b") != nil {
		t.Error("an SVID was minted for an entry nobody asked for")
	}

	c.SetEntries([]*Entry{clone(e), clone(other)})
	if got := fetch().SVIDs[0]; got != first {
		t.Error("an unchanged entry lost its SVID")
	}
	hinted := clone(e)
	hinted.Hint, hinted.RevisionNumber, hinted.JWTSVIDTTL = "new-hint", 2, time.Minute
	c.SetEntries([]*Entry{hinted, clone(other)})
	snap := fetch()
	if snap.SVIDs[0] != first || snap.Hints[0] != "new-hint" {
		t.Error("a change that does not alter the certificate must keep the SVID and show the new hint")
	}
	if up.x509Calls.Load() != 1 {
		t.Errorf("%d signing calls, want 1", up.x509Calls.Load())
	}

	moved := clone(hinted)
	moved.SPIFFEID = spiffeid.RequireFromString("spiffe://example.org/moved")
	c.SetEntries([]*Entry{moved, clone(other)})
	if c.svidOf("a") != nil {
		t.Error("changing the SPIFFE ID did not drop the SVID")
	}
	renamed := fetch().SVIDs[0]
	if renamed == first || renamed.ID != moved.SPIFFEID {
		t.Errorf("after the SPIFFE ID changed the SVID is for %s", renamed.ID)
	}

	dns := clone(moved)
	dns.DNSNames = []string{"a.example.org"}
	c.SetEntries([]*Entry{dns, clone(other)})
	if c.svidOf("a") != nil {
		t.Error("changing the DNS names did not drop the SVID")
	}
	ttl := clone(dns)
	ttl.X509SVIDTTL = time.Minute
	fetch()
	c.SetEntries([]*Entry{ttl, clone(other)})
	if c.svidOf("a") != nil {
		t.Error("changing the X509 TTL did not drop the SVID")
	}
	fetch()

	c.SetEntries([]*Entry{clone(other)})
	if c.svidOf("a") != nil {
		t.Error("a removed entry kept its SVID")
	}
	if _, err := c.X509Identities(t.Context(), mustSels("unix:uid:1")); !errors.Is(err, ErrNoIdentity) {
		t.Errorf("after removal: %v, want ErrNoIdentity", err)
	}
}

func TestSnapshotSame(t *testing.T) {
	c, up := newTestCache(t)
	c.SetEntries([]*Entry{testEntry("a", "spiffe://example.org/a", 1, "unix:uid:1")})
	c.SetBundles(up.bundle(), nil)
	s1, err := c.X509Identities(t.Context(), mustSels("unix:uid:1"))
	if err != nil {
		t.Fatal(err)
	}
	c.SetBundles(up.bundle(), nil)
	s2, _ := c.X509Identities(t.Context(), mustSels("unix:uid:1"))
	if !s1.Same(s2) {
		t.Error("snapshots of an unchanged cache differ")
	}
	b1, _ := c.Bundles(t.Context(), mustSels("unix:uid:1"), false)
	up.set(func(u *testUpstream) { u.jwtKID = "kid-2" })
	c.SetBundles(up.bundle(), nil)
	s3, _ := c.X509Identities(t.Context(), mustSels("unix:uid:1"))
	if !s1.Same(s3) {
		t.Error("an X.509 snapshot changed with the JWT keys, which it does not carry")
	}
	b2, _ := c.Bundles(t.Context(), mustSels("unix:uid:1"), false)
	if b1.SameJWT(b2) || !b1.SameX509(b2) || !b2.SameJWT(b2) {
		t.Error("BundleSnapshot.SameJWT/SameX509 are wrong after a JWT-only change")
	}
	up.set(func(u *testUpstream) { u.ca = newTestCA(t, testTD) })
	c.SetBundles(up.bundle(), nil)
	s4, _ := c.X509Identities(t.Context(), mustSels("unix:uid:1"))
	b3, _ := c.Bundles(t.Context(), mustSels("unix:uid:1"), false)
	if s1.Same(s4) || b2.SameX509(b3) || !b2.SameJWT(b3) {
		t.Error("a new X.509 root is not seen, or is seen by the JWT bundle")
	}
	var nilSnap *X509Snapshot
	if nilSnap.Same(s1) || s1.Same(nil) {
		t.Error("a nil snapshot is Same as another")
	}
}

func TestBundlesVisibility(t *testing.T) {
	c, up := newTestCache(t)
	fedOther := spiffebundle.FromX509Authorities(otherTD, []*x509.Certificate{newTestCA(t, otherTD).Cert})
	fedThird := spiffebundle.FromX509Authorities(thirdTD, []*x509.Certificate{newTestCA(t, thirdTD).Cert})
	// A "federated" bundle for our own trust domain is ignored.
	own := spiffebundle.FromX509Authorities(testTD, []*x509.Certificate{newTestCA(t, testTD).Cert})
	a := testEntry("a", "spiffe://example.org/a", 1, "unix:uid:1")
	a.FederatesWith = []spiffeid.TrustDomain{otherTD, spiffeid.RequireTrustDomainFromString("unknown.org")}
	plain := testEntry("p", "spiffe://example.org/p", 2, "unix:uid:2")
	c.SetEntries([]*Entry{a, plain})
	c.SetBundles(up.bundle(), []*spiffebundle.Bundle{fedThird, own, fedOther})

	tds := func(bs []*Bundle) []string {
		var out []string
		for _, b := range bs {
			out = append(out, b.TrustDomain().Name())
		}
		return out
	}
	snap, err := c.Bundles(t.Context(), mustSels("unix:uid:1"), false)
	if err != nil {
		t.Fatal(err)
	}
	if !snap.Local.Equal(up.bundle()) || !slices.Equal(tds(snap.Federated), []string{"other.org"}) {
		t.Errorf("a federating caller sees %v", tds(snap.Federated))
	}
	snap, err = c.Bundles(t.Context(), mustSels("unix:uid:2"), true)
	if err != nil || len(snap.Federated) != 0 {
		t.Errorf("a caller whose entries federate with nobody sees %v (%v)", snap, err)
	}
	if _, err := c.Bundles(t.Context(), mustSels("unix:uid:9"), false); !errors.Is(err, ErrNoIdentity) {
		t.Errorf("a caller without entries: %v, want ErrNoIdentity", err)
	}
	snap, err = c.Bundles(t.Context(), mustSels("unix:uid:9"), true)
	if err != nil {
		t.Fatal(err)
	}
	// A caller with no identity federates with no one: the local bundle only.
	if len(snap.Federated) != 0 || snap.Local == nil {
		t.Errorf("allowUnauthenticated: federated %v, want none", tds(snap.Federated))
	}
	if !snap.Local.Equal(up.bundle()) {
		t.Error("the own-trust-domain federated bundle replaced the local bundle")
	}
	x, err := c.X509Identities(t.Context(), mustSels("unix:uid:1", "unix:uid:2"))
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(tds(x.Federated), []string{"other.org"}) {
		t.Errorf("X509 snapshot federated %v", tds(x.Federated))
	}
}

// Between a bundle that drops the CA of an SVID and that SVID's renewal,
// a fetch must not be handed the SVID with a bundle it does not verify
// against: it gets one signed by the new CA.
func TestSVIDNotChainingToBundleIsNotServed(t *testing.T) {
	c, up := newTestCache(t)
	e := entryA()
	hold(c, up, e)
	if _, err := c.X509Identities(t.Context(), mustSels("unix:uid:1")); err != nil {
		t.Fatal(err)
	}
	up.set(func(u *testUpstream) { u.ca = newTestCA(t, testTD) })
	c.SetBundles(up.bundle(), nil) // no rotation loop runs: nothing renews it
	snap, err := c.X509Identities(t.Context(), mustSels("unix:uid:1"))
	if err != nil {
		t.Fatal(err)
	}
	checkSVID(t, snap.SVIDs[0], e, snap.Local.Bundle)
}

// TestSnapshotsAreShared: callers that match the same entries get one
// snapshot, and one encoding of it, until something changes.
func TestSnapshotsAreShared(t *testing.T) {
	c, up := newTestCache(t)
	c.SetEntries([]*Entry{testEntry("a", "spiffe://example.org/a", 1, "unix:uid:1"), testEntry("b", "spiffe://example.org/b", 2, "unix:uid:1", "unix:gid:2")})
	c.SetBundles(up.bundle(), nil)
	fetch := func(sels ...string) *X509Snapshot {
		t.Helper()
		snap, err := c.X509Identities(t.Context(), mustSels(sels...))
		if err != nil {
			t.Fatal(err)
		}
		return snap
	}
	// Both SVIDs signed first: a signing is a change.
	both := fetch("unix:uid:1", "unix:gid:2")
	one := fetch("unix:uid:1")
	if again := fetch("unix:uid:1", "unix:pid:7"); again != fetch("unix:uid:1") || again == both {
		t.Error("callers matching the same entries got different snapshots, or others the same")
	}
	if fetch("unix:gid:2", "unix:uid:1") != both {
		t.Error("callers matching the same two entries got different snapshots")
	}
	encodings := 0
	encode := func(*X509Snapshot) []byte { encodings++; return []byte("x") }
	one.Encoded(encode)
	fetch("unix:uid:1").Encoded(encode)
	if encodings != 1 {
		t.Errorf("%d encodings of one snapshot, want 1", encodings)
	}
	up.set(func(u *testUpstream) { u.ca = newTestCA(t, testTD) })
	c.SetBundles(up.bundle(), nil)
	if next := fetch("unix:uid:1"); next == one || next.Same(one) {
		t.Error("a new bundle did not make a new snapshot")
	}
}

// TestSnapshotMemoHoldsNoReplacedSVID: a change empties the memo of
// snapshots, so that it never keeps alive an SVID (and its key) that the
// store replaced or dropped.
func TestSnapshotMemoHoldsNoReplacedSVID(t *testing.T) {
	c, up := newTestCache(t)
	c.SetEntries([]*Entry{testEntry("a", "spiffe://example.org/a", 1, "unix:uid:1")})
	c.SetBundles(up.bundle(), nil)
	if _, err := c.X509Identities(t.Context(), mustSels("unix:uid:1")); err != nil {
		t.Fatal(err)
	}
	memoized := func() int {
		n := 0
		c.store.snapshots.Load().Range(func(any, any) bool { n++; return true })
		return n
	}
	if memoized() != 1 {
		t.Fatalf("%d snapshots memoized after a fetch, want 1", memoized())
	}
	up.set(func(u *testUpstream) { u.ca = newTestCA(t, testTD) })
	c.SetBundles(up.bundle(), nil)
	if n := memoized(); n != 0 {
		t.Fatalf("%d snapshots memoized after the bundle changed, want 0", n)
	}
}
