package agent

import (
	"crypto/x509"
	"testing"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
)

func TestSubscriptions(t *testing.T) {
	c, up := newTestCache(t)
	s := c.Subscribe()
	e := testEntry("a", "spiffe://example.org/a", 1, "unix:uid:1")
	c.SetEntries([]*Entry{e})
	expectSignal(t, s, "the first entries")
	b := up.bundle()
	c.SetBundles(b, nil)
	expectSignal(t, s, "the first bundles")
	first := c.store.local

	c.SetBundles(b.Clone(), nil)
	expectNoSignal(t, s, "an identical SetBundles")
	if c.store.local != first {
		t.Error("an identical bundle replaced the cached one")
	}
	c.SetEntries([]*Entry{clone(e)})
	expectNoSignal(t, s, "an identical SetEntries")

	fed := spiffebundle.FromX509Authorities(otherTD, []*x509.Certificate{newTestCA(t, otherTD).Cert})
	c.SetBundles(b, []*spiffebundle.Bundle{fed})
	expectSignal(t, s, "a new federated bundle")
	c.SetBundles(b, []*spiffebundle.Bundle{fed.Clone()})
	expectNoSignal(t, s, "the same federated bundle again")
	c.SetBundles(b, nil)
	expectSignal(t, s, "a federated bundle removed")

	changed := clone(e)
	changed.Hint = "x"
	c.SetEntries([]*Entry{changed})
	expectSignal(t, s, "a changed entry")
	c.SetEntries(nil)
	expectSignal(t, s, "entries removed")
	c.SetEntries([]*Entry{e})
	expectSignal(t, s, "entries added")

	if _, err := c.X509Identities(t.Context(), mustSels("unix:uid:1")); err != nil {
		t.Fatal(err)
	}
	expectSignal(t, s, "an SVID was minted")

	b2 := up.bundle()
	b2.SetSequenceNumber(7)
	c.SetBundles(b2, nil)
	expectSignal(t, s, "a new bundle sequence number")

	// Many changes, one pending wake-up.
	c.SetEntries(nil)
	c.SetEntries([]*Entry{e})
	expectSignal(t, s, "two changes")
	expectNoSignal(t, s, "the one wake-up was read")

	s.Close()
	c.SetEntries(nil)
	expectNoSignal(t, s, "Close")
}

// TestWatchEntries: a new SVID wakes only the subscribers that hold its
// entry, or that watch every entry.
func TestWatchEntries(t *testing.T) {
	var n notifier
	all, a, b := n.subscribe(), n.subscribe(), n.subscribe()
	a.watchEntries([]string{"a"})
	b.watchEntries([]string{"b", "c"})
	n.entries([]string{"c"})
	expectSignal(t, all, "an SVID for a subscriber watching everything")
	expectNoSignal(t, a, "an SVID of an entry it does not hold")
	expectSignal(t, b, "an SVID of an entry it holds")
	n.all()
	expectSignal(t, b, "an entry or bundle change")
	expectSignal(t, a, "an entry or bundle change")
	expectSignal(t, all, "an entry or bundle change")
	b.Close()
	n.all()
	expectNoSignal(t, b, "Close")
}

// TestWatchCatchesAnSVIDStoredWhileSending: a stream whose new answer adds
// an entry watches the entries of its previous answer until it has sent
// it; a new SVID for the added entry stored meanwhile wakes it once it
// watches the new answer, and with nothing changed since, nothing does.
func TestWatchCatchesAnSVIDStoredWhileSending(t *testing.T) {
	c, up := newTestCache(t)
	a, b := entryA(), testEntry("b", "spiffe://example.org/b", 2, "unix:uid:1")
	hold(c, up, a)
	sub := c.Subscribe()
	defer sub.Close()
	first, err := c.X509Identities(t.Context(), a.Selectors)
	if err != nil {
		t.Fatal(err)
	}
	sub.Watch(first)
	c.SetEntries([]*Entry{a, b})
	expectSignal(t, sub, "an entry change")
	second, err := c.X509Identities(t.Context(), a.Selectors)
	if err != nil || len(second.SVIDs) != 2 {
		t.Fatalf("the answer with b = %v, %v", second, err)
	}

	// While second is sent, b's SVID is replaced.
	mine, _ := c.signer.claim([]*Entry{b}, nil)
	c.signer.mintBatch(t.Context(), mine)
	if c.svidOf("b") == second.SVIDs[1] {
		t.Fatal("b's SVID was not replaced")
	}
	sub.Watch(second)
	expectSignal(t, sub, "a new SVID of an entry of the answer, stored while it was sent")

	third, err := c.X509Identities(t.Context(), a.Selectors)
	if err != nil {
		t.Fatal(err)
	}
	sub.Watch(third)
	expectNoSignal(t, sub, "an answer with nothing changed since")
}
