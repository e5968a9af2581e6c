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
	a.WatchEntries([]string{"a"})
	b.WatchEntries([]string{"b", "c"})
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
