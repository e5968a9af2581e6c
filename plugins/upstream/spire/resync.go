package spire

import (
	"time"

	"golang.org/x/time/rate"
)

// The budget of syncs on demand. SPIRE Server refreshes the entries it
// serves agents every 5 s (its cache_reload_interval), so a just-created
// entry shows up at some point within that. Two quick syncs catch a server
// that has it already; then one a second finds it within a second of the
// server having it, and the ten tokens cover two such waits in a row at
// spire-agent's default sync_interval.
const (
	resyncBurst = 10
	// resyncEarnEvery: one token is earned per this many sync_intervals.
	resyncEarnEvery = 1
	// The first two syncs on demand of a run start at least
	// sync_interval/resyncFirstSpacingDivisor after the previous sync of
	// any kind, the next ones sync_interval/resyncSpacingDivisor.
	resyncFirstSpacingDivisor = 20
	resyncSpacingDivisor      = 5
)

// resyncPolicy decides when a sync on demand may start: the budget is one
// token bucket; the spacing grows while they find nothing new. Guarded by
// syncer.lock (the limiter guards itself).
type resyncPolicy struct {
	interval     time.Duration // the sync_interval the rest follows
	budget       *rate.Limiter
	firstSpacing time.Duration
	spacing      time.Duration
	streak       int       // syncs on demand since one brought new entries
	last         time.Time // when the last sync on demand started
}

func newResyncPolicy(interval time.Duration) resyncPolicy {
	return resyncPolicy{
		interval:     interval,
		budget:       rate.NewLimiter(rate.Every(resyncEarnEvery*interval), resyncBurst),
		firstSpacing: interval / resyncFirstSpacingDivisor,
		spacing:      interval / resyncSpacingDivisor,
	}
}

// retune follows a new sync_interval (SIGHUP).
func (p *resyncPolicy) retune(interval time.Duration) {
	if interval == p.interval {
		return
	}
	fresh := newResyncPolicy(interval)
	p.interval, p.firstSpacing, p.spacing = interval, fresh.firstSpacing, fresh.spacing
	p.budget.SetLimit(fresh.budget.Limit())
}

// minGap is how long after the previous sync the next sync on demand may
// start.
func (p *resyncPolicy) minGap(now time.Time, interval time.Duration) time.Duration {
	if p.streak < 2 || now.Sub(p.last) > interval {
		return p.firstSpacing
	}
	return p.spacing
}

// begin spends a token for a sync on demand starting now; false when the
// budget is spent.
func (p *resyncPolicy) begin(now time.Time, interval time.Duration) bool {
	if !p.budget.Allow() {
		return false
	}
	if now.Sub(p.last) > interval {
		p.streak = 0
	}
	p.last = now
	return true
}

// end records whether the sync brought new entries (or failed): either
// starts the spacing over.
func (p *resyncPolicy) end(changed bool) {
	if changed {
		p.streak = 0
	} else {
		p.streak++
	}
}
