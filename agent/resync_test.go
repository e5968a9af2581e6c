package agent

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// resyncUpstream delivers a pending entry on the deliverOn-th resync, and
// refuses resyncs once its budget is spent, as a rate-limited server
// upstream does.
type resyncUpstream struct {
	*testUpstream
	cache     *SVIDManager
	pending   []*Entry
	deliverOn int32
	budget    int32
	calls     atomic.Int32
}

func (u *resyncUpstream) Resync(context.Context) (bool, error) {
	n := u.calls.Add(1)
	if n > u.budget {
		return false, nil
	}
	if n == u.deliverOn {
		u.cache.SetEntries(u.pending)
	}
	return true, nil
}

func newResyncCache(t *testing.T, deliverOn, budget int32, pending ...*Entry) (*SVIDManager, *resyncUpstream) {
	up := &resyncUpstream{testUpstream: newTestUpstream(t), pending: pending, deliverOn: deliverOn, budget: budget}
	c := NewSVIDManager(hclog.NewNullLogger(), up)
	up.cache = c
	c.SetEntries(nil)
	c.SetBundles(up.bundle(), nil)
	return c, up
}

func TestAwaitIdentity(t *testing.T) {
	e := testEntry("new", "spiffe://example.org/new", 1, "unix:uid:1000")
	ctx := context.Background()

	// The entry reaches the server's view only on the third sync.
	c, up := newResyncCache(t, 3, 10, e)
	if _, err := c.X509Identities(ctx, e.Selectors); !errors.Is(err, ErrNoIdentity) {
		t.Fatalf("X509Identities before the entry is synced: %v, want ErrNoIdentity", err)
	}
	if n := up.calls.Load(); n != 0 {
		t.Fatalf("X509Identities itself asked for %d syncs; only AwaitIdentity may", n)
	}
	if !c.AwaitIdentity(ctx, e.Selectors, spiffeid.ID{}) {
		t.Fatal("AwaitIdentity gave up before the entry arrived")
	}
	if n := up.calls.Load(); n != 3 {
		t.Fatalf("%d syncs, want 3: it stops as soon as the entry is there", n)
	}
	if snap, err := c.X509Identities(ctx, e.Selectors); err != nil || snap.SVIDs[0].ID != e.SPIFFEID {
		t.Fatalf("after the wait: %v", err)
	}
	// A caller asking for another SPIFFE ID than its entry's is not served.
	other := spiffeid.RequireFromString("spiffe://example.org/other")
	before := up.calls.Load()
	if c.AwaitIdentity(ctx, e.Selectors, other) {
		t.Fatal("AwaitIdentity matched an entry of another SPIFFE ID")
	}
	if up.calls.Load() == before {
		t.Fatal("AwaitIdentity for a missing SPIFFE ID did not ask for a sync")
	}

	// The upstream's budget ends the wait.
	c, up = newResyncCache(t, 100, 4, e)
	if c.AwaitIdentity(ctx, e.Selectors, spiffeid.ID{}) {
		t.Fatal("AwaitIdentity matched an entry that never arrived")
	}
	if n := up.calls.Load(); n != 5 {
		t.Fatalf("%d resync calls, want the budget's 4 and the refused one", n)
	}

	// So does the caller's deadline, and the cap on the wait.
	c, _ = newResyncCache(t, 0, 1<<30)
	short, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
	defer cancel()
	if c.AwaitIdentity(short, e.Selectors, spiffeid.ID{}) {
		t.Fatal("matched with nothing pending")
	}
	if short.Err() == nil {
		t.Fatal("AwaitIdentity returned before the caller's deadline though the upstream kept syncing")
	}
}

// TestAwaitIdentityWithoutResyncer: an upstream that cannot sync on demand
// (the embedded CA) never holds a caller.
func TestAwaitIdentityWithoutResyncer(t *testing.T) {
	up := newTestUpstream(t)
	c := NewSVIDManager(hclog.NewNullLogger(), up)
	c.SetEntries(nil)
	c.SetBundles(up.bundle(), nil)
	if c.AwaitIdentity(context.Background(), mustSels("unix:uid:1000"), spiffeid.ID{}) {
		t.Fatal("matched with no entry")
	}
}
