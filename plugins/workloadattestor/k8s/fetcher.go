package k8s

import (
	"context"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
)

const (
	// maxStaleAge is how long the last good list still answers while the
	// kubelet fails: long enough to ride out a kubelet restart, short
	// enough that a label removed from a pod stops counting soon.
	maxStaleAge = 2 * time.Minute
	// failureLogEvery spaces the log lines of a kubelet that keeps failing
	// the same way.
	failureLogEvery = 30 * time.Second
)

// podLists shares the kubelet's pod list among attestations: one fetch at
// a time serves every attestation waiting; the starts of two fetches are
// at least the poll interval apart; a list answers every attestation that
// has not yet searched it until the next fetch may start; and a failed
// fetch leaves the last good list in place.
//
// No goroutine lives longer than one fetch: a fetch runs when an
// attestation needs one, so an idle agent (or one whose attestor a reload
// replaced) does nothing.
type podLists struct {
	fetch    func(context.Context) (*podList, error)
	interval time.Duration
	log      hclog.Logger

	mu        sync.Mutex
	current   *podList   // the last good list
	version   uint64     // of current
	lastStart time.Time  // of the last fetch, good or not
	pending   *fetchCall // scheduled or running; nil when none
	// failure logging
	failing    bool
	loggedErr  string
	loggedWhen time.Time
}

// fetchCall is one fetch and the attestations waiting for it.
type fetchCall struct {
	done    chan struct{}
	waiters int
	started bool
	// abandon ends a fetch still waiting for its start when every waiter
	// has left.
	abandon chan struct{}
	list    *podList // the new list, or the last good one after a failure
	err     error
}

func newPodLists(fetch func(context.Context) (*podList, error), interval time.Duration, log hclog.Logger) *podLists {
	return &podLists{fetch: fetch, interval: interval, log: log}
}

// next returns a list newer than version after: the current one while no
// newer fetch may start, else the next fetch's. When that fetch fails it
// returns the error and the last good list if it is younger than
// maxStaleAge (nil otherwise), which may be one the caller has seen.
func (f *podLists) next(ctx context.Context, after uint64) (*podList, error) {
	f.mu.Lock()
	now := time.Now()
	if cur := f.current; cur != nil && cur.version > after && now.Before(cur.fetched.Add(f.interval)) {
		f.mu.Unlock()
		return cur, nil
	}
	call := f.pending
	if call == nil {
		call = &fetchCall{done: make(chan struct{}), abandon: make(chan struct{})}
		f.pending = call
		delay := time.Duration(0)
		if !f.lastStart.IsZero() {
			delay = f.lastStart.Add(f.interval).Sub(now)
		}
		go f.run(call, delay)
	}
	call.waiters++
	f.mu.Unlock()

	select {
	case <-call.done:
		return call.list, call.err
	case <-ctx.Done():
		f.mu.Lock()
		call.waiters--
		if call.waiters == 0 && !call.started && f.pending == call {
			// Nobody wants it any more; a fetch that has started still
			// finishes, for whoever asks next.
			f.pending = nil
			close(call.abandon)
		}
		f.mu.Unlock()
		return nil, ctx.Err()
	}
}

// run waits for the fetch's start time, fetches, and publishes the
// result. The fetch is bounded by its own timeout, not by any one
// caller's context: it serves them all.
func (f *podLists) run(call *fetchCall, delay time.Duration) {
	if delay > 0 {
		t := time.NewTimer(delay)
		select {
		case <-t.C:
		case <-call.abandon:
			t.Stop()
			return
		}
	}
	f.mu.Lock()
	if f.pending != call {
		f.mu.Unlock()
		return // abandoned as the timer fired
	}
	call.started = true
	start := time.Now()
	f.lastStart = start
	f.mu.Unlock()

	list, err := f.fetch(context.Background())

	f.mu.Lock()
	if err == nil {
		f.version++
		list.version, list.fetched = f.version, start
		f.current = list
		f.recovered(list)
	} else {
		f.failed(err, start)
		if cur := f.current; cur != nil && start.Sub(cur.fetched) < maxStaleAge {
			list = cur
		}
	}
	call.list, call.err = list, err
	f.pending = nil
	f.mu.Unlock()
	close(call.done)
}

// failed logs a fetch failure: at once when it is new, then at most every
// failureLogEvery. f.mu is held.
func (f *podLists) failed(err error, now time.Time) {
	msg := err.Error()
	if f.failing && msg == f.loggedErr && now.Sub(f.loggedWhen) < failureLogEvery {
		return
	}
	f.failing, f.loggedErr, f.loggedWhen = true, msg, now
	f.log.Error("Cannot get the pod list from the kubelet; k8s selectors wait for it", "error", err)
}

func (f *podLists) recovered(list *podList) {
	if f.failing {
		f.failing, f.loggedErr = false, ""
		f.log.Info("The kubelet answers again", "pods", len(list.pods), "bytes", list.size)
	}
}
