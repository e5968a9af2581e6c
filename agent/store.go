package agent

import (
	"cmp"
	"maps"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/attestor/selector"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// entryStore holds the registration entries and bundles from the upstream
// and the X509-SVIDs minted for them; it matches callers to entries and
// builds the snapshots the Workload API sends. It does not sign: the signer
// hands it SVIDs, the rotator asks it which to replace.
type entryStore struct {
	log      hclog.Logger
	notifier notifier

	mu        sync.RWMutex
	entries   entrySet
	local     *Bundle
	federated map[spiffeid.TrustDomain]*Bundle
	svids     map[string]*X509SVID
	// tainted holds the X.509 authorities the upstream tainted that are
	// still in the local bundle (nil when none), so that an SVID one of
	// them signed is marked for replacement when it lands, not only when
	// it was held at the taint: its signing may have been in flight.
	tainted *Bundle

	haveEntries, haveBundles bool
	ready                    chan struct{}

	// gen counts the changes a snapshot or the saved cache shows; it is
	// changed under mu's write lock.
	gen atomic.Uint64
	// snapshots memoizes the X509Snapshot of each list of matched entries
	// for the current gen, so that streams woken by one change share one
	// snapshot and its encoding. Replaced at every change, so that it
	// never holds SVIDs (and their keys) the store has replaced or dropped.
	snapshots atomic.Pointer[sync.Map]
}

func newEntryStore(log hclog.Logger) *entryStore {
	s := &entryStore{
		log:       log,
		federated: map[spiffeid.TrustDomain]*Bundle{},
		svids:     map[string]*X509SVID{},
		ready:     make(chan struct{}),
	}
	s.snapshots.Store(&sync.Map{})
	s.notifier.gen = &s.gen
	return s
}

// changedLocked records a change: snapshots and the saved cache are stale.
func (s *entryStore) changedLocked() {
	s.gen.Add(1)
	s.snapshots.Store(&sync.Map{})
}

// setEntries replaces the registration entries. Unchanged entries keep their
// SVIDs; removed or reshaped ones lose them. It reports whether anything
// changed.
func (s *entryStore) setEntries(entries []*Entry) bool {
	s.mu.Lock()
	sorted, changed := sortEntries(entries, s.entries.byID)
	if !changed && s.haveEntries {
		s.mu.Unlock()
		return false
	}
	next := newEntrySet(sorted)
	for id := range s.svids {
		if e, old := next.get(id), s.entries.get(id); e == nil || old == nil || !e.sameSVIDShape(old) {
			delete(s.svids, id)
		}
	}
	s.entries = next
	s.haveEntries = true
	s.changedLocked()
	s.markReadyLocked()
	s.mu.Unlock()
	s.notifier.all()
	return true
}

// bundleChange is what setBundles changed.
type bundleChange struct {
	// jwtKeys: the local bundle's JWT authorities changed.
	jwtKeys bool
	// unchained are the entries whose SVIDs no longer chain to the local
	// bundle: they are marked for replacement.
	unchained []string
}

// setBundles replaces the trust bundles. SVIDs that no longer chain to the
// local bundle are marked for replacement.
func (s *entryStore) setBundles(local *spiffebundle.Bundle, federated []*spiffebundle.Bundle) bundleChange {
	var out bundleChange
	s.mu.Lock()
	changed := false
	if s.local == nil || !s.local.Equal(local) {
		if b, err := newBundle(local); err != nil {
			s.log.Error("Ignoring the local bundle from the upstream", "error", err)
		} else {
			out.jwtKeys = s.local == nil || !jwtAuthoritiesEqual(s.local.Bundle, local)
			s.local, changed = b, true
			s.tainted = keepTainted(s.tainted, local)
			for id, svid := range s.svids {
				if !svid.chainsTo(b) {
					svid.replace.Store(true)
					out.unchained = append(out.unchained, id)
				}
			}
		}
	}
	if s.local == nil {
		s.mu.Unlock()
		return out
	}
	next := make(map[spiffeid.TrustDomain]*Bundle, len(federated))
	for _, fb := range federated {
		td := fb.TrustDomain()
		if td == local.TrustDomain() {
			continue
		}
		if old, ok := s.federated[td]; ok && old.Equal(fb) {
			next[td] = old
			continue
		}
		b, err := newBundle(fb)
		if err != nil {
			s.log.Error("Ignoring a federated bundle from the upstream", "trust_domain", td, "error", err)
			continue
		}
		next[td], changed = b, true
	}
	if len(next) != len(s.federated) {
		changed = true
	}
	s.federated = next
	s.haveBundles = true
	s.markReadyLocked()
	if changed {
		s.changedLocked()
	}
	s.mu.Unlock()
	if changed {
		s.notifier.all()
	}
	return out
}

func jwtAuthoritiesEqual(a, b *spiffebundle.Bundle) bool {
	ak, bk := a.JWTAuthorities(), b.JWTAuthorities()
	if len(ak) != len(bk) {
		return false
	}
	for kid, key := range ak {
		if other, ok := bk[kid]; !ok || !publicKeyMatches(key, other) {
			return false
		}
	}
	return true
}

func (s *entryStore) markReadyLocked() {
	if s.haveEntries && s.haveBundles {
		select {
		case <-s.ready:
		default:
			close(s.ready)
		}
	}
}

// matchLocked returns the entries whose selectors are all among sels,
// oldest first, one per hint: what a workload is served.
func (s *entryStore) matchLocked(sels []selector.Selector) []*Entry {
	return dropDuplicateHints(s.matchAllLocked(sels))
}

// matchDelegatedLocked is what spire-agent's Delegated Identity API serves
// a delegate of a workload with sels: every matching entry, hints shared
// or not, but for admin and downstream entries.
func (s *entryStore) matchDelegatedLocked(sels []selector.Selector) []*Entry {
	return slices.DeleteFunc(s.matchAllLocked(sels), (*Entry).adminOrDownstream)
}

// adminOrDownstream reports whether e is an entry whose X509-SVID
// spire-agent keeps from delegates and brokers: it manages the SPIRE
// Server, or it signs a downstream CA.
func (e *Entry) adminOrDownstream() bool { return e.Admin || e.Downstream }

// matchAllLocked returns every entry whose selectors are all among sels,
// oldest first.
func (s *entryStore) matchAllLocked(sels []selector.Selector) []*Entry {
	var matched []*Entry
	if len(sels) == 0 {
		return nil
	}
	seen := make(map[*Entry]int, 4)
	for i, sel := range sels {
		// A repeated selector must not count twice towards an entry.
		if slices.Contains(sels[:i], sel) {
			continue
		}
		for e := range s.entries.withSelector(sel) {
			seen[e]++
			if seen[e] == len(e.Selectors) {
				matched = append(matched, e)
			}
		}
	}
	slices.SortFunc(matched, func(a, b *Entry) int {
		return cmp.Or(cmp.Compare(a.CreatedAt, b.CreatedAt), strings.Compare(a.ID, b.ID))
	})
	return matched
}

// match returns the entries that match sels, keeping those for id only
// when it is not zero.
func (s *entryStore) match(sels []selector.Selector, id spiffeid.ID) []*Entry {
	s.mu.RLock()
	entries := s.matchLocked(sels)
	s.mu.RUnlock()
	if !id.IsZero() {
		entries = slices.DeleteFunc(entries, func(e *Entry) bool { return e.SPIFFEID != id })
	}
	return entries
}

// matchAll returns every entry that matches sels, hints shared or not.
func (s *entryStore) matchAll(sels []selector.Selector) []*Entry {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.matchAllLocked(sels)
}

// dropDuplicateHints keeps, of entries sharing a hint, only the oldest: a
// hint is unique within a response, and the entries left out are neither
// signed nor bring their federated bundles.
func dropDuplicateHints(entries []*Entry) []*Entry {
	var hints map[string]struct{}
	return slices.DeleteFunc(entries, func(e *Entry) bool {
		if e.Hint == "" {
			return false
		}
		if _, dup := hints[e.Hint]; dup {
			return true
		}
		if hints == nil {
			hints = map[string]struct{}{}
		}
		hints[e.Hint] = struct{}{}
		return false
	})
}

// entry returns the current entry with this ID, or nil.
func (s *entryStore) entry(id string) *Entry {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.entries.get(id)
}

// svid returns the SVID held for the entry, or nil.
func (s *entryStore) svid(entryID string) *X509SVID {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.svids[entryID]
}

// servable reports whether the entry holds an unexpired SVID that, when
// chained, chains to the local bundle.
func (s *entryStore) servable(entryID string, now time.Time, chained bool) bool {
	s.mu.RLock()
	defer s.mu.RUnlock()
	svid := s.svids[entryID]
	return svid != nil && now.Before(svid.NotAfter) && (!chained || svid.chainsTo(s.local))
}

// holdsJWTKey reports whether kid is a JWT authority of the local bundle.
func (s *entryStore) holdsJWTKey(kid string) bool {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.local.holdsJWTKey(kid)
}

// put stores the SVIDs signed for entries, except those whose entry changed
// shape meanwhile, wakes the streams that hold them, and returns the
// entries stored.
func (s *entryStore) put(entries []*Entry, svids []*X509SVID) []string {
	var stored []string
	s.mu.Lock()
	for i, e := range entries {
		if svids[i] == nil {
			continue
		}
		// An entry that changed meanwhile gets no SVID of its old shape.
		if cur := s.entries.get(e.ID); cur != nil && cur.sameSVIDShape(e) {
			// Its signing may have been in flight at the taint; the
			// rotator looks at every SVID signed (SVIDManager.signed).
			if s.tainted.chainsTo(svids[i].Chain) {
				svids[i].replace.Store(true)
			}
			s.svids[e.ID] = svids[i]
			stored = append(stored, e.ID)
		}
	}
	if len(stored) > 0 {
		s.changedLocked()
	}
	s.mu.Unlock()
	if len(stored) > 0 {
		// Only streams holding these entries see a difference; waking
		// others (or anyone after a failure) would only make them spin.
		s.notifier.entries(stored)
	}
	return stored
}

// dropUnused forgets SVIDs that no workload fetched since they were signed;
// it reports how many it dropped. One served meanwhile, or replaced, stays.
func (s *entryStore) dropUnused(unused []*X509SVID) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, svid := range unused {
		if s.svids[svid.EntryID] == svid && !svid.served.Load() {
			delete(s.svids, svid.EntryID)
			n++
		}
	}
	if n > 0 {
		s.changedLocked()
	}
	return n
}

// fillHealth sets what the store knows of the agent's health.
func (s *entryStore) fillHealth(h *Health) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	h.Entries, h.X509SVIDs = s.entries.len(), len(s.svids)
	select {
	case <-s.ready:
		h.Ready = true
	default:
	}
	for _, svid := range s.svids {
		if h.FirstExpiry.IsZero() || svid.NotAfter.Before(h.FirstExpiry) {
			h.FirstExpiry = svid.NotAfter
		}
	}
}

// x509Lookup is what a caller's entries need before they can be served.
type x509Lookup struct {
	snap *X509Snapshot // nil until nothing is missing or stale
	// missing have no SVID that can be served; unchained says some of
	// them have one that does not chain to the local bundle, absent that
	// some have none at all.
	missing           []*Entry
	unchained, absent bool
	// stale have an SVID whose renewal was skipped (see refresh).
	stale []*Entry
	// wake are the entries whose SVIDs this lookup served first since
	// their renewal time passed: the rotator must renew them now.
	wake []string
}

// lookupX509 matches sels and reports what must be signed before they can
// be served, or the snapshot to serve. It returns ErrNoIdentity when no
// entry matches.
func (s *entryStore) lookupX509(sels []selector.Selector, view entryView, now time.Time, refresh, resigned bool) (x509Lookup, error) {
	var out x509Lookup
	s.mu.RLock()
	defer s.mu.RUnlock()
	var entries []*Entry
	switch view {
	case delegatedView:
		entries = s.matchDelegatedLocked(sels)
	case brokerView:
		entries = slices.DeleteFunc(s.matchLocked(sels), (*Entry).adminOrDownstream)
	default:
		entries = s.matchLocked(sels)
	}
	if len(entries) == 0 {
		return out, ErrNoIdentity
	}
	for _, e := range entries {
		switch svid := s.svids[e.ID]; {
		case svid == nil || !now.Before(svid.NotAfter):
			out.missing, out.absent = append(out.missing, e), true
		// One that does not chain to the bundle it would be served with
		// (the CA changed and its renewal is under way) would not verify:
		// the caller waits for a new one. Once: an upstream that signs
		// with a CA not yet in its bundle must not be asked again and
		// again.
		case !resigned && !svid.chainsTo(s.local):
			out.missing, out.unchained = append(out.missing, e), true
		case refresh && svid.renewalSkipped(now):
			out.stale = append(out.stale, e)
		}
	}
	if len(out.missing) > 0 || len(out.stale) > 0 {
		return out, nil
	}
	out.snap = s.snapshotLocked(entries)
	// Marked under the read lock, so that dropUnused (write lock) never
	// drops an SVID a caller is being handed. One whose renewal was
	// skipped (its refresh failed or timed out) is renewed now that
	// someone fetches it.
	for _, svid := range out.snap.SVIDs {
		if !svid.served.Load() && !svid.served.Swap(true) && svid.state(now) != svidValid {
			out.wake = append(out.wake, svid.EntryID)
		}
	}
	return out, nil
}

// snapshotLocked returns the snapshot of entries for the current gen,
// shared with every caller matching the same entries.
func (s *entryStore) snapshotLocked(entries []*Entry) *X509Snapshot {
	key := entries[0].ID
	if len(entries) > 1 {
		ids := make([]string, len(entries))
		for i, e := range entries {
			ids[i] = e.ID
		}
		key = strings.Join(ids, "\x00")
	}
	memo := s.snapshots.Load()
	gen := s.gen.Load()
	if v, ok := memo.Load(key); ok && v.(*X509Snapshot).gen == gen {
		return v.(*X509Snapshot)
	}
	snap := &X509Snapshot{
		SVIDs: make([]*X509SVID, 0, len(entries)),
		Hints: make([]string, 0, len(entries)),
		Local: s.local,
		gen:   gen,
	}
	for _, e := range entries {
		snap.SVIDs = append(snap.SVIDs, s.svids[e.ID])
		snap.Hints = append(snap.Hints, e.Hint)
	}
	snap.Federated = s.federatedForLocked(entries)
	// Callers that built one at once keep the first stored, so that they
	// share its encoding.
	if prev, loaded := memo.Swap(key, snap); loaded && prev.(*X509Snapshot).gen == gen {
		memo.Store(key, prev)
		return prev.(*X509Snapshot)
	}
	return snap
}

func (s *entryStore) federatedForLocked(entries []*Entry) []*Bundle {
	var out []*Bundle
	for _, e := range entries {
		for _, td := range e.FederatesWith {
			if b, ok := s.federated[td]; ok && !slices.Contains(out, b) {
				out = append(out, b)
			}
		}
	}
	slices.SortFunc(out, byTrustDomain)
	return out
}

func byTrustDomain(a, b *Bundle) int {
	return strings.Compare(a.TrustDomain().Name(), b.TrustDomain().Name())
}

// allBundles returns the local bundle and every federated one.
func (s *entryStore) allBundles() *BundleSnapshot {
	s.mu.RLock()
	defer s.mu.RUnlock()
	federated := slices.SortedFunc(maps.Values(s.federated), byTrustDomain)
	return &BundleSnapshot{Local: s.local, Federated: federated}
}

// bundles returns the bundles a caller may see (see SVIDManager.Bundles).
func (s *entryStore) bundles(sels []selector.Selector, allowUnauthenticated bool) (*BundleSnapshot, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if entries := s.matchLocked(sels); len(entries) > 0 {
		return &BundleSnapshot{Local: s.local, Federated: s.federatedForLocked(entries)}, nil
	}
	if !allowUnauthenticated {
		return nil, ErrNoIdentity
	}
	// A caller with no identity federates with no one: the local bundle
	// only, as spire-agent does.
	return &BundleSnapshot{Local: s.local}, nil
}
