package agent

import (
	"container/heap"
	"context"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/telemetry"
)

// svidState is where an X509-SVID stands in its life, which decides what
// the rotator does with it.
type svidState uint8

const (
	// svidValid: before its renewal time; looked at again then.
	svidValid svidState = iota
	// svidRenewDue: past its renewal time and served: renewed now.
	svidRenewDue
	// svidTainted: must be replaced now, at any age: its CA left the
	// bundle or its signer was tainted. Renewed if served, else dropped.
	svidTainted
	// svidExpired: past NotAfter. Renewed if served, else dropped.
	svidExpired
	// svidUnused: past its renewal time but no workload fetched it since it
	// was signed (its workload is gone): not renewed, served until it
	// expires, then dropped, so that a node holds the SVIDs of the
	// workloads that run there, not of every one that ever did.
	svidUnused
)

func (s *X509SVID) state(now time.Time) svidState {
	switch {
	case s.replace.Load():
		return svidTainted
	case !now.Before(s.NotAfter):
		return svidExpired
	case now.Before(s.RenewAt):
		return svidValid
	case !s.served.Load():
		return svidUnused
	default:
		return svidRenewDue
	}
}

// renewalDue reports whether the rotator must re-sign the SVID now: a
// workload was handed it, and it is past its renewal time, expired or
// marked for replacement.
func (s *X509SVID) renewalDue(now time.Time) bool {
	return s.served.Load() && s.state(now) != svidValid
}

// Rotator renews X509-SVIDs as they come due. It keeps one item per entry
// in a priority queue keyed on the time the entry's SVID must be looked at
// again (its renewal time, or its expiry while unused), so that a wake-up
// reads only what is due, not every SVID.
type Rotator struct {
	log    hclog.Logger
	now    func() time.Time
	store  *entryStore
	signer *signer

	mu      sync.Mutex
	queue   renewQueue
	byEntry map[string]*renewItem

	kick chan struct{}
	// retry spaces the renewals after one failed (the upstream is down).
	retry *Backoff
	// stopped ends when Run returns: signing detached from its caller (see
	// detach) ends with it, so that no signing outlives the agent's stop.
	stopped context.Context
	stop    context.CancelFunc
	// metrics records renewals; set before Run, nil records nothing.
	metrics *telemetry.Metrics
}

func newRotator(log hclog.Logger, now func() time.Time, store *entryStore, signer *signer) *Rotator {
	stopped, stop := context.WithCancel(context.Background())
	return &Rotator{
		log: log, now: now, store: store, signer: signer,
		byEntry: map[string]*renewItem{},
		kick:    make(chan struct{}, 1),
		retry:   NewBackoff(time.Second, 30*time.Second),
		stopped: stopped,
		stop:    stop,
	}
}

// Name names the service.
func (r *Rotator) Name() string { return "svid-rotator" }

// wake has the rotator look at the entries' SVIDs now: they were signed,
// marked for replacement, or served for the first time past their renewal.
func (r *Rotator) wake(entryIDs ...string) {
	r.reschedule(entryIDs, true)
}

// reschedule puts the entries first in the queue, and wakes the loop when
// kick: the loop itself renewed them otherwise, and sees the outcome (a
// failure waits out its backoff).
func (r *Rotator) reschedule(entryIDs []string, kick bool) {
	if len(entryIDs) == 0 {
		return
	}
	r.mu.Lock()
	for _, id := range entryIDs {
		r.setLocked(id, time.Time{})
	}
	r.mu.Unlock()
	if kick {
		r.kickLoop()
	}
}

// setLocked schedules the entry at t, the zero time for now.
func (r *Rotator) setLocked(id string, t time.Time) {
	if it := r.byEntry[id]; it != nil {
		it.at = t
		heap.Fix(&r.queue, it.index)
		return
	}
	it := &renewItem{entryID: id, at: t}
	r.byEntry[id] = it
	heap.Push(&r.queue, it)
}

func (r *Rotator) popLocked() {
	it := heap.Pop(&r.queue).(*renewItem)
	delete(r.byEntry, it.entryID)
}

func (r *Rotator) kickLoop() {
	select {
	case r.kick <- struct{}{}:
	default:
	}
}

// Run renews SVIDs as they reach their renewal time, until ctx ends. A
// failed renewal keeps the old SVID and is retried with capped backoff.
func (r *Rotator) Run(ctx context.Context) error {
	defer r.stop()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	// backingOff lasts from a failed renewal until the timer fires. The
	// failed entries stay due (their completion put them first), and a
	// kick meanwhile (during an outage, one from every caller whose own
	// signing failed) must not have the loop try the upstream sooner:
	// what it was kicked for waits in the queue until the backoff ends.
	backingOff := false
	for {
		if !backingOff {
			now := r.now()
			due, unused, next := r.takeDue(now)
			if n := r.store.dropUnused(unused); n > 0 {
				r.log.Debug("Dropped X509-SVIDs no workload fetched since they were signed", "count", n)
			}
			if len(due) > 0 {
				if r.renew(ctx, due) {
					r.retry.Reset()
					continue
				}
				next, backingOff = now.Add(r.retry.Next()), true
			}
			timer.Reset(next.Sub(now))
		}
		select {
		case <-ctx.Done():
			return nil
		case <-timer.C:
			backingOff = false
		case <-r.kick:
		}
	}
}

// takeDue takes the entries whose SVIDs are due for renewal and the unused
// SVIDs to drop, and returns when the next item comes due.
func (r *Rotator) takeDue(now time.Time) (due []*Entry, unused []*X509SVID, next time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for len(r.queue) > 0 && !r.queue[0].at.After(now) {
		it := r.queue[0]
		svid := r.store.svid(it.entryID)
		if svid == nil {
			r.popLocked()
			continue
		}
		switch svid.state(now) {
		case svidValid:
			it.at = svid.RenewAt
			heap.Fix(&r.queue, 0)
			continue
		case svidUnused:
			it.at = svid.NotAfter
			heap.Fix(&r.queue, 0)
			continue
		case svidTainted, svidExpired:
			if !svid.served.Load() {
				unused = append(unused, svid)
				r.popLocked()
				continue
			}
		}
		r.popLocked()
		// One being signed is woken again when that signing ends.
		if e := r.store.entry(it.entryID); e != nil && !r.signer.signing(e.ID) {
			due = append(due, e)
		}
	}
	next = now.Add(time.Hour)
	if len(r.queue) > 0 && r.queue[0].at.Before(next) {
		next = r.queue[0].at
	}
	return due, unused, next
}

// renew re-signs the due entries' SVIDs; it reports whether all succeeded.
func (r *Rotator) renew(ctx context.Context, due []*Entry) bool {
	// Those another caller started signing since takeDue are theirs, and
	// those it re-signed since (after a new CA) are no longer due.
	now := r.now()
	mine, _ := r.signer.claim(due, func(e *Entry) bool {
		svid := r.store.svid(e.ID)
		return svid != nil && svid.renewalDue(now)
	})
	for _, call := range mine {
		call.byRotator = true
	}
	mctx, cancel := context.WithTimeout(ctx, mintTimeout)
	defer cancel()
	r.signer.mintBatch(mctx, mine)
	ok := true
	for _, call := range mine {
		if call.err != nil {
			ok = false
		}
		r.metrics.SVIDRenewed(call.entry.SPIFFEID.TrustDomain().Name(), call.err)
	}
	if len(mine) > 0 {
		r.log.Debug("Renewed X509-SVIDs", "count", len(mine), "all_ok", ok)
	}
	return ok
}

// detach returns the context of a signing that outlives the caller that
// started it, so that the other callers waiting on it are not failed; it
// ends after mintTimeout or when Run returns (at once if it has), so that
// a hung upstream holds no caller, and no stop, past the agent's stop.
func (r *Rotator) detach(ctx context.Context) (context.Context, context.CancelFunc) {
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), mintTimeout)
	unhook := context.AfterFunc(r.stopped, cancel)
	return dctx, func() {
		unhook()
		cancel()
	}
}

// renewItem is an entry whose SVID the rotator looks at again at at.
type renewItem struct {
	entryID string
	at      time.Time
	index   int
}

// renewQueue is a min-heap of renewItems by at.
type renewQueue []*renewItem

func (q renewQueue) Len() int           { return len(q) }
func (q renewQueue) Less(i, j int) bool { return q[i].at.Before(q[j].at) }
func (q renewQueue) Swap(i, j int) {
	q[i], q[j] = q[j], q[i]
	q[i].index, q[j].index = i, j
}
func (q *renewQueue) Push(x any) {
	it := x.(*renewItem)
	it.index = len(*q)
	*q = append(*q, it)
}
func (q *renewQueue) Pop() any {
	old := *q
	it := old[len(old)-1]
	old[len(old)-1] = nil
	*q = old[:len(old)-1]
	return it
}
