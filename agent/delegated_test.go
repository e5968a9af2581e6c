package agent

import (
	"slices"
	"testing"
)

// The Delegated Identity API serves what spire-agent's does: every entry a
// workload matches, entries sharing a hint included, but for admin and
// downstream entries' X509-SVIDs; the Workload API keeps one per hint; the
// Broker API one per hint, and no admin or downstream entry's.
func TestDelegatedViewOfEntries(t *testing.T) {
	c, up, _ := newClockedCache(t)
	a := testEntry("a", "spiffe://example.org/a", 1, "unix:uid:1")
	b := testEntry("b", "spiffe://example.org/b", 2, "unix:uid:1")
	a.Hint, b.Hint = "shared", "shared"
	admin := testEntry("admin", "spiffe://example.org/admin", 3, "unix:uid:1")
	admin.Admin = true
	down := testEntry("down", "spiffe://example.org/down", 4, "unix:uid:1")
	down.Downstream = true
	hold(c, up, a, b, admin, down)
	sels := mustSels("unix:uid:1")

	ids := func(snap *X509Snapshot, err error) []string {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, s := range snap.SVIDs {
			out = append(out, s.ID.Path())
		}
		return out
	}
	if got := ids(c.X509Identities(t.Context(), sels)); !slices.Equal(got, []string{"/a", "/admin", "/down"}) {
		t.Errorf("the Workload API's X509-SVIDs: %v, want one per hint", got)
	}
	if got := ids(c.DelegatedX509Identities(t.Context(), sels)); !slices.Equal(got, []string{"/a", "/b"}) {
		t.Errorf("a delegate's X509-SVIDs: %v, want both entries sharing the hint and no admin or downstream entry", got)
	}
	if got := ids(c.BrokerX509Identities(t.Context(), sels)); !slices.Equal(got, []string{"/a"}) {
		t.Errorf("a broker's X509-SVIDs: %v, want one per hint and no admin or downstream entry", got)
	}
	jwts, err := c.DelegatedJWTSVIDs(t.Context(), sels, []string{"x"})
	if err != nil || len(jwts) != 4 {
		t.Errorf("a delegate's JWT-SVIDs: %d, %v; want one for every entry", len(jwts), err)
	}
	entryIDs, err := c.EntryIDs(t.Context(), sels)
	if err != nil || len(entryIDs) != 4 {
		t.Errorf("EntryIDs: %v, %v; want every entry, for the delegate check", entryIDs, err)
	}
}
