package agent

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
)

// TestSavedSVIDIsServedAtOnce: an SVID loaded from the saved cache after
// its renewal time has passed is handed out at once with the upstream
// blocked (as it may be right after a restart): its renewal time counts
// from the restart, so no refresh (Cache.refresh) holds the caller.
func TestSavedSVIDIsServedAtOnce(t *testing.T) {
	dir := t.TempDir()
	c, up := newTestCache(t)
	c.PersistTo(dir, testTD)
	sels, saved := fetchFirst(t, c, up, entryA())
	c.persister.persist()

	clock := &fakeClock{now: saved.RenewAt.Add(time.Second)}
	up.set(func(u *testUpstream) { u.now = clock.Now })
	up.SetGate(make(chan struct{}))
	restarted := NewSVIDManager(hclog.NewNullLogger(), up)
	restarted.now = clock.Now
	restarted.PersistTo(dir, testTD)
	calls := up.x509Calls.Load()
	snap, err := restarted.X509Identities(t.Context(), sels)
	if err != nil || !bytes.Equal(snap.SVIDs[0].ChainDER, saved.ChainDER) {
		t.Fatalf("fetch after the restart = %v, %v; want the saved SVID", snap, err)
	}
	if up.x509Calls.Load() != calls {
		t.Fatal("the saved SVID was held for a refresh")
	}
}

// TestPersisterWritesOnlyChanges: the file is rewritten after a change, not
// on every tick.
func TestPersisterWritesOnlyChanges(t *testing.T) {
	dir := t.TempDir()
	c, up := newTestCache(t)
	c.PersistTo(dir, testTD)
	fetchFirst(t, c, up, entryA())
	path := filepath.Join(dir, cacheFileName)
	c.persister.persist()
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("not saved after a change: %v", err)
	}
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	c.persister.persist()
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("saved again with no change: %v", err)
	}
	c.SetEntries(nil)
	c.persister.persist()
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("not saved after the entries changed: %v", err)
	}
}

// Admin and downstream flags survive a save; an entry saved by an agent
// that did not save them loads as admin, withheld from delegates and
// brokers until a sync says what it is.
func TestSavedEntryFlags(t *testing.T) {
	e := testEntry("a", "spiffe://example.org/a", 1, "unix:uid:1")
	e.Downstream = true
	back, err := storeEntry(e).entry()
	if err != nil || back.Admin || !back.Downstream {
		t.Fatalf("a downstream entry saved and loaded: %+v, %v", back, err)
	}
	old := storeEntry(testEntry("b", "spiffe://example.org/b", 1, "unix:uid:1"))
	old.FlagsKnown = false
	if back, err := old.entry(); err != nil || !back.Admin {
		t.Fatalf("an entry saved without flags loads as %+v, %v; want admin (withheld from delegates)", back, err)
	}
}
