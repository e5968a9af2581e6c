package workloadapi

import (
	"context"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/attestor"
	"github.com/lanyard-dev/lanyard/attestor/selector"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Denials are logged at INFO, with the selectors the caller was found to
// have, so that an operator sees why a workload got no identity; at most
// once per uid per denialLogEvery, so that a client retrying in a loop
// cannot flood the log.
const (
	denialLogEvery = time.Minute
	// maxDenialUIDs bounds the limiter's memory: uids beyond it share one
	// slot until older ones age out.
	maxDenialUIDs = 1024
	// maxLoggedSelectors bounds one line; the rest are counted.
	maxLoggedSelectors = 64
)

// denialLimiter remembers when each uid's denial was last logged.
type denialLimiter struct {
	mu       sync.Mutex
	byUID    map[uint32]*denialSlot
	overflow denialSlot // every uid past maxDenialUIDs
}

type denialSlot struct {
	logged     time.Time
	suppressed int
}

// allow reports whether a denial of uid at now is logged, and how many of
// its denials were not since the last one logged.
func (d *denialLimiter) allow(uid uint32, now time.Time) (bool, int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	slot := d.byUID[uid]
	if slot == nil {
		if d.byUID == nil {
			d.byUID = map[uint32]*denialSlot{}
		}
		if len(d.byUID) >= maxDenialUIDs {
			for u, s := range d.byUID {
				if now.Sub(s.logged) >= denialLogEvery {
					delete(d.byUID, u)
				}
			}
		}
		if len(d.byUID) >= maxDenialUIDs {
			slot = &d.overflow
		} else {
			slot = &denialSlot{}
			d.byUID[uid] = slot
		}
	}
	if !slot.logged.IsZero() && now.Sub(slot.logged) < denialLogEvery {
		slot.suppressed++
		return false, 0
	}
	n := slot.suppressed
	slot.logged, slot.suppressed = now, 0
	return true, n
}

// denied logs err when it denies the caller an identity (PermissionDenied:
// no registration entry matches its selectors), and returns it.
func (h *handler) denied(ctx context.Context, caller *attestor.Caller, sels []selector.Selector, err error) error {
	if status.Code(err) != codes.PermissionDenied || caller == nil {
		return err
	}
	ok, suppressed := h.denials.allow(caller.UID, time.Now())
	if !ok {
		return err
	}
	method, _ := grpc.Method(ctx)
	logDenial(h.cfg.Log, method, caller, sels, suppressed)
	return err
}

func logDenial(log hclog.Logger, method string, caller *attestor.Caller, sels []selector.Selector, suppressed int) {
	log.Info("No registration entry matches the caller's selectors: no identity issued",
		"method", method, "pid", caller.PID, "uid", caller.UID, "gid", caller.GID,
		"selectors", loggedSelectors(sels), "denials_of_this_uid_not_logged", suppressed)
}

// loggedSelectors writes selectors for the log, at most
// maxLoggedSelectors of them, without the values of environment variables
// (docker:env:K=V), which may hold secrets.
func loggedSelectors(sels []selector.Selector) string {
	if len(sels) == 0 {
		return "none (no attestor found any)"
	}
	var b strings.Builder
	for i, s := range sels {
		if i == maxLoggedSelectors {
			b.WriteString(" and more")
			break
		}
		if i > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(s.Type)
		b.WriteByte(':')
		if env, ok := strings.CutPrefix(s.Value, "env:"); ok {
			key, _, _ := strings.Cut(env, "=")
			b.WriteString("env:" + key + "=(value not logged)")
			continue
		}
		b.WriteString(s.Value)
	}
	return b.String()
}
