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
	m := &SVIDManager{log: log, upstream: upstream, now: time.Now}
	// The parts read the clock through m, which tests replace.
	now := func() time.Time { return m.now() }
	m.health = newHealthSource(now)
	m.store = newEntryStore(log)
	m.signer = newSigner(log, upstream, now, m.health.reportUpstream)
	m.rotator = newRotator(log, now, m.store, m.signer)
	m.signer.deliver, m.signer.completed = m.delivered, m.signed
	m.jwts = newJWTIssuer(log, upstream, m.store, now, m.health.reportUpstream)
	m.persister = newPersister(log, now, m.store, m.health.reportSave)
	return m
}

// delivered stores what a signing batch produced.
func (m *SVIDManager) delivered(calls []*mintCall, svids []*X509SVID) {
	entries := make([]*Entry, len(calls))
	for i, call := range calls {
		entries[i] = call.entry
	}
	m.store.put(entries, svids)
}

// signed has the rotator look at every entry of a completed signing
// batch: a new SVID is scheduled, and one that could not be replaced is
// retried.
func (m *SVIDManager) signed(calls []*mintCall) {
	ids := make([]string, len(calls))
	kick := false
	for i, call := range calls {
		ids[i] = call.entry.ID
		kick = kick || !call.byRotator
	}
	m.rotator.reschedule(ids, kick)
}

// Ready is closed once the upstream has delivered entries and bundles.
func (m *SVIDManager) Ready() <-chan struct{} { return m.store.ready }

// Rotator is the service that renews X509-SVIDs.
func (m *SVIDManager) Rotator() *Rotator { return m.rotator }

// Persister is the service that saves the cache (see PersistTo).
func (m *SVIDManager) Persister() *Persister { return m.persister }

// PersistTo makes the cache save itself to dir (see Persister) and loads
// what an earlier run saved there.
func (m *SVIDManager) PersistTo(dir string, td spiffeid.TrustDomain) {
	m.rotator.wake(m.persister.loadFrom(dir, td)...)
}

// SetEntries replaces the registration entries. Unchanged entries keep their
// SVIDs; removed or reshaped ones lose them.
func (m *SVIDManager) SetEntries(entries []*Entry) {
	if m.store.setEntries(entries) {
		m.jwts.dropChanged()
	}
}

// SetBundles replaces the trust bundles. SVIDs that no longer chain to the
// local bundle are renewed at once.
func (m *SVIDManager) SetBundles(local *spiffebundle.Bundle, federated []*spiffebundle.Bundle) {
	change := m.store.setBundles(local, federated)
	if change.jwtKeys {
		m.jwts.dropAll()
	}
	m.rotator.wake(change.unchained...)
}

// ReportUpstream records the outcome of an upstream call: the agent reports
// degraded readiness while the upstream fails.
func (m *SVIDManager) ReportUpstream(err error) { m.health.reportUpstream(err) }

// ReportSave records the outcome of saving path, a file in the data
// directory: the agent reports degraded readiness while a save fails.
func (m *SVIDManager) ReportSave(path string, err error) { m.health.reportSave(path, err) }

// Health returns the agent's state of health.
func (m *SVIDManager) Health() Health {
	var h Health
	m.health.fill(&h)
	m.store.fillHealth(&h)
	h.JWTSVIDs = m.jwts.count()
	return h
}

// Subscribe returns a new subscription; Close it when done.
func (m *SVIDManager) Subscribe() *Subscription { return m.store.notifier.subscribe() }

// X509Identities returns the caller's X.509-SVIDs, minting those it does not
// hold yet. It returns ErrNoIdentity when no entry matches. Callers that
// match the same entries share one snapshot until something changes.
func (m *SVIDManager) X509Identities(ctx context.Context, sels []selector.Selector) (*X509Snapshot, error) {
	return m.x509Identities(ctx, sels, workloadView)
}

// DelegatedX509Identities is X509Identities as spire-agent's Delegated
// Identity API serves a delegate: every entry the workload matches, even
// those that share a hint, but for admin and downstream entries.
func (m *SVIDManager) DelegatedX509Identities(ctx context.Context, sels []selector.Selector) (*X509Snapshot, error) {
	return m.x509Identities(ctx, sels, delegatedView)
}

// BrokerX509Identities is X509Identities as spire-agent's SPIFFE Broker
// API serves a broker: one entry per hint, as to the workload itself, but
// for admin and downstream entries.
func (m *SVIDManager) BrokerX509Identities(ctx context.Context, sels []selector.Selector) (*X509Snapshot, error) {
	return m.x509Identities(ctx, sels, brokerView)
}

// entryView says which of the entries a caller matches it is served.
type entryView int

const (
	workloadView  entryView = iota // one per hint
	delegatedView                  // all but admin and downstream entries
	brokerView                     // one per hint, then all but admin and downstream entries
)

func (m *SVIDManager) x509Identities(ctx context.Context, sels []selector.Selector, view entryView) (*X509Snapshot, error) {
	if err := m.waitReady(ctx); err != nil {
		return nil, err
	}
	// Entries may change while minting; a few rounds settle it, and one
	// more may refresh SVIDs whose renewal was skipped.
	refreshed, resigned := false, false
	for range 4 {
		look, err := m.store.lookupX509(sels, view, m.now(), !refreshed && m.health.upstreamUp(), resigned)
		switch {
		case err != nil:
			return nil, err
		case len(look.missing) > 0:
			resigned = resigned || look.unchained
			// Failing to re-sign one that does not chain leaves it served:
			// the caller is no worse off than before.
			if err := m.mint(ctx, look.missing, look.unchained); err != nil && (!look.unchained || look.absent) {
				return nil, err
			}
			continue
		case len(look.stale) > 0:
			refreshed = true
			m.refresh(ctx, look.stale)
			continue
		}
		m.rotator.wake(look.wake...)
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
func (m *SVIDManager) refresh(ctx context.Context, entries []*Entry) {
	now := m.now()
	// Another caller may have refreshed it since the caller looked.
	mine, theirs := m.signer.claim(entries, func(e *Entry) bool {
		svid := m.store.svid(e.ID)
		return svid != nil && svid.renewalSkipped(now)
	})
	if len(mine) > 0 {
		// The signer's delivery has the rotator look at these entries
		// again whatever came of it: the caller may have stopped waiting
		// and been handed the old SVID, now served and due.
		mctx, cancel := m.rotator.detach(ctx)
		go func() {
			defer cancel()
			m.signer.mintBatch(mctx, mine)
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
func (m *SVIDManager) mint(ctx context.Context, entries []*Entry, unchained bool) error {
	now := m.now()
	mine, theirs := m.signer.claim(entries, func(e *Entry) bool {
		return !m.store.servable(e.ID, now, unchained)
	})
	if len(mine) > 0 {
		// Detached: other callers may be waiting on these signings.
		mctx, cancel := m.rotator.detach(ctx)
		m.signer.mintBatch(mctx, mine)
		cancel()
	}
	return wait(ctx, append(mine, theirs...))
}

// maxReadyWait bounds how long a call waits for the first entries and
// bundles before it is told Unavailable (and retries): waiting out the
// caller's own deadline would leave it nothing to tell the client.
const maxReadyWait = time.Second

func (m *SVIDManager) waitReady(ctx context.Context) error {
	select {
	case <-m.store.ready:
		return nil
	default:
	}
	timer := time.NewTimer(maxReadyWait)
	defer timer.Stop()
	select {
	case <-m.store.ready:
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
func (m *SVIDManager) Bundles(ctx context.Context, sels []selector.Selector, allowUnauthenticated bool) (*BundleSnapshot, error) {
	if err := m.waitReady(ctx); err != nil {
		return nil, err
	}
	return m.store.bundles(sels, allowUnauthenticated)
}

// AllBundles returns the local bundle and every federated one, for the
// admin API, whose delegates serve workloads of any entry.
func (m *SVIDManager) AllBundles(ctx context.Context) (*BundleSnapshot, error) {
	if err := m.waitReady(ctx); err != nil {
		return nil, err
	}
	return m.store.allBundles(), nil
}

// EntryIDs returns the SPIFFE IDs of every entry that matches sels, hints
// shared or not, and signs nothing: the admin API tells a delegate by
// them, as spire-agent does.
func (m *SVIDManager) EntryIDs(ctx context.Context, sels []selector.Selector) ([]spiffeid.ID, error) {
	if err := m.waitReady(ctx); err != nil {
		return nil, err
	}
	entries := m.store.matchAll(sels)
	ids := make([]spiffeid.ID, len(entries))
	for i, e := range entries {
		ids[i] = e.SPIFFEID
	}
	return ids, nil
}

// JWTSVIDs returns a JWT-SVID for audience for each of the caller's
// identities, or only for id when it is not zero. Tokens are reused until
// half their lifetime has passed.
func (m *SVIDManager) JWTSVIDs(ctx context.Context, sels []selector.Selector, audience []string, id spiffeid.ID) ([]*JWTSVID, error) {
	if err := m.waitReady(ctx); err != nil {
		return nil, err
	}
	entries := m.store.match(sels, id)
	if len(entries) == 0 {
		return nil, ErrNoIdentity
	}
	return m.jwts.forEntries(ctx, entries, audience)
}

// DelegatedJWTSVIDs is JWTSVIDs as spire-agent's Delegated Identity API
// serves a delegate: a JWT-SVID for every entry the workload matches,
// hints shared or not, admin entries too.
func (m *SVIDManager) DelegatedJWTSVIDs(ctx context.Context, sels []selector.Selector, audience []string) ([]*JWTSVID, error) {
	if err := m.waitReady(ctx); err != nil {
		return nil, err
	}
	entries := m.store.matchAll(sels)
	if len(entries) == 0 {
		return nil, ErrNoIdentity
	}
	return m.jwts.forEntries(ctx, entries, audience)
}

// ValidateJWTSVID checks a token against the bundle of its subject's trust
// domain and the audience. The caller may rely on the bundles it could fetch
// itself: the local one and those its entries federate with.
func (m *SVIDManager) ValidateJWTSVID(ctx context.Context, sels []selector.Selector, token, audience string) (*jwtsvid.SVID, error) {
	snap, err := m.Bundles(ctx, sels, true)
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
func (m *SVIDManager) AwaitIdentity(ctx context.Context, sels []selector.Selector, id spiffeid.ID) bool {
	ctx, cancel := context.WithTimeout(ctx, maxEntryWait)
	defer cancel()
	for ctx.Err() == nil {
		synced, err := m.upstream.Resync(ctx)
		if err != nil {
			if ctx.Err() == nil {
				m.log.Debug("Sync for a caller with no identity failed", "error", err)
			}
			return false
		}
		if !synced {
			return false
		}
		if len(m.store.match(sels, id)) > 0 {
			return true
		}
	}
	return false
}
