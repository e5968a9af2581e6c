package agent

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/attestor/selector"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
)

// ErrNoIdentity means no registration entry matches the caller's selectors.
var ErrNoIdentity = errors.New("no identity issued")

// ErrNotReady means the upstream has not delivered entries and bundles yet.
var ErrNotReady = errors.New("the agent has no entries and bundles from its upstream yet")

// SVIDManager keeps workloads supplied with SVIDs and bundles. It is what
// the Workload API and the upstream talk to: it answers callers from the
// entry store, has the signer sign what is missing, and takes the
// upstream's entries, bundles and reports (it is the Sink). Its parts, each
// with one job: the entry store (store.go) with its notifier, the signer,
// the rotator, the JWT issuer, the persister and the health source.
type SVIDManager struct {
	log      hclog.Logger
	upstream Upstream
	now      func() time.Time

	store     *entryStore
	signer    *signer
	rotator   *Rotator
	jwts      *jwtIssuer
	health    *healthSource
	persister *Persister
}

// NewSVIDManager returns an empty SVID manager that signs through upstream.
func NewSVIDManager(log hclog.Logger, upstream Upstream) *SVIDManager {
	c := &SVIDManager{log: log, upstream: upstream, now: time.Now}
	// The parts read the clock through c, which tests replace.
	now := func() time.Time { return c.now() }
	c.health = newHealthSource(now)
	c.store = newEntryStore(log)
	c.signer = newSigner(log, upstream, now, c.health.reportUpstream)
	c.rotator = newRotator(log, now, c.store, c.signer)
	c.signer.deliver, c.signer.completed = c.delivered, c.signed
	c.jwts = newJWTIssuer(log, upstream, c.store, now, c.health.reportUpstream)
	c.persister = newPersister(log, now, c.store, c.health.reportSave)
	return c
}

// delivered stores what a signing batch produced.
func (c *SVIDManager) delivered(calls []*mintCall, svids []*X509SVID) {
	entries := make([]*Entry, len(calls))
	for i, call := range calls {
		entries[i] = call.entry
	}
	c.store.put(entries, svids)
}

// signed has the rotator look at every entry of a completed signing
// batch: a new SVID is scheduled, and one that could not be replaced is
// retried.
func (c *SVIDManager) signed(calls []*mintCall) {
	ids := make([]string, len(calls))
	kick := false
	for i, call := range calls {
		ids[i] = call.entry.ID
		kick = kick || !call.byRotator
	}
	c.rotator.reschedule(ids, kick)
}

// Ready is closed once the upstream has delivered entries and bundles.
func (c *SVIDManager) Ready() <-chan struct{} { return c.store.ready }

// Rotator is the service that renews X509-SVIDs.
func (c *SVIDManager) Rotator() *Rotator { return c.rotator }

// Persister is the service that saves the cache (see PersistTo).
func (c *SVIDManager) Persister() *Persister { return c.persister }

// PersistTo makes the cache save itself to dir (see Persister) and loads
// what an earlier run saved there.
func (c *SVIDManager) PersistTo(dir string, td spiffeid.TrustDomain) {
	c.rotator.wake(c.persister.loadFrom(dir, td)...)
}

// SetEntries replaces the registration entries. Unchanged entries keep their
// SVIDs; removed or reshaped ones lose them.
func (c *SVIDManager) SetEntries(entries []*Entry) {
	if c.store.setEntries(entries) {
		c.jwts.dropChanged()
	}
}

// SetBundles replaces the trust bundles. SVIDs that no longer chain to the
// local bundle are renewed at once.
func (c *SVIDManager) SetBundles(local *spiffebundle.Bundle, federated []*spiffebundle.Bundle) {
	change := c.store.setBundles(local, federated)
	if change.jwtKeys {
		c.jwts.dropAll()
	}
	c.rotator.wake(change.unchained...)
}

// ReportUpstream records the outcome of an upstream call: the agent reports
// degraded readiness while the upstream fails.
func (c *SVIDManager) ReportUpstream(err error) { c.health.reportUpstream(err) }

// ReportSave records the outcome of saving path, a file in the data
// directory: the agent reports degraded readiness while a save fails.
func (c *SVIDManager) ReportSave(path string, err error) { c.health.reportSave(path, err) }

// Health returns the agent's state of health.
func (c *SVIDManager) Health() Health {
	var h Health
	c.health.fill(&h)
	c.store.fillHealth(&h)
	return h
}

// Subscribe returns a new subscription; Close it when done.
func (c *SVIDManager) Subscribe() *Subscription { return c.store.notifier.subscribe() }

// X509Identities returns the caller's X.509-SVIDs, minting those it does not
// hold yet. It returns ErrNoIdentity when no entry matches. Callers that
// match the same entries share one snapshot until something changes.
func (c *SVIDManager) X509Identities(ctx context.Context, sels []selector.Selector) (*X509Snapshot, error) {
	if err := c.waitReady(ctx); err != nil {
		return nil, err
	}
	// Entries may change while minting; a few rounds settle it, and one
	// more may refresh SVIDs whose renewal was skipped.
	refreshed, resigned := false, false
	for range 4 {
		look, err := c.store.lookupX509(sels, c.now(), !refreshed && c.health.upstreamUp(), resigned)
		switch {
		case err != nil:
			return nil, err
		case len(look.missing) > 0:
			resigned = resigned || look.unchained
			// Failing to re-sign one that does not chain leaves it served:
			// the caller is no worse off than before.
			if err := c.mint(ctx, look.missing, look.unchained); err != nil && (!look.unchained || look.absent) {
				return nil, err
			}
			continue
		case len(look.stale) > 0:
			refreshed = true
			c.refresh(ctx, look.stale)
			continue
		}
		c.rotator.wake(look.wake...)
		return look.snap, nil
	}
	return nil, fmt.Errorf("registration entries kept changing while their SVIDs were signed")
}

// refreshWait bounds how long a caller waits for SVIDs refreshed for it
// (see refresh); after that it gets the ones it would have had.
const refreshWait = 2 * time.Second

// refresh re-signs the SVIDs of entries for a caller that would otherwise
// be handed SVIDs whose renewal was skipped, so that it gets as much
// lifetime as from an SVID kept renewed. It waits at most refreshWait:
// signing goes on detached until it ends or the rotator stops, and a caller
// that stops waiting (or whose refresh fails, the upstream being down) is
// served the still-valid SVIDs.
func (c *SVIDManager) refresh(ctx context.Context, entries []*Entry) {
	now := c.now()
	// Another caller may have refreshed it since the caller looked.
	mine, theirs := c.signer.claim(entries, func(e *Entry) bool {
		svid := c.store.svid(e.ID)
		return svid != nil && svid.renewalSkipped(now)
	})
	if len(mine) > 0 {
		// The signer's delivery has the rotator look at these entries
		// again whatever came of it: the caller may have stopped waiting
		// and been handed the old SVID, now served and due.
		mctx, cancel := c.rotator.detach(ctx)
		go func() {
			defer cancel()
			c.signer.mintBatch(mctx, mine)
		}()
	}
	timer := time.NewTimer(refreshWait)
	defer timer.Stop()
	for _, call := range append(mine, theirs...) {
		select {
		case <-call.done:
		case <-timer.C:
			return
		case <-ctx.Done():
			return
		}
	}
}

// mint signs SVIDs for entries that have none (or, when unchained, none
// that chains to the local bundle), sharing in-flight work with other
// callers that need the same entries.
func (c *SVIDManager) mint(ctx context.Context, entries []*Entry, unchained bool) error {
	now := c.now()
	mine, theirs := c.signer.claim(entries, func(e *Entry) bool {
		return !c.store.servable(e.ID, now, unchained)
	})
	if len(mine) > 0 {
		mctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), mintTimeout)
		c.signer.mintBatch(mctx, mine)
		cancel()
	}
	return wait(ctx, append(mine, theirs...))
}

// maxReadyWait bounds how long a call waits for the first entries and
// bundles before it is told Unavailable (and retries): waiting out the
// caller's own deadline would leave it nothing to tell the client.
const maxReadyWait = time.Second

func (c *SVIDManager) waitReady(ctx context.Context) error {
	select {
	case <-c.store.ready:
		return nil
	default:
	}
	timer := time.NewTimer(maxReadyWait)
	defer timer.Stop()
	select {
	case <-c.store.ready:
		return nil
	case <-timer.C:
		return ErrNotReady
	case <-ctx.Done():
		return ErrNotReady
	}
}

// Bundles returns the bundles a caller may see: the local one and those its
// entries federate with. A caller with no entry gets ErrNoIdentity unless
// allowUnauthenticated, in which case it sees every bundle.
func (c *SVIDManager) Bundles(ctx context.Context, sels []selector.Selector, allowUnauthenticated bool) (*BundleSnapshot, error) {
	if err := c.waitReady(ctx); err != nil {
		return nil, err
	}
	return c.store.bundles(sels, allowUnauthenticated)
}

// JWTSVIDs returns a JWT-SVID for audience for each of the caller's
// identities, or only for id when it is not zero. Tokens are reused until
// half their lifetime has passed.
func (c *SVIDManager) JWTSVIDs(ctx context.Context, sels []selector.Selector, audience []string, id spiffeid.ID) ([]*JWTSVID, error) {
	if err := c.waitReady(ctx); err != nil {
		return nil, err
	}
	entries := c.store.match(sels, id)
	if len(entries) == 0 {
		return nil, ErrNoIdentity
	}
	return c.jwts.forEntries(ctx, entries, audience)
}

// ValidateJWTSVID checks a token against the bundle of its subject's trust
// domain and the audience. The caller may rely on the bundles it could fetch
// itself: the local one and those its entries federate with.
func (c *SVIDManager) ValidateJWTSVID(ctx context.Context, sels []selector.Selector, token, audience string) (*jwtsvid.SVID, error) {
	snap, err := c.Bundles(ctx, sels, true)
	if err != nil {
		return nil, err
	}
	return validateJWT(snap, token, audience)
}

// maxEntryWait bounds how long AwaitIdentity holds a caller.
const maxEntryWait = 8 * time.Second

// AwaitIdentity holds a caller that matched no entry (for id, when not
// zero) while the upstream syncs on its behalf: its entry may have been
// created since the last sync, and a workload that starts right after its
// entry is a common case (a pod and its entry made together). It reports
// whether an entry now matches; it gives up when the upstream declines to
// sync (its rate limit), after maxEntryWait, or when ctx ends, so a caller
// with no entry anywhere is answered PermissionDenied at most that late.
func (c *SVIDManager) AwaitIdentity(ctx context.Context, sels []selector.Selector, id spiffeid.ID) bool {
	ctx, cancel := context.WithTimeout(ctx, maxEntryWait)
	defer cancel()
	for ctx.Err() == nil {
		synced, err := c.upstream.Resync(ctx)
		if err != nil {
			if ctx.Err() == nil {
				c.log.Debug("Sync for a caller with no identity failed", "error", err)
			}
			return false
		}
		if !synced {
			return false
		}
		if len(c.store.match(sels, id)) > 0 {
			return true
		}
	}
	return false
}
