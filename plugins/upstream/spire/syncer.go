package spire

import (
	"context"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/agent"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/spire-api-sdk/proto/spire/api/types"
	"golang.org/x/sync/semaphore"
)

// syncer keeps the node's registration entries (entries.go) and the
// bundles (bundles.go) up to date with the server, every sync_interval and
// on demand (Resync), and hands what changed to the sink. New authorities
// go to agentIdentity, which verifies the server with them.
type syncer struct {
	log      hclog.Logger
	td       spiffeid.TrustDomain
	serverID spiffeid.ID
	// intervalNs is sync_interval; a SIGHUP may change it.
	intervalNs atomic.Int64
	client     *serverClient
	identity   *agentIdentity
	now        func() time.Time

	// lock serializes syncs, periodic and on demand, and guards the fields
	// below it. A caller of Resync stops waiting for it when its context
	// ends: a sync may take up to rpcTimeout while the server is
	// unreachable.
	lock      *semaphore.Weighted // of weight 1
	view      serverView
	sink      agent.Sink
	lastSync  time.Time // when the last sync started
	entrySets int64     // how many times entries were handed to the sink
	resync    resyncPolicy

	// resynced restarts the periodic timer after a sync on demand.
	resynced chan struct{}
	// fetched counts entries received in full, syncs the syncs started;
	// for tests and debugging.
	fetched atomic.Int64
	syncs   atomic.Int64
	// lastSuccess is when a sync last finished well (Unix ns), for the
	// Debug API.
	lastSuccess atomic.Int64
}

func newSyncer(log hclog.Logger, td spiffeid.TrustDomain, serverID spiffeid.ID, interval time.Duration, client *serverClient, identity *agentIdentity) *syncer {
	s := &syncer{
		log:      log,
		td:       td,
		serverID: serverID,
		client:   client,
		identity: identity,
		now:      time.Now,
		lock:     semaphore.NewWeighted(1),
		resync:   newResyncPolicy(interval),
		resynced: make(chan struct{}, 1),
	}
	s.intervalNs.Store(int64(interval))
	s.view.init()
	return s
}

// interval is sync_interval.
func (s *syncer) interval() time.Duration { return time.Duration(s.intervalNs.Load()) }

// setInterval takes a new sync_interval (SIGHUP): the next periodic sync
// is one new interval away.
func (s *syncer) setInterval(d time.Duration) {
	if time.Duration(s.intervalNs.Swap(int64(d))) != d {
		kick(s.resynced)
	}
}

// maxOutageRetry bounds the wait between syncs while no server answers,
// so that the agent is back within it of the first server's return. Each
// try costs a refused connection per address, while no server is up to
// pay for it.
const maxOutageRetry = 5 * time.Second

// serverView is the server's entries and bundles as the last syncs
// brought them; guarded by syncer.lock.
type serverView struct {
	entries       map[string]*syncedEntry
	entriesDirty  bool // changed since last handed to the sink
	unimplemented bool // the server lacks SyncAuthorizedEntries

	localProto   *types.Bundle
	local        *spiffebundle.Bundle
	fedProto     map[spiffeid.TrustDomain]*types.Bundle
	federated    map[spiffeid.TrustDomain]*spiffebundle.Bundle
	bundlesDirty bool

	taintedX509 map[string]bool // DER of authorities already acted on
	taintedJWT  map[string]bool // key IDs already acted on
	missingFed  map[spiffeid.TrustDomain]bool
	delivered   bool
}

func (v *serverView) init() {
	v.entries = map[string]*syncedEntry{}
	v.fedProto = map[spiffeid.TrustDomain]*types.Bundle{}
	v.federated = map[spiffeid.TrustDomain]*spiffebundle.Bundle{}
	v.taintedX509 = map[string]bool{}
	v.taintedJWT = map[string]bool{}
	v.missingFed = map[spiffeid.TrustDomain]bool{}
}

// attach makes sink the receiver of what the syncs bring, all of it again
// at the next sync.
func (s *syncer) attach(ctx context.Context, sink agent.Sink) bool {
	if s.lock.Acquire(ctx, 1) != nil {
		return false // ctx ended
	}
	s.sink = sink
	s.view.delivered = false
	s.lock.Release(1)
	return true
}

// run syncs every sync_interval, and sooner with backoff after errors,
// until ctx ends or the agent loses its identity for good. A sync on
// demand restarts the interval.
func (s *syncer) run(ctx context.Context, sink agent.Sink) error {
	bo := agent.NewBackoff(time.Second, max(30*time.Second, s.interval()))
	outage := agent.NewBackoff(time.Second, min(maxOutageRetry, s.interval()))
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case err := <-s.identity.fatal:
			sink.ReportUpstream(err)
			return err
		case <-s.resynced:
			timer.Reset(s.interval())
			continue
		case <-timer.C:
		}
		wait := s.interval()
		if s.lock.Acquire(ctx, 1) != nil {
			return nil // ctx ended
		}
		err := s.syncOnce(ctx, sink)
		s.lock.Release(1)
		if ctx.Err() != nil {
			return nil
		}
		sink.ReportUpstream(err)
		switch {
		case err == nil:
			bo.Reset()
			outage.Reset()
		case unreachable(err):
			// No server answered: trying again costs them nothing.
			wait = outage.Next()
			logRetry(s.log, "Could not reach the SPIRE Server to sync; retrying", wait, err)
		default:
			wait = bo.Next()
			logRetry(s.log, "Could not sync with the SPIRE Server; retrying", wait, err)
		}
		timer.Reset(wait)
	}
}

// Resync syncs now, for a workload that found no identity: its entry may
// have been created since the last sync. Syncs on demand are spaced (a
// twentieth of sync_interval after the previous sync for the first two of
// a run that finds nothing new, a fifth for the next ones; callers arriving
// meanwhile share the next one), spend a token of a budget of ten that
// earns one per sync_interval, and restart the periodic timer. So a burst
// of misses costs the server at most ten extra syncs; misses that go on for
// good are served one sync per sync_interval, each standing in for a
// periodic one, as from spire-agent (twice that at worst, when each miss
// comes just after a periodic sync). Syncs are incremental: the server
// lists revisions and sends only new entries. Without a token Resync
// returns false at once: the caller is answered from what the agent has.
func (s *syncer) Resync(ctx context.Context) (bool, error) {
	if !s.identity.isReady() {
		return false, nil
	}
	asked := s.now()
	if err := s.lock.Acquire(ctx, 1); err != nil {
		return false, err
	}
	s.resync.retune(s.interval())
	for {
		if s.sink == nil {
			s.lock.Release(1)
			return false, nil
		}
		if !s.lastSync.Before(asked) {
			// A sync started after the caller asked; it has finished, since
			// this holds the lock.
			s.lock.Release(1)
			return true, nil
		}
		wait := s.lastSync.Add(s.resync.minGap(s.now(), s.interval())).Sub(s.now())
		if wait <= 0 {
			break
		}
		s.lock.Release(1)
		if !sleep(ctx, wait) {
			return false, ctx.Err()
		}
		if err := s.lock.Acquire(ctx, 1); err != nil {
			return false, err
		}
	}
	defer s.lock.Release(1)
	if !s.resync.begin(s.now(), s.interval()) {
		return false, nil
	}
	sets := s.entrySets
	// Callers waiting on the lock share this sync: one caller leaving must
	// not cut it short.
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), rpcTimeout)
	err := s.syncOnce(sctx, s.sink)
	cancel()
	s.resync.end(s.entrySets != sets || err != nil)
	s.sink.ReportUpstream(err)
	kick(s.resynced)
	if err == nil && ctx.Err() != nil {
		return false, ctx.Err()
	}
	return err == nil, err
}

// syncOnce brings entries and bundles up to date and hands what changed to
// the sink: bundles first, so that an SVID that needs a new bundle never
// reaches a workload before it.
func (s *syncer) syncOnce(ctx context.Context, sink agent.Sink) error {
	st := &s.view
	start := s.now()
	s.lastSync = start
	s.syncs.Add(1)
	if err := s.syncEntries(ctx); err != nil {
		return err
	}
	if err := s.syncBundles(ctx); err != nil {
		return err
	}
	if st.bundlesDirty || !st.delivered {
		feds := make([]*spiffebundle.Bundle, 0, len(st.federated))
		for _, b := range st.federated {
			feds = append(feds, b)
		}
		sink.SetBundles(st.local, feds)
		st.bundlesDirty = false
	}
	s.applyTaints(sink)
	if st.entriesDirty || !st.delivered {
		list := make([]*agent.Entry, 0, len(st.entries))
		for _, se := range st.entries {
			if se.entry != nil {
				list = append(list, se.entry)
			}
		}
		sink.SetEntries(list)
		s.entrySets++
		st.entriesDirty = false
		s.log.Debug("Synced registration entries", "served", len(list), "authorized", len(st.entries), "took", s.now().Sub(start))
	}
	if !st.delivered {
		s.log.Info("First sync with the SPIRE Server done", "entries", len(st.entries), "federated_bundles", len(st.federated))
	}
	st.delivered = true
	s.lastSuccess.Store(s.now().UnixNano())
	return nil
}
