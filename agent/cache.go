package agent

import (
	"bytes"
	"cmp"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"fmt"
	"math/big"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/attestor"
	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"golang.org/x/time/rate"
)

// ErrNoIdentity means no registration entry matches the caller's selectors.
var ErrNoIdentity = errors.New("no identity issued")

// ErrNotReady means the upstream has not delivered entries and bundles yet.
var ErrNotReady = errors.New("the agent has no entries and bundles from its upstream yet")

const (
	// maxBatch is the most SVIDs signed in one upstream call (SPIRE's limit
	// for BatchNewX509SVID).
	maxBatch = 500
	// mintTimeout bounds one upstream signing call. Minting runs detached
	// from the caller that asked, so that one client hanging up does not
	// fail the others waiting on the same SVID.
	mintTimeout = 30 * time.Second
	// maxJWTCache bounds the cached JWT-SVIDs.
	maxJWTCache = 8192
)

// Cache holds the entries and bundles from the upstream and the SVIDs minted
// for them, and tells subscribers when any of it changes. Every Workload API
// call is answered from here, from memory.
type Cache struct {
	log      hclog.Logger
	upstream Upstream
	now      func() time.Time
	newKey   func() (*ecdsa.PrivateKey, error) // an SVID's key

	mu        sync.RWMutex
	entries   entrySet
	local     *Bundle
	federated map[spiffeid.TrustDomain]*Bundle
	svids     map[string]*X509SVID
	inflight  map[string]*mintCall
	jwts      map[jwtKey]*JWTSVID
	subs      map[*Subscription]struct{}

	haveEntries, haveBundles bool
	ready                    chan struct{}
	renewKick                chan struct{}

	persistPath string // empty: not persisted
	dirty       bool   // changed since last persisted

	upstreamErr       error
	upstreamDownSince time.Time

	saveErrs    map[string]error // by path; see ReportSave
	persistWarn rate.Sometimes   // RunPersist's; see persist

	// lifetime is RunRotation's context: signing that outlives the caller
	// that started it (see refresh) ends with the agent. Nil until
	// RunRotation runs.
	lifetime context.Context
}

type mintCall struct {
	entry *Entry
	done  chan struct{}
	err   error
}

type jwtKey struct {
	entryID  string
	audience string // audienceKey of the audience asked for
}

// audienceKey encodes an audience list so that distinct lists never share
// a key: each audience is prefixed with its length. Joined with a
// separator, ["x", "y"] and ["x\x00y"] shared one.
func audienceKey(audience []string) string {
	n := 0
	for _, a := range audience {
		n += binary.MaxVarintLen64 + len(a)
	}
	b := make([]byte, 0, n)
	for _, a := range audience {
		b = binary.AppendUvarint(b, uint64(len(a)))
		b = append(b, a...)
	}
	return string(b)
}

// jwtSVIDAlgorithms are the signature algorithms a JWT-SVID may use (the
// JWT-SVID specification, section 3): what a token is parsed with.
var jwtSVIDAlgorithms = []jose.SignatureAlgorithm{
	jose.RS256, jose.RS384, jose.RS512,
	jose.ES256, jose.ES384, jose.ES512,
	jose.PS256, jose.PS384, jose.PS512,
}

// tokenClaims reads the kid header and the sub and aud claims of a token
// without verifying it: the upstream that signed it is trusted, what is
// checked is that it signed what was asked, with a key of the bundle. A
// single audience may be encoded as a string.
func tokenClaims(token string) (kid, sub string, aud []string, err error) {
	tok, err := jwt.ParseSigned(token, jwtSVIDAlgorithms)
	if err != nil {
		return "", "", nil, err
	}
	var claims jwt.Claims
	if err := tok.UnsafeClaimsWithoutVerification(&claims); err != nil {
		return "", "", nil, err
	}
	// A compact JWS, the only form ParseSigned accepts, has one signature.
	return tok.Headers[0].KeyID, claims.Subject, claims.Audience, nil
}

// NewCache returns an empty cache that mints through upstream.
func NewCache(log hclog.Logger, upstream Upstream) *Cache {
	return &Cache{
		log:       log,
		upstream:  upstream,
		now:       time.Now,
		newKey:    func() (*ecdsa.PrivateKey, error) { return ecdsa.GenerateKey(elliptic.P256(), rand.Reader) },
		federated: map[spiffeid.TrustDomain]*Bundle{},
		svids:     map[string]*X509SVID{},
		inflight:  map[string]*mintCall{},
		jwts:      map[jwtKey]*JWTSVID{},
		subs:      map[*Subscription]struct{}{},
		ready:     make(chan struct{}),
		renewKick: make(chan struct{}, 1),

		persistWarn: rate.Sometimes{First: 1, Interval: saveWarnEvery},
	}
}

// Ready is closed once the upstream has delivered entries and bundles.
func (c *Cache) Ready() <-chan struct{} { return c.ready }

// SetEntries replaces the registration entries. Unchanged entries keep their
// SVIDs; removed or reshaped ones lose them.
func (c *Cache) SetEntries(entries []*Entry) {
	c.mu.Lock()
	defer c.mu.Unlock()
	sorted, changed := sortEntries(entries, c.entries.byID)
	if !changed && c.haveEntries {
		return
	}
	next := newEntrySet(sorted)
	for id := range c.svids {
		if e, old := next.get(id), c.entries.get(id); e == nil || old == nil || !e.sameSVIDShape(old) {
			delete(c.svids, id)
		}
	}
	for k, jwt := range c.jwts {
		if e := next.get(k.entryID); e == nil || e.SPIFFEID != jwt.ID || e != c.entries.get(k.entryID) {
			delete(c.jwts, k)
		}
	}
	c.entries = next
	c.haveEntries = true
	c.markReadyLocked()
	c.notifyLocked()
}

// SetBundles replaces the trust bundles. SVIDs that no longer chain to the
// local bundle are renewed at once.
func (c *Cache) SetBundles(local *spiffebundle.Bundle, federated []*spiffebundle.Bundle) {
	c.mu.Lock()
	defer c.mu.Unlock()
	changed := false
	if c.local == nil || !c.local.Equal(local) {
		if b, err := newBundle(local); err != nil {
			c.log.Error("Ignoring the local bundle from the upstream", "error", err)
		} else {
			jwtChanged := c.local == nil || !jwtAuthoritiesEqual(c.local.Bundle, local)
			c.local, changed = b, true
			if jwtChanged {
				clear(c.jwts)
			}
			for _, svid := range c.svids {
				if !svid.chainsTo(b) {
					svid.RenewAt = time.Time{}
					c.kickRenewal()
				}
			}
		}
	}
	if c.local == nil {
		return
	}
	next := make(map[spiffeid.TrustDomain]*Bundle, len(federated))
	for _, fb := range federated {
		td := fb.TrustDomain()
		if td == local.TrustDomain() {
			continue
		}
		if old, ok := c.federated[td]; ok && old.Equal(fb) {
			next[td] = old
			continue
		}
		b, err := newBundle(fb)
		if err != nil {
			c.log.Error("Ignoring a federated bundle from the upstream", "trust_domain", td, "error", err)
			continue
		}
		next[td], changed = b, true
	}
	if len(next) != len(c.federated) {
		changed = true
	}
	c.federated = next
	c.haveBundles = true
	c.markReadyLocked()
	if changed {
		c.notifyLocked()
	}
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

func (c *Cache) markReadyLocked() {
	if c.haveEntries && c.haveBundles {
		select {
		case <-c.ready:
		default:
			close(c.ready)
		}
	}
}

// Subscription is told, through C, whenever the cache changes in a way that
// may concern it. C holds at most one pending signal: a slow reader sees one
// wake-up for many changes.
type Subscription struct {
	C     chan struct{}
	cache *Cache
	// entries are the entry IDs the subscriber's last answer was built
	// from; a new SVID for any other entry does not wake it. Nil means
	// every change wakes it.
	entries atomic.Pointer[[]string]
}

// WatchEntries narrows the SVID changes that wake the subscriber to those of
// the given entries. Entry and bundle changes always wake it.
func (s *Subscription) WatchEntries(ids []string) {
	s.entries.Store(&ids)
}

// Subscribe returns a new subscription; Close it when done.
func (c *Cache) Subscribe() *Subscription {
	s := &Subscription{C: make(chan struct{}, 1), cache: c}
	c.mu.Lock()
	c.subs[s] = struct{}{}
	c.mu.Unlock()
	return s
}

// Close ends the subscription.
func (s *Subscription) Close() {
	s.cache.mu.Lock()
	delete(s.cache.subs, s)
	s.cache.mu.Unlock()
}

func (c *Cache) notifyLocked() {
	c.dirty = true
	for s := range c.subs {
		s.signal()
	}
}

// notifyEntriesLocked wakes the subscribers that hold any of the entries.
func (c *Cache) notifyEntriesLocked(ids []string) {
	c.dirty = true
	for s := range c.subs {
		watched := s.entries.Load()
		if watched == nil || slices.ContainsFunc(*watched, func(id string) bool { return slices.Contains(ids, id) }) {
			s.signal()
		}
	}
}

func (s *Subscription) signal() {
	select {
	case s.C <- struct{}{}:
	default:
	}
}

// matchLocked returns the entries whose selectors are all among sels,
// oldest first.
func (c *Cache) matchLocked(sels []attestor.Selector) []*Entry {
	var matched []*Entry
	if len(sels) == 0 {
		return nil
	}
	seen := make(map[*Entry]int, 4)
	for i, s := range sels {
		// A repeated selector must not count twice towards an entry.
		if slices.Contains(sels[:i], s) {
			continue
		}
		for e := range c.entries.withSelector(s) {
			seen[e]++
			if seen[e] == len(e.Selectors) {
				matched = append(matched, e)
			}
		}
	}
	slices.SortFunc(matched, func(a, b *Entry) int {
		return cmp.Or(cmp.Compare(a.CreatedAt, b.CreatedAt), strings.Compare(a.ID, b.ID))
	})
	return dropDuplicateHints(matched)
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

// X509Snapshot is everything one FetchX509SVID message carries.
type X509Snapshot struct {
	SVIDs     []*X509SVID // the default identity first
	Hints     []string    // Hints[i] belongs to SVIDs[i]
	Local     *Bundle
	Federated []*Bundle // sorted by trust domain
}

// Same reports whether two snapshots would produce the same message. Bundles
// are compared by their X.509 encoding: a change to JWT keys, a sequence
// number or a refresh hint does not show in this message.
func (s *X509Snapshot) Same(o *X509Snapshot) bool {
	return s != nil && o != nil && slices.Equal(s.SVIDs, o.SVIDs) && slices.Equal(s.Hints, o.Hints) &&
		sameBundles(s.Local, s.Federated, o.Local, o.Federated, (*Bundle).x509Bytes)
}

func (b *Bundle) x509Bytes() []byte { return b.X509DER }
func (b *Bundle) jwtBytes() []byte  { return b.JWKS }

func sameBundles(aLocal *Bundle, aFed []*Bundle, bLocal *Bundle, bFed []*Bundle, enc func(*Bundle) []byte) bool {
	same := func(a, b *Bundle) bool {
		return a == b || (a != nil && b != nil && a.TrustDomain() == b.TrustDomain() && bytes.Equal(enc(a), enc(b)))
	}
	return same(aLocal, bLocal) && slices.EqualFunc(aFed, bFed, same)
}

// EntryIDs lists the entries the snapshot was built from.
func (s *X509Snapshot) EntryIDs() []string {
	ids := make([]string, len(s.SVIDs))
	for i, svid := range s.SVIDs {
		ids[i] = svid.EntryID
	}
	return ids
}

// X509Identities returns the caller's X.509-SVIDs, minting those it does not
// hold yet. It returns ErrNoIdentity when no entry matches.
func (c *Cache) X509Identities(ctx context.Context, sels []attestor.Selector) (*X509Snapshot, error) {
	if err := c.waitReady(ctx); err != nil {
		return nil, err
	}
	// Entries may change while minting; a few rounds settle it, and one
	// more may refresh SVIDs whose renewal was skipped.
	refreshed, resigned := false, false
	for range 4 {
		c.mu.RLock()
		entries := c.matchLocked(sels)
		if len(entries) == 0 {
			c.mu.RUnlock()
			return nil, ErrNoIdentity
		}
		now := c.now()
		refresh := !refreshed && c.upstreamErr == nil
		var missing, stale []*Entry
		unchained, absent := false, false
		for _, e := range entries {
			switch svid := c.svids[e.ID]; {
			case svid == nil || !now.Before(svid.NotAfter):
				missing, absent = append(missing, e), true
			// One that does not chain to the bundle it would be served
			// with (the CA changed and its renewal is under way) would
			// not verify: the caller waits for a new one. Once: an
			// upstream that signs with a CA not yet in its bundle must
			// not be asked again and again.
			case !resigned && !svid.chainsTo(c.local):
				missing, unchained = append(missing, e), true
			case refresh && svid.renewalSkipped(now):
				stale = append(stale, e)
			}
		}
		switch {
		case len(missing) > 0:
			c.mu.RUnlock()
			resigned = resigned || unchained
			// Failing to re-sign one that does not chain leaves it served:
			// the caller is no worse off than before.
			if err := c.mint(ctx, missing, unchained); err != nil && (!unchained || absent) {
				return nil, err
			}
			continue
		case len(stale) > 0:
			c.mu.RUnlock()
			refreshed = true
			c.refresh(ctx, stale)
			continue
		}
		snap := c.x509SnapshotLocked(entries)
		// Marked under the read lock, so that dropUnused (write lock)
		// never drops an SVID a caller is being handed. One whose renewal
		// was skipped (its refresh failed or timed out) is renewed now that
		// someone fetches it.
		for _, svid := range snap.SVIDs {
			if !svid.served.Load() && !svid.served.Swap(true) && !now.Before(svid.RenewAt) {
				c.kickRenewal()
			}
		}
		c.mu.RUnlock()
		return snap, nil
	}
	return nil, fmt.Errorf("registration entries kept changing while their SVIDs were signed")
}

// refreshWait bounds how long a caller waits for SVIDs refreshed for it
// (see refresh); after that it gets the ones it would have had.
const refreshWait = 2 * time.Second

// refresh re-signs the SVIDs of entries for a caller that would otherwise
// be handed SVIDs whose renewal was skipped, so that it gets as much
// lifetime as from an SVID kept renewed. It waits at most refreshWait:
// signing goes on detached until it ends or the agent stops, and a caller
// that stops waiting (or whose refresh fails, the upstream being down) is
// served the still-valid SVIDs.
func (c *Cache) refresh(ctx context.Context, entries []*Entry) {
	var mine, theirs []*mintCall
	c.mu.Lock()
	now := c.now()
	for _, e := range entries {
		// Another caller may have refreshed it since the caller looked.
		if svid := c.svids[e.ID]; svid != nil && svid.renewalSkipped(now) {
			mine, theirs = c.claimLocked(e, mine, theirs)
		}
	}
	base := c.lifetime
	c.mu.Unlock()
	waits := append(slices.Clip(mine), theirs...)
	if len(mine) > 0 {
		if base == nil {
			base = context.WithoutCancel(ctx)
		}
		go func() {
			mctx, cancel := context.WithTimeout(base, mintTimeout)
			defer cancel()
			c.mintBatch(mctx, mine)
			// The caller may have stopped waiting and been handed the old
			// SVID, now served and due: the rotation loop skipped it while
			// this signing was in flight, and must look again whatever
			// came of it.
			c.kickRenewal()
		}()
	}
	timer := time.NewTimer(refreshWait)
	defer timer.Stop()
	for _, call := range waits {
		select {
		case <-call.done:
		case <-timer.C:
			return
		case <-ctx.Done():
			return
		}
	}
}

func (c *Cache) x509SnapshotLocked(entries []*Entry) *X509Snapshot {
	snap := &X509Snapshot{
		SVIDs: make([]*X509SVID, 0, len(entries)),
		Hints: make([]string, 0, len(entries)),
		Local: c.local,
	}
	for _, e := range entries {
		snap.SVIDs = append(snap.SVIDs, c.svids[e.ID])
		snap.Hints = append(snap.Hints, e.Hint)
	}
	snap.Federated = c.federatedForLocked(entries)
	return snap
}

func (c *Cache) federatedForLocked(entries []*Entry) []*Bundle {
	var out []*Bundle
	for _, e := range entries {
		for _, td := range e.FederatesWith {
			if b, ok := c.federated[td]; ok && !slices.Contains(out, b) {
				out = append(out, b)
			}
		}
	}
	slices.SortFunc(out, func(a, b *Bundle) int {
		return strings.Compare(a.TrustDomain().Name(), b.TrustDomain().Name())
	})
	return out
}

// maxReadyWait bounds how long a call waits for the first entries and
// bundles before it is told Unavailable (and retries): waiting out the
// caller's own deadline would leave it nothing to tell the client.
const maxReadyWait = time.Second

func (c *Cache) waitReady(ctx context.Context) error {
	select {
	case <-c.ready:
		return nil
	default:
	}
	timer := time.NewTimer(maxReadyWait)
	defer timer.Stop()
	select {
	case <-c.ready:
		return nil
	case <-timer.C:
		return ErrNotReady
	case <-ctx.Done():
		return ErrNotReady
	}
}

// claimLocked adds to theirs the signing in flight for e, if any, and
// otherwise starts one that the caller must do, added to mine.
func (c *Cache) claimLocked(e *Entry, mine, theirs []*mintCall) ([]*mintCall, []*mintCall) {
	if call := c.inflight[e.ID]; call != nil {
		return mine, append(theirs, call)
	}
	call := &mintCall{entry: e, done: make(chan struct{})}
	c.inflight[e.ID] = call
	return append(mine, call), theirs
}

// mint signs SVIDs for entries that have none (or, when unchained, none
// that chains to the local bundle), sharing in-flight work with other
// callers that need the same entries.
func (c *Cache) mint(ctx context.Context, entries []*Entry, unchained bool) error {
	var mine, theirs []*mintCall
	c.mu.Lock()
	now := c.now()
	for _, e := range entries {
		if svid := c.svids[e.ID]; svid != nil && now.Before(svid.NotAfter) && (!unchained || svid.chainsTo(c.local)) {
			continue
		}
		mine, theirs = c.claimLocked(e, mine, theirs)
	}
	c.mu.Unlock()
	if len(mine) > 0 {
		mctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), mintTimeout)
		c.mintBatch(mctx, mine)
		cancel()
	}
	for _, call := range append(mine, theirs...) {
		select {
		case <-call.done:
			if call.err != nil {
				return call.err
			}
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

// mintBatch signs the calls' SVIDs in batches and completes the calls.
func (c *Cache) mintBatch(ctx context.Context, calls []*mintCall) {
	for chunk := range slices.Chunk(calls, maxBatch) {
		svids, errs := c.sign(ctx, chunk)
		c.mu.Lock()
		var stored []string
		for i, call := range chunk {
			call.err = errs[i]
			if errs[i] == nil {
				// An entry that changed meanwhile gets no SVID of its old shape.
				if cur := c.entries.get(call.entry.ID); cur != nil && cur.sameSVIDShape(call.entry) {
					c.svids[call.entry.ID] = svids[i]
					stored = append(stored, call.entry.ID)
				}
			}
			if c.inflight[call.entry.ID] == call {
				delete(c.inflight, call.entry.ID)
			}
			close(call.done)
		}
		if len(stored) > 0 {
			// Only streams holding these entries see a difference; waking
			// others (or anyone after a failure) would only make them spin.
			c.kickRenewal()
			c.notifyEntriesLocked(stored)
		}
		c.mu.Unlock()
	}
}

// sign generates keys and has the upstream sign them.
func (c *Cache) sign(ctx context.Context, calls []*mintCall) ([]*X509SVID, []error) {
	svids := make([]*X509SVID, len(calls))
	errs := make([]error, len(calls))
	// Only calls with a key are sent: a request without one would reach
	// the upstream with a nil key.
	reqs := make([]X509Request, 0, len(calls))
	sent := make([]int, 0, len(calls)) // the call of each request
	for i, call := range calls {
		key, err := c.newKey()
		if err != nil {
			errs[i] = fmt.Errorf("generating a key for %s: %w", call.entry.SPIFFEID, err)
			continue
		}
		reqs = append(reqs, X509Request{Entry: call.entry, Key: key})
		sent = append(sent, i)
	}
	if len(reqs) > 0 {
		results, err := c.upstream.MintX509SVIDs(ctx, reqs)
		if err == nil && len(results) != len(reqs) {
			err = fmt.Errorf("the upstream answered %d of %d signing requests", len(results), len(reqs))
		}
		c.ReportUpstream(err)
		for r, i := range sent {
			switch {
			case err != nil:
				errs[i] = err
			case results[r].Err != nil:
				errs[i] = results[r].Err
			default:
				svids[i], errs[i] = newX509SVID(calls[i].entry, reqs[r].Key.(*ecdsa.PrivateKey), results[r].Chain, c.now())
			}
		}
	}
	for i, call := range calls {
		if errs[i] != nil {
			c.log.Warn("Could not sign an X509-SVID", "spiffe_id", call.entry.SPIFFEID, "entry_id", call.entry.ID, "error", errs[i])
		}
	}
	return svids, errs
}

func newX509SVID(e *Entry, key *ecdsa.PrivateKey, chain []*x509.Certificate, now time.Time) (*X509SVID, error) {
	if len(chain) == 0 {
		return nil, fmt.Errorf("the upstream returned an empty chain for %s", e.SPIFFEID)
	}
	leaf := chain[0]
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != e.SPIFFEID.String() {
		return nil, fmt.Errorf("the upstream signed an SVID for %v, not %s", leaf.URIs, e.SPIFFEID)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("encoding the key of %s: %w", e.SPIFFEID, err)
	}
	return newX509SVIDFromKey(e, key, keyDER, chain, now)
}

func newX509SVIDFromKey(e *Entry, key crypto.Signer, keyDER []byte, chain []*x509.Certificate, now time.Time) (*X509SVID, error) {
	leaf := chain[0]
	var chainDER []byte
	for _, cert := range chain {
		chainDER = append(chainDER, cert.Raw...)
	}
	return &X509SVID{
		EntryID:   e.ID,
		ID:        e.SPIFFEID,
		Chain:     chain,
		Key:       key,
		ChainDER:  chainDER,
		KeyDER:    keyDER,
		NotBefore: leaf.NotBefore,
		NotAfter:  leaf.NotAfter,
		RenewAt:   renewAt(now, leaf.NotAfter),
	}, nil
}

// minRenewInterval keeps a certificate whose life is nearly over (capped by
// an expiring CA) from being renewed in a tight loop.
const minRenewInterval = 500 * time.Millisecond

// renewAt is half of the remaining lifetime with +-10% jitter of the half,
// as SPIRE does, so SVIDs minted together are not renewed together. It
// counts from the time of minting, not from NotBefore, which signers
// backdate to allow for clock skew.
func renewAt(now, notAfter time.Time) time.Time {
	half := notAfter.Sub(now) / 2
	jitter := time.Duration(0)
	if span := int64(half / 5); span > 0 {
		n, err := rand.Int(rand.Reader, big.NewInt(span))
		if err == nil {
			jitter = time.Duration(n.Int64()) - half/10
		}
	}
	return now.Add(max(half+jitter, minRenewInterval))
}

func (c *Cache) kickRenewal() {
	select {
	case c.renewKick <- struct{}{}:
	default:
	}
}

// RunRotation renews SVIDs as they reach their renewal time, until ctx ends.
// A failed renewal keeps the old SVID and is retried with capped backoff.
func (c *Cache) RunRotation(ctx context.Context) {
	c.mu.Lock()
	c.lifetime = ctx
	c.mu.Unlock()
	backoff := NewBackoff(time.Second, 30*time.Second)
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		c.mu.RLock()
		now := c.now()
		next := now.Add(time.Hour)
		var due []*mintCall
		var unused []*X509SVID
		for id, svid := range c.svids {
			switch {
			case svid.RenewAt.After(now):
				if svid.RenewAt.Before(next) {
					next = svid.RenewAt
				}
			case !svid.served.Load():
				// Served until it expires, unless it must be replaced
				// (it no longer chains to the bundle, or its signer was
				// tainted): then it goes at once.
				if svid.RenewAt.IsZero() || !now.Before(svid.NotAfter) {
					unused = append(unused, svid)
				} else if svid.NotAfter.Before(next) {
					next = svid.NotAfter
				}
			default:
				if e := c.entries.get(id); e != nil && c.inflight[id] == nil {
					due = append(due, &mintCall{entry: e, done: make(chan struct{})})
				}
			}
		}
		c.mu.RUnlock()
		c.dropUnused(unused)
		if len(due) > 0 {
			if c.renew(ctx, due) {
				backoff.Reset()
				continue
			}
			next = now.Add(backoff.Next())
		}
		timer.Reset(next.Sub(now))
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		case <-c.renewKick:
			if !timer.Stop() {
				select {
				case <-timer.C:
				default:
				}
			}
		}
	}
}

// dropUnused forgets SVIDs that no workload fetched since they were signed
// and that have expired or must be replaced; a workload that asks again
// gets a new one.
func (c *Cache) dropUnused(unused []*X509SVID) {
	if len(unused) == 0 {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, svid := range unused {
		if c.svids[svid.EntryID] == svid && !svid.served.Load() {
			delete(c.svids, svid.EntryID)
			n++
		}
	}
	if n > 0 {
		c.dirty = true
		c.log.Debug("Dropped X509-SVIDs no workload fetched since they were signed", "count", n)
	}
}

// renew re-signs due SVIDs; it reports whether all succeeded.
func (c *Cache) renew(ctx context.Context, due []*mintCall) bool {
	c.mu.Lock()
	calls := due[:0]
	for _, call := range due {
		if c.inflight[call.entry.ID] == nil {
			c.inflight[call.entry.ID] = call
			calls = append(calls, call)
		}
	}
	c.mu.Unlock()
	mctx, cancel := context.WithTimeout(ctx, mintTimeout)
	defer cancel()
	c.mintBatch(mctx, calls)
	ok := true
	for _, call := range calls {
		if call.err != nil {
			ok = false
		}
	}
	if len(calls) > 0 {
		c.log.Debug("Renewed X509-SVIDs", "count", len(calls), "all_ok", ok)
	}
	return ok
}

// BundleSnapshot is what one FetchX509Bundles or FetchJWTBundles message
// carries.
type BundleSnapshot struct {
	Local     *Bundle
	Federated []*Bundle
}

// SameX509 reports whether two snapshots would produce the same
// FetchX509Bundles message.
func (s *BundleSnapshot) SameX509(o *BundleSnapshot) bool {
	return s != nil && o != nil && sameBundles(s.Local, s.Federated, o.Local, o.Federated, (*Bundle).x509Bytes)
}

// SameJWT reports whether two snapshots would produce the same
// FetchJWTBundles message.
func (s *BundleSnapshot) SameJWT(o *BundleSnapshot) bool {
	return s != nil && o != nil && sameBundles(s.Local, s.Federated, o.Local, o.Federated, (*Bundle).jwtBytes)
}

// Bundles returns the bundles a caller may see: the local one and those its
// entries federate with. A caller with no entry gets ErrNoIdentity unless
// allowUnauthenticated, in which case it sees every bundle.
func (c *Cache) Bundles(ctx context.Context, sels []attestor.Selector, allowUnauthenticated bool) (*BundleSnapshot, error) {
	if err := c.waitReady(ctx); err != nil {
		return nil, err
	}
	c.mu.RLock()
	defer c.mu.RUnlock()
	if entries := c.matchLocked(sels); len(entries) > 0 {
		return &BundleSnapshot{Local: c.local, Federated: c.federatedForLocked(entries)}, nil
	}
	if !allowUnauthenticated {
		return nil, ErrNoIdentity
	}
	// A caller with no identity federates with no one: the local bundle
	// only, as spire-agent does.
	return &BundleSnapshot{Local: c.local}, nil
}

// JWTSVIDs returns a JWT-SVID for audience for each of the caller's
// identities, or only for id when it is not zero. Tokens are reused until
// half their lifetime has passed.
func (c *Cache) JWTSVIDs(ctx context.Context, sels []attestor.Selector, audience []string, id spiffeid.ID) ([]*JWTSVID, error) {
	if err := c.waitReady(ctx); err != nil {
		return nil, err
	}
	match := func() []*Entry {
		c.mu.RLock()
		entries := c.matchLocked(sels)
		c.mu.RUnlock()
		if !id.IsZero() {
			entries = slices.DeleteFunc(entries, func(e *Entry) bool { return e.SPIFFEID != id })
		}
		return entries
	}
	entries := match()
	if len(entries) == 0 {
		return nil, ErrNoIdentity
	}
	aud := audienceKey(audience)
	out := make([]*JWTSVID, 0, len(entries))
	seen := make(map[spiffeid.ID]struct{}, len(entries))
	for _, e := range entries {
		// One token per identity, from its oldest entry.
		if _, dup := seen[e.SPIFFEID]; dup {
			continue
		}
		seen[e.SPIFFEID] = struct{}{}
		key := jwtKey{entryID: e.ID, audience: aud}
		c.mu.RLock()
		cached := c.jwts[key]
		// SetBundles drops the cached tokens when the JWT keys change and
		// mintJWT caches none whose key the bundle lacks; checked again,
		// for a map lookup, so the cache never serves what the bundle
		// cannot verify.
		cachedKnown := cached != nil && c.local.holdsJWTKey(cached.keyID)
		c.mu.RUnlock()
		now := c.now()
		// The cached token's audience is the one read from it, so a token
		// is handed out only for exactly the audience it names.
		if cachedKnown && slices.Equal(cached.Audience, audience) &&
			now.Before(cached.IssuedAt.Add(cached.ExpiresAt.Sub(cached.IssuedAt)/2)) {
			out = append(out, cached)
			continue
		}
		svid, err := c.mintJWT(ctx, e, audience, key, now)
		if err != nil {
			return nil, err
		}
		out = append(out, svid)
	}
	return out, nil
}

// mintJWT has the upstream sign a JWT-SVID for e and caches it under key.
//
// A token is handed out, and cached, only if its kid is in the local bundle
// at that moment, checked under the lock SetBundles takes: otherwise the
// workload, and ValidateJWTSVID, could not verify it. The bundle changing
// during the signing (the old key dropped, as when a CA rotates or a SPIRE
// server's JWT authority is removed) is the common cause: signing once
// more gets the new key. Twice means the upstream signs ahead of the bundle
// it delivered. That is an error (the workload is told Unavailable and
// asks again), not a wait for the bundle: the local CA publishes a key
// before it signs with it, and a SPIRE server publishes one when it
// prepares it, long before it activates it, so the agent's bundle lags
// only when its syncs fail, and waiting would not help then.
func (c *Cache) mintJWT(ctx context.Context, e *Entry, audience []string, key jwtKey, now time.Time) (*JWTSVID, error) {
	var kid string
	for range 2 {
		svid, err := c.upstream.MintJWTSVID(ctx, e, audience)
		c.ReportUpstream(err)
		if err != nil {
			return nil, fmt.Errorf("signing a JWT-SVID for %s: %w", e.SPIFFEID, err)
		}
		signer, sub, got, err := tokenClaims(svid.Token)
		if err != nil {
			return nil, fmt.Errorf("reading the JWT-SVID signed for %s: %w", e.SPIFFEID, err)
		}
		if sub != e.SPIFFEID.String() {
			return nil, fmt.Errorf("the upstream signed a JWT-SVID for %s with subject %q", e.SPIFFEID, sub)
		}
		if !slices.Equal(got, audience) {
			return nil, fmt.Errorf("the upstream signed a JWT-SVID for %s with audience %q, not the %q asked for", e.SPIFFEID, got, audience)
		}
		svid.Audience = got
		svid.Hint = e.Hint
		svid.keyID, kid = signer, signer
		c.mu.Lock()
		known := c.local.holdsJWTKey(kid)
		if known && c.entries.get(e.ID) == e {
			if len(c.jwts) >= maxJWTCache {
				c.pruneJWTsLocked(now)
			}
			c.jwts[key] = svid
		}
		c.mu.Unlock()
		if known {
			return svid, nil
		}
	}
	c.log.Warn("The upstream signed a JWT-SVID with a key that is not in its trust bundle; not handed out", "spiffe_id", e.SPIFFEID, "entry_id", e.ID, "kid", kid)
	return nil, fmt.Errorf("the upstream signed a JWT-SVID for %s with key %q, which is not in the trust bundle", e.SPIFFEID, kid)
}

// pruneJWTsLocked drops expired tokens, and everything if that is not enough.
func (c *Cache) pruneJWTsLocked(now time.Time) {
	for k, svid := range c.jwts {
		if !now.Before(svid.IssuedAt.Add(svid.ExpiresAt.Sub(svid.IssuedAt) / 2)) {
			delete(c.jwts, k)
		}
	}
	if len(c.jwts) >= maxJWTCache {
		clear(c.jwts)
	}
}

// ValidateJWTSVID checks a token against the bundle of its subject's trust
// domain and the audience. The caller may rely on the bundles it could fetch
// itself: the local one and those its entries federate with.
func (c *Cache) ValidateJWTSVID(ctx context.Context, sels []attestor.Selector, token, audience string) (*jwtsvid.SVID, error) {
	snap, err := c.Bundles(ctx, sels, true)
	if err != nil {
		return nil, err
	}
	set := jwtbundle.NewSet(snap.Local.JWTBundle())
	for _, b := range snap.Federated {
		set.Add(b.JWTBundle())
	}
	return jwtsvid.ParseAndValidate(token, set, []string{audience})
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
func (c *Cache) AwaitIdentity(ctx context.Context, sels []attestor.Selector, id spiffeid.ID) bool {
	ctx, cancel := context.WithTimeout(ctx, maxEntryWait)
	defer cancel()
	matches := func() bool {
		c.mu.RLock()
		defer c.mu.RUnlock()
		return slices.ContainsFunc(c.matchLocked(sels), func(e *Entry) bool { return id.IsZero() || e.SPIFFEID == id })
	}
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
		if matches() {
			return true
		}
	}
	return false
}
