package agent

import (
	"context"
	"encoding/binary"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/hashicorp/go-hclog"
	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
)

// maxJWTCache bounds the cached JWT-SVIDs, and maxJWTPerEntry those of one
// entry: a caller asking for ever new audiences (a delegate may name any
// workload) churns the tokens of that entry only, not every workload's.
const (
	maxJWTCache    = 8192
	maxJWTPerEntry = 64
)

// jwtIssuer has the upstream sign JWT-SVIDs, caches them until half their
// lifetime has passed, and validates tokens against the bundles.
type jwtIssuer struct {
	log      hclog.Logger
	upstream Upstream
	store    *entryStore
	now      func() time.Time
	report   func(error) // the health source

	mu       sync.Mutex
	tokens   map[jwtKey]*cachedJWT
	perEntry map[string]int // tokens cached by entry ID
}

type jwtKey struct {
	entryID  string
	audience string // audienceKey of the audience asked for
}

// cachedJWT is a token and the entry it was signed for: a changed entry
// (another pointer) drops it.
type cachedJWT struct {
	svid  *JWTSVID
	entry *Entry
}

func newJWTIssuer(log hclog.Logger, upstream Upstream, store *entryStore, now func() time.Time, report func(error)) *jwtIssuer {
	return &jwtIssuer{log: log, upstream: upstream, store: store, now: now, report: report, tokens: map[jwtKey]*cachedJWT{}, perEntry: map[string]int{}}
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

// forEntries returns a JWT-SVID for audience for each identity of entries,
// from its oldest entry. Tokens are reused until half their lifetime has
// passed.
func (j *jwtIssuer) forEntries(ctx context.Context, entries []*Entry, audience []string) ([]*JWTSVID, error) {
	aud := audienceKey(audience)
	out := make([]*JWTSVID, 0, len(entries))
	// One token per SPIFFE ID. Most callers match one entry: no map then.
	var seen map[spiffeid.ID]struct{}
	if len(entries) > 1 {
		seen = make(map[spiffeid.ID]struct{}, len(entries))
	}
	for _, e := range entries {
		if _, dup := seen[e.SPIFFEID]; dup {
			continue
		}
		if seen != nil {
			seen[e.SPIFFEID] = struct{}{}
		}
		key := jwtKey{entryID: e.ID, audience: aud}
		now := j.now()
		// The cached token's audience is the one read from it, so a token
		// is handed out only for exactly the audience it names.
		if cached := j.cached(key); cached != nil && slices.Equal(cached.Audience, audience) && now.Before(halfLife(cached)) {
			out = append(out, cached)
			continue
		}
		svid, err := j.mint(ctx, e, audience, key, now)
		if err != nil {
			return nil, err
		}
		out = append(out, svid)
	}
	return out, nil
}

func halfLife(svid *JWTSVID) time.Time {
	return svid.IssuedAt.Add(svid.ExpiresAt.Sub(svid.IssuedAt) / 2)
}

// cached returns the token cached under key if the local bundle holds its
// key. setBundles' caller drops the cached tokens when the JWT keys change
// and mint caches none whose key the bundle lacks; checked again, for a map
// lookup, so the cache never serves what the bundle cannot verify.
func (j *jwtIssuer) cached(key jwtKey) *JWTSVID {
	j.mu.Lock()
	defer j.mu.Unlock()
	c := j.tokens[key]
	if c == nil || !j.store.holdsJWTKey(c.svid.keyID) {
		return nil
	}
	return c.svid
}

// mint has the upstream sign a JWT-SVID for e and caches it under key.
//
// A token is handed out, and cached, only if its kid is in the local bundle
// at that moment, checked under the lock dropAll takes after a bundle
// change: otherwise the workload, and ValidateJWTSVID, could not verify it.
// The bundle changing during the signing (the old key dropped, as when a CA
// rotates or a SPIRE server's JWT authority is removed) is the common
// cause: signing once more gets the new key. Twice means the upstream signs
// ahead of the bundle it delivered. That is an error (the workload is told
// Unavailable and asks again), not a wait for the bundle: the local CA
// publishes a key before it signs with it, and a SPIRE server publishes one
// when it prepares it, long before it activates it, so the agent's bundle
// lags only when its syncs fail, and waiting would not help then.
func (j *jwtIssuer) mint(ctx context.Context, e *Entry, audience []string, key jwtKey, now time.Time) (*JWTSVID, error) {
	var kid string
	for range 2 {
		svid, err := j.upstream.MintJWTSVID(ctx, e, audience)
		j.report(err)
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
		if j.put(key, svid, e, now) {
			return svid, nil
		}
	}
	j.log.Warn("The upstream signed a JWT-SVID with a key that is not in its trust bundle; not handed out", "spiffe_id", e.SPIFFEID, "entry_id", e.ID, "kid", kid)
	return nil, fmt.Errorf("the upstream signed a JWT-SVID for %s with key %q, which is not in the trust bundle", e.SPIFFEID, kid)
}

// put caches svid unless its entry changed meanwhile; it reports whether
// the local bundle holds the token's key.
func (j *jwtIssuer) put(key jwtKey, svid *JWTSVID, e *Entry, now time.Time) bool {
	j.mu.Lock()
	defer j.mu.Unlock()
	if !j.store.holdsJWTKey(svid.keyID) {
		return false
	}
	if j.store.entry(e.ID) == e {
		if _, replaced := j.tokens[key]; !replaced {
			j.makeRoomLocked(key.entryID, now)
			j.perEntry[key.entryID]++
		}
		j.tokens[key] = &cachedJWT{svid: svid, entry: e}
	}
	return true
}

// makeRoomLocked makes room for one more token of entryID: it drops one of
// that entry's tokens at its cap, and prunes the whole cache at its own.
func (j *jwtIssuer) makeRoomLocked(entryID string, now time.Time) {
	if j.perEntry[entryID] >= maxJWTPerEntry {
		for k := range j.tokens {
			if k.entryID == entryID {
				j.deleteLocked(k) // map order is random
				break
			}
		}
	}
	if len(j.tokens) >= maxJWTCache {
		j.pruneLocked(now)
	}
}

func (j *jwtIssuer) deleteLocked(k jwtKey) {
	if _, ok := j.tokens[k]; !ok {
		return
	}
	delete(j.tokens, k)
	if j.perEntry[k.entryID]--; j.perEntry[k.entryID] <= 0 {
		delete(j.perEntry, k.entryID)
	}
}

// pruneLocked drops tokens past half their life and, if that is not
// enough, an eighth of the rest at random (many entries, each within its
// cap, filled the cache).
func (j *jwtIssuer) pruneLocked(now time.Time) {
	for k, c := range j.tokens {
		if !now.Before(halfLife(c.svid)) {
			j.deleteLocked(k)
		}
	}
	for k := range j.tokens {
		if len(j.tokens) < maxJWTCache-maxJWTCache/8 {
			break
		}
		j.deleteLocked(k) // map order is random
	}
}

// count is how many tokens are cached.
func (j *jwtIssuer) count() int {
	j.mu.Lock()
	defer j.mu.Unlock()
	return len(j.tokens)
}

// dropAll forgets every cached token and returns how many there were.
func (j *jwtIssuer) dropAll() int {
	j.mu.Lock()
	defer j.mu.Unlock()
	n := len(j.tokens)
	clear(j.tokens)
	clear(j.perEntry)
	return n
}

// dropChanged forgets the tokens of entries that changed or went away.
func (j *jwtIssuer) dropChanged() {
	j.mu.Lock()
	defer j.mu.Unlock()
	for k, c := range j.tokens {
		if j.store.entry(k.entryID) != c.entry {
			j.deleteLocked(k)
		}
	}
}

// validate checks a token against the bundle of its subject's trust domain
// and the audience, the bundles being those snap gives the caller.
func validateJWT(snap *BundleSnapshot, token, audience string) (*jwtsvid.SVID, error) {
	set := jwtbundle.NewSet(snap.Local.JWTBundle())
	for _, b := range snap.Federated {
		set.Add(b.JWTBundle())
	}
	return jwtsvid.ParseAndValidate(token, set, []string{audience})
}
