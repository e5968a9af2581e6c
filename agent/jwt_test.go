package agent

import (
	"context"
	"crypto"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

func TestJWTSVIDs(t *testing.T) {
	c, up, clock := newClockedCache(t)
	a := testEntry("a", "spiffe://example.org/a", 1, "unix:uid:1")
	a.Hint = "first"
	b := testEntry("b", "spiffe://example.org/b", 2, "unix:uid:1")
	b.JWTSVIDTTL = time.Minute
	// Same identity as a, younger: it adds no second token.
	a2 := testEntry("a2", "spiffe://example.org/a", 3, "unix:uid:1")
	hold(c, up, b, a2, a)
	sels := mustSels("unix:uid:1")
	fetch := func(aud []string, id spiffeid.ID) []*JWTSVID {
		t.Helper()
		svids, err := c.JWTSVIDs(t.Context(), sels, aud, id)
		if err != nil {
			t.Fatalf("JWTSVIDs: %v", err)
		}
		return svids
	}
	got := fetch([]string{"x"}, spiffeid.ID{})
	if len(got) != 2 || got[0].ID != a.SPIFFEID || got[1].ID != b.SPIFFEID {
		t.Fatalf("JWTSVIDs = %+v, want one for a then one for b", got)
	}
	if got[0].Hint != "first" || got[1].Hint != "" {
		t.Errorf("hints %q %q", got[0].Hint, got[1].Hint)
	}
	for _, svid := range got {
		v, err := c.ValidateJWTSVID(t.Context(), nil, svid.Token, "x")
		if err != nil || v.ID != svid.ID {
			t.Errorf("ValidateJWTSVID = %v, %v", v, err)
		}
	}
	if n := up.jwtCalls.Load(); n != 2 {
		t.Fatalf("%d JWT signings, want 2", n)
	}

	again := fetch([]string{"x"}, spiffeid.ID{})
	if again[0].Token != got[0].Token || again[1].Token != got[1].Token || up.jwtCalls.Load() != 2 {
		t.Error("a second fetch for the same audience was not served from the cache")
	}
	only := fetch([]string{"x"}, b.SPIFFEID)
	if len(only) != 1 || only[0].Token != got[1].Token {
		t.Errorf("asking for b's ID gave %+v", only)
	}
	if _, err := c.JWTSVIDs(t.Context(), sels, []string{"x"}, spiffeid.RequireFromString("spiffe://example.org/none")); !errors.Is(err, ErrNoIdentity) {
		t.Errorf("an ID the caller does not hold: %v, want ErrNoIdentity", err)
	}
	other := fetch([]string{"y"}, spiffeid.ID{})
	if other[0].Token == got[0].Token || up.jwtCalls.Load() != 4 {
		t.Error("another audience must get its own tokens")
	}

	// b's token (1 minute) is due at 30s, a's (5 minutes) at 2m30s.
	clock.Set(clock.Now().Add(29 * time.Second))
	if fetch([]string{"x"}, b.SPIFFEID)[0].Token != got[1].Token {
		t.Error("a token was replaced before half its lifetime")
	}
	clock.Set(clock.Now().Add(2 * time.Second))
	fresh := fetch([]string{"x"}, spiffeid.ID{})
	if fresh[0].Token != got[0].Token {
		t.Error("a's token was replaced before half its lifetime")
	}
	if fresh[1].Token == got[1].Token {
		t.Error("b's token was served past half its lifetime")
	}

	// A changed entry, or new JWT keys, drop cached tokens.
	hinted := clone(a)
	hinted.Hint = "second"
	c.SetEntries([]*Entry{b, a2, hinted})
	if h := fetch([]string{"x"}, a.SPIFFEID); h[0].Token == got[0].Token || h[0].Hint != "second" {
		t.Error("a changed entry kept its cached token")
	}
	cur := fetch([]string{"x"}, a.SPIFFEID)[0].Token
	withRoot := up.bundle()
	withRoot.AddX509Authority(newTestCA(t, testTD).Cert)
	c.SetBundles(withRoot, nil)
	if fetch([]string{"x"}, a.SPIFFEID)[0].Token != cur {
		t.Error("an X.509-only bundle change dropped cached JWT-SVIDs")
	}
	up.set(func(u *testUpstream) { u.jwtKID, u.jwtKey = "kid-2", testkit.NewKey(t) })
	c.SetBundles(up.bundle(), nil)
	if fetch([]string{"x"}, a.SPIFFEID)[0].Token == cur {
		t.Error("new JWT keys did not drop cached tokens")
	}

	up.SetFail(errors.New("no signer"))
	if _, err := c.JWTSVIDs(t.Context(), sels, []string{"z"}, spiffeid.ID{}); err == nil || !strings.Contains(err.Error(), "no signer") {
		t.Errorf("upstream failure: %v", err)
	}
	if _, err := c.JWTSVIDs(t.Context(), mustSels("unix:uid:2"), []string{"x"}, spiffeid.ID{}); !errors.Is(err, ErrNoIdentity) {
		t.Errorf("caller without entries: %v", err)
	}
}

// TestJWTSVIDAudienceIsExact: every token handed out names exactly the
// audience asked for. Audiences joined with a separator once made
// ["x", "y"] and ["x\x00y"] share a cache key, and the second caller got
// the first one's token; a token the upstream signed for another audience
// is refused and not cached.
func TestJWTSVIDAudienceIsExact(t *testing.T) {
	c, up := newTestCache(t)
	c.SetEntries([]*Entry{testEntry("a", "spiffe://example.org/a", 1, "unix:uid:1")})
	c.SetBundles(up.bundle(), nil)
	sels := mustSels("unix:uid:1")
	for _, aud := range [][]string{{"x", "y"}, {"x\x00y"}, {"x\x00", "y"}, {"x", "\x00y"}, {"xy"}, {"y", "x"}, {"x", "y"}} {
		svids, err := c.JWTSVIDs(t.Context(), sels, aud, spiffeid.ID{})
		if err != nil {
			t.Fatalf("JWTSVIDs(%q): %v", aud, err)
		}
		if got := tokenAud(t, svids[0].Token); !slices.Equal(got, aud) {
			t.Errorf("asked for audience %q, got a token for %q", aud, got)
		}
	}
	if n := up.jwtCalls.Load(); n != 6 {
		t.Errorf("%d JWT signings for 6 distinct audiences asked for 7 times, want 6", n)
	}

	up.set(func(u *testUpstream) { u.jwtAudience = []string{"z"} })
	for range 2 {
		if _, err := c.JWTSVIDs(t.Context(), sels, []string{"w"}, spiffeid.ID{}); err == nil || !strings.Contains(err.Error(), "not the") {
			t.Fatalf("a token signed for another audience: %v, want refused", err)
		}
	}
	if n := up.jwtCalls.Load(); n != 8 {
		t.Errorf("%d JWT signings, want 8: a refused token must not be cached", n)
	}
	up.set(func(u *testUpstream) { u.jwtAudience, u.jwtSubject = nil, "spiffe://example.org/b" })
	if _, err := c.JWTSVIDs(t.Context(), sels, []string{"v"}, spiffeid.ID{}); err == nil || !strings.Contains(err.Error(), "with subject") {
		t.Errorf("a token signed for another subject: %v, want refused", err)
	}
}

// A JWT-SVID is handed out, and cached, only if the key that signed it is
// in the local bundle. One signed by a key the bundle dropped while the
// signing was in flight was cached after SetBundles had cleared the cache,
// and served until half its lifetime had passed; ValidateJWTSVID refused
// it. The agent signs again once; a token whose key it still does not hold
// (an upstream signing ahead of the bundle it delivers) is an error, not
// cached, until the bundle catches up.
func TestJWTSVIDSignedWithKeyNotInBundleIsNotServed(t *testing.T) {
	c, up := newTestCache(t)
	e := entryA()
	hold(c, up, e)
	sels := mustSels("unix:uid:1")
	fetch := func(aud string) ([]*JWTSVID, error) {
		return c.JWTSVIDs(t.Context(), sels, []string{aud}, spiffeid.ID{})
	}
	valid := func(what, aud string, svids []*JWTSVID) {
		t.Helper()
		if _, err := c.ValidateJWTSVID(t.Context(), sels, svids[0].Token, aud); err != nil {
			t.Errorf("%s: the token handed out does not validate with the agent's bundle: %v", what, err)
		}
		if kid := tokenKID(t, svids[0].Token); kid != up.jwtKID {
			t.Errorf("%s: a token signed with key %q, the upstream's is %q", what, kid, up.jwtKID)
		}
	}

	// The key rotates, and the old one leaves the bundle, while the first
	// token is signed with it.
	rotated := false
	up.set(func(u *testUpstream) {
		u.jwtHook = func() {
			if rotated {
				return
			}
			rotated = true
			up.set(func(u *testUpstream) { u.jwtKID, u.jwtKey = "kid-2", testkit.NewKey(t) })
			c.SetBundles(up.bundle(), nil)
		}
	})
	for i := range 2 {
		svids, err := fetch("x")
		if err != nil {
			t.Fatalf("fetch %d: %v", i, err)
		}
		valid(fmt.Sprintf("fetch %d after a rotation during signing", i), "x", svids)
	}
	if n := up.jwtCalls.Load(); n != 2 {
		t.Errorf("%d JWT signings, want 2: one with the dropped key, one again, then served from the cache", n)
	}

	// An upstream that signs with a key it has not delivered yet.
	up.set(func(u *testUpstream) { u.jwtHook, u.jwtKID, u.jwtKey = nil, "kid-3", testkit.NewKey(t) })
	for range 2 {
		if _, err := fetch("y"); err == nil || !strings.Contains(err.Error(), `"kid-3"`) {
			t.Fatalf("a token signed with a key not in the bundle: %v, want refused", err)
		}
	}
	if n := up.jwtCalls.Load(); n != 6 {
		t.Errorf("%d JWT signings, want 6: signed again once per fetch, never cached", n)
	}
	c.SetBundles(up.bundle(), nil)
	svids, err := fetch("y")
	if err != nil {
		t.Fatalf("once the bundle holds the key: %v", err)
	}
	valid("once the bundle holds the key", "y", svids)
}

// tokenKID reads a token's kid header.
func tokenKID(t *testing.T, token string) string {
	t.Helper()
	tok, err := jwt.ParseSigned(token, jwtSVIDAlgorithms)
	if err != nil {
		t.Fatal(err)
	}
	return tok.Headers[0].KeyID
}

// tokenAud reads a token's aud claim, a string or a list, as a list.
func tokenAud(t *testing.T, token string) []string {
	t.Helper()
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		t.Fatalf("not a JWS: %q", token)
	}
	payload, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		t.Fatal(err)
	}
	var claims struct {
		Aud json.RawMessage `json:"aud"`
	}
	if err := json.Unmarshal(payload, &claims); err != nil {
		t.Fatal(err)
	}
	var one string
	if json.Unmarshal(claims.Aud, &one) == nil {
		return []string{one}
	}
	var list []string
	if err := json.Unmarshal(claims.Aud, &list); err != nil {
		t.Fatalf("aud claim %s: %v", claims.Aud, err)
	}
	return list
}

func TestValidateJWTSVID(t *testing.T) {
	c, up := newTestCache(t)
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Millisecond)
	defer cancel()
	if _, err := c.ValidateJWTSVID(ctx, nil, "x", "y"); !errors.Is(err, ErrNotReady) {
		t.Errorf("before ready: %v", err)
	}
	fedKey := testkit.NewKey(t)
	fed := spiffebundle.New(otherTD)
	if err := fed.AddJWTAuthority("fed-1", fedKey.Public()); err != nil {
		t.Fatal(err)
	}
	fedEntry := testEntry("a", "spiffe://example.org/a", 1, "unix:uid:1")
	fedEntry.FederatesWith = []spiffeid.TrustDomain{otherTD}
	c.SetEntries([]*Entry{fedEntry})
	caller := mustSels("unix:uid:1")
	c.SetBundles(up.bundle(), []*spiffebundle.Bundle{fed})
	now := time.Now()
	sign := func(key crypto.Signer, kid, sub string) string {
		tok, err := testkit.SignJWT(key, kid, sub, []string{"aud"}, now, now.Add(time.Minute))
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	good := sign(up.jwtKey, up.jwtKID, "spiffe://example.org/w")
	v, err := c.ValidateJWTSVID(t.Context(), caller, good, "aud")
	if err != nil || v.ID.String() != "spiffe://example.org/w" {
		t.Fatalf("a good token: %v, %v", v, err)
	}
	if _, err := c.ValidateJWTSVID(t.Context(), caller, good, "other"); err == nil {
		t.Error("a token validated for another audience")
	}
	foreign := testkit.NewKey(t)
	if _, err := c.ValidateJWTSVID(t.Context(), caller, sign(foreign, up.jwtKID, "spiffe://example.org/w"), "aud"); err == nil {
		t.Error("a token signed by a foreign key under a known kid validated")
	}
	if _, err := c.ValidateJWTSVID(t.Context(), caller, sign(foreign, "unknown", "spiffe://example.org/w"), "aud"); err == nil {
		t.Error("a token with an unknown kid validated")
	}
	// A token is checked with its subject's trust domain: other.org's key
	// cannot vouch for example.org, and vice versa.
	if _, err := c.ValidateJWTSVID(t.Context(), caller, sign(fedKey, "fed-1", "spiffe://other.org/w"), "aud"); err != nil {
		t.Errorf("a federated token: %v", err)
	}
	if _, err := c.ValidateJWTSVID(t.Context(), caller, sign(fedKey, "fed-1", "spiffe://example.org/w"), "aud"); err == nil {
		t.Error("a federated key vouched for the local trust domain")
	}
	if _, err := c.ValidateJWTSVID(t.Context(), caller, sign(up.jwtKey, up.jwtKID, "spiffe://third.org/w"), "aud"); err == nil {
		t.Error("a token of a trust domain without a bundle validated")
	}
	// Only the bundles the caller could fetch itself count: with no entry
	// federating with other.org, its tokens are not valid for this caller.
	if _, err := c.ValidateJWTSVID(t.Context(), mustSels("unix:uid:2"), sign(fedKey, "fed-1", "spiffe://other.org/w"), "aud"); err == nil {
		t.Error("a caller without federates_with validated a federated token")
	}
	if _, err := c.ValidateJWTSVID(t.Context(), mustSels("unix:uid:2"), good, "aud"); err != nil {
		t.Errorf("a caller with no identity cannot validate a local token: %v", err)
	}
	c.SetBundles(up.bundle(), nil)
	if _, err := c.ValidateJWTSVID(t.Context(), caller, sign(fedKey, "fed-1", "spiffe://other.org/w"), "aud"); err == nil {
		t.Error("a token validated after its trust domain's bundle was removed")
	}
}

// A caller that asks for ever new audiences churns its own entry's cached
// tokens only: another workload's token stays cached, and the cache holds
// at most maxJWTPerEntry of one entry.
func TestJWTCacheBoundsOneEntry(t *testing.T) {
	c, up, _ := newClockedCache(t)
	victim := testEntry("victim", "spiffe://example.org/victim", 1, "unix:uid:1")
	flood := testEntry("flood", "spiffe://example.org/flood", 2, "unix:uid:2")
	hold(c, up, victim, flood)
	first, err := c.JWTSVIDs(t.Context(), mustSels("unix:uid:1"), []string{"db"}, spiffeid.ID{})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 3 * maxJWTPerEntry {
		if _, err := c.JWTSVIDs(t.Context(), mustSels("unix:uid:2"), []string{fmt.Sprint("aud-", i)}, spiffeid.ID{}); err != nil {
			t.Fatal(err)
		}
	}
	if n := c.jwts.count(); n != maxJWTPerEntry+1 {
		t.Errorf("%d tokens cached, want %d of the flooding entry and the victim's", n, maxJWTPerEntry+1)
	}
	calls := up.jwtCalls.Load()
	again, err := c.JWTSVIDs(t.Context(), mustSels("unix:uid:1"), []string{"db"}, spiffeid.ID{})
	if err != nil || again[0].Token != first[0].Token || up.jwtCalls.Load() != calls {
		t.Error("the victim's cached token was evicted by another entry's audiences")
	}
}
