package workloadapi

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/internal/testkit/fakeagent"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"google.golang.org/grpc/codes"
)

// resyncingUpstream delivers the entries it holds back on the deliverOn-th
// sync on demand, as a server whose entry cache catches up does.
type resyncingUpstream struct {
	*fakeagent.Upstream
	mu        sync.Mutex
	cache     *agent.SVIDManager
	pending   []*agent.Entry
	deliverOn int32
	calls     atomic.Int32
}

func (u *resyncingUpstream) Resync(context.Context) (bool, error) {
	n := u.calls.Add(1)
	u.mu.Lock()
	defer u.mu.Unlock()
	if n == u.deliverOn {
		u.cache.SetEntries(u.pending)
	}
	return n < 50, nil
}

// TestCallerWaitsForItsEntry: every kind of call from a caller with no
// identity is held while the upstream syncs, and answered once its entry
// arrives; a stream whose entries are deleted is told at once.
func TestCallerWaitsForItsEntry(t *testing.T) {
	calls := map[string]func(t *testing.T, c workload.SpiffeWorkloadAPIClient) error{
		"FetchX509SVID": func(t *testing.T, c workload.SpiffeWorkloadAPIClient) error {
			_, err := nextOrErr(openX509Stream(t, c))
			return err
		},
		"FetchX509Bundles": func(t *testing.T, c workload.SpiffeWorkloadAPIClient) error {
			_, err := nextOrErr(openX509BundlesStream(t, c))
			return err
		},
		"FetchJWTBundles": func(t *testing.T, c workload.SpiffeWorkloadAPIClient) error {
			_, err := nextOrErr(openJWTBundlesStream(t, c))
			return err
		},
		"FetchJWTSVID": func(t *testing.T, c workload.SpiffeWorkloadAPIClient) error {
			_, err := c.FetchJWTSVID(callCtx(t), &workload.JWTSVIDRequest{Audience: []string{"db"}})
			return err
		},
	}
	for name, call := range calls {
		t.Run(name, func(t *testing.T) {
			var up *resyncingUpstream
			e := newTestEnv(t, envOptions{upstream: func(tu *fakeagent.Upstream) agent.Upstream {
				up = &resyncingUpstream{Upstream: tu, deliverOn: 3, pending: []*agent.Entry{newEntry("/web", 1, mySelector())}}
				return up
			}})
			up.mu.Lock()
			up.cache = e.cache
			up.mu.Unlock()
			if err := call(t, e.client(t)); err != nil {
				t.Fatalf("held for its entry: %v; want an answer once it arrives", err)
			}
			if n := up.calls.Load(); n != 3 {
				t.Fatalf("%d syncs on demand, want 3 (the entry came with the third)", n)
			}
		})
	}

	t.Run("deleted entries", func(t *testing.T) {
		var up *resyncingUpstream
		e := newTestEnv(t, envOptions{entries: []*agent.Entry{newEntry("/web", 1, mySelector())}, upstream: func(tu *fakeagent.Upstream) agent.Upstream {
			up = &resyncingUpstream{Upstream: tu, deliverOn: -1}
			return up
		}})
		ch := openX509Stream(t, e.client(t))
		nextMsg(t, ch, "the first X509-SVID message")
		e.cache.SetEntries(nil)
		streamEnd(t, ch, codes.PermissionDenied, "the stream whose entry was deleted")
		if n := up.calls.Load(); n != 0 {
			t.Fatalf("%d syncs on demand for a stream whose entries were deleted, want none", n)
		}
	})
}

// nextOrErr returns the first message of a stream, or its error.
func nextOrErr[T any](ch <-chan received[T]) (T, error) {
	select {
	case r := <-ch:
		return r.msg, r.err
	case <-time.After(20 * time.Second):
		var zero T
		return zero, errors.New("no message within 20s")
	}
}
