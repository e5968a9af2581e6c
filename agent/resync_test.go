package agent

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"

	"github.com/hashicorp/go-hclog"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// resyncUpstream delivers a pending entry only when asked to resync.
type resyncUpstream struct {
	*testUpstream
	cache   *Cache
	pending []*Entry
	calls   atomic.Int32
	limited bool
}

func (u *resyncUpstream) Resync(context.Context) (bool, error) {
	u.calls.Add(1)
	if u.limited {
		return false, nil
	}
	u.cache.SetEntries(u.pending)
	return true, nil
}

func TestResyncOnMiss(t *testing.T) {
	up := &resyncUpstream{testUpstream: newTestUpstream(t)}
	c := NewCache(hclog.NewNullLogger(), up)
	up.cache = c
	c.SetEntries(nil)
	c.SetBundles(up.bundle(), nil)
	e := testEntry("new", "spiffe://example.org/new", 1, "unix:uid:1000")
	up.pending = []*Entry{e}

	snap, err := c.X509Identities(context.Background(), e.Selectors)
	if err != nil {
		t.Fatalf("an entry created upstream but not yet synced: %v; want it fetched on the miss", err)
	}
	if snap.SVIDs[0].ID != e.SPIFFEID || up.calls.Load() != 1 {
		t.Fatalf("got %s after %d resyncs", snap.SVIDs[0].ID, up.calls.Load())
	}

	// A caller with no entry anywhere still gets ErrNoIdentity, after one
	// rate-limited try, for every kind of call.
	up.limited = true
	other := mustSels("unix:uid:2000")
	if _, err := c.X509Identities(context.Background(), other); !errors.Is(err, ErrNoIdentity) {
		t.Fatal(err)
	}
	if _, err := c.JWTSVIDs(context.Background(), other, []string{"a"}, spiffeid.ID{}); !errors.Is(err, ErrNoIdentity) {
		t.Fatal(err)
	}
	if _, err := c.Bundles(context.Background(), other, false); !errors.Is(err, ErrNoIdentity) {
		t.Fatal(err)
	}
	if n := up.calls.Load(); n != 4 {
		t.Fatalf("%d resync calls, want one per missed call (4)", n)
	}
}
