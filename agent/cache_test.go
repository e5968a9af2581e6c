package agent

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/lanyard-dev/lanyard/conf"
	"math/big"
	"net/url"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/attestor"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

var (
	testTD  = spiffeid.RequireTrustDomainFromString("example.org")
	otherTD = spiffeid.RequireTrustDomainFromString("other.org")
	thirdTD = spiffeid.RequireTrustDomainFromString("third.org")
)

// testCA is a real self-signed CA that signs X.509-SVIDs.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

func newTestCA(t *testing.T, td spiffeid.TrustDomain) *testCA {
	t.Helper()
	key := newKey(t)
	u, _ := url.Parse(td.IDString())
	tmpl := &x509.Certificate{
		SerialNumber:          serial(t),
		Subject:               pkix.Name{CommonName: "test CA " + td.Name()},
		URIs:                  []*url.URL{u},
		NotBefore:             time.Now().Add(-24 * time.Hour),
		NotAfter:              time.Now().Add(365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &testCA{cert: cert, key: key}
}

func newKey(t *testing.T) *ecdsa.PrivateKey {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return key
}

func serial(t *testing.T) *big.Int {
	t.Helper()
	n, err := rand.Int(rand.Reader, big.NewInt(1<<62))
	if err != nil {
		t.Fatal(err)
	}
	return n.Add(n, big.NewInt(1))
}

func (ca *testCA) sign(pub crypto.PublicKey, id string, notBefore, notAfter time.Time) (*x509.Certificate, error) {
	u, err := url.Parse(id)
	if err != nil {
		return nil, err
	}
	n, err := rand.Int(rand.Reader, big.NewInt(1<<62))
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          n.Add(n, big.NewInt(1)),
		Subject:               pkix.Name{Organization: []string{"test"}},
		URIs:                  []*url.URL{u},
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, pub, ca.key)
	if err != nil {
		return nil, err
	}
	return x509.ParseCertificate(der)
}

// testUpstream signs with real keys and counts what it is asked.
type testUpstream struct {
	mu       sync.Mutex
	ca       *testCA
	jwtKID   string
	jwtKey   *ecdsa.PrivateKey
	now      func() time.Time
	backdate time.Duration
	fail     error
	gate     chan struct{} // when set, signing waits for it to close
	// jwtAudience, when set, is the audience of every JWT-SVID signed,
	// whatever was asked: an upstream that gets it wrong.
	jwtAudience []string
	// jwtSubject, when set, is the subject of every JWT-SVID signed.
	jwtSubject string
	// hook may rewrite the results of a signing call.
	hook func([]X509Result) []X509Result
	// jwtHook, when set, runs after a JWT-SVID is signed and before it is
	// returned: a test changes the bundle while a signing is in flight.
	jwtHook func()
	batches []int

	x509Calls, jwtCalls atomic.Int32
}

// Resync reports false: the test upstream's entries change only when the
// test sets them.
func (u *testUpstream) Resync(context.Context) (bool, error) { return false, nil }

func (u *testUpstream) Reconfigure(*conf.Section) error { return nil }

func newTestUpstream(t *testing.T) *testUpstream {
	return &testUpstream{ca: newTestCA(t, testTD), jwtKID: "kid-1", jwtKey: newKey(t), now: time.Now}
}

func (u *testUpstream) Run(ctx context.Context, _ Sink) error {
	<-ctx.Done()
	return nil
}

func (u *testUpstream) MintX509SVIDs(ctx context.Context, reqs []X509Request) ([]X509Result, error) {
	u.x509Calls.Add(1)
	u.mu.Lock()
	gate, fail, ca, hook, backdate := u.gate, u.fail, u.ca, u.hook, u.backdate
	u.batches = append(u.batches, len(reqs))
	u.mu.Unlock()
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if fail != nil {
		return nil, fail
	}
	now := u.now()
	out := make([]X509Result, len(reqs))
	for i, r := range reqs {
		if k, ok := r.Key.(*ecdsa.PrivateKey); !ok || k == nil {
			return nil, fmt.Errorf("request %d for %s has no key", i, r.Entry.SPIFFEID)
		}
		ttl := r.Entry.X509SVIDTTL
		if ttl == 0 {
			ttl = time.Hour
		}
		leaf, err := ca.sign(r.Key.Public(), r.Entry.SPIFFEID.String(), now.Add(-backdate), now.Add(ttl))
		out[i] = X509Result{Chain: []*x509.Certificate{leaf}, Err: err}
	}
	if hook != nil {
		out = hook(out)
	}
	return out, nil
}

func (u *testUpstream) MintJWTSVID(_ context.Context, e *Entry, audience []string) (*JWTSVID, error) {
	u.jwtCalls.Add(1)
	u.mu.Lock()
	kid, key, fail, hook := u.jwtKID, u.jwtKey, u.fail, u.jwtHook
	if u.jwtAudience != nil {
		audience = u.jwtAudience
	}
	subject := e.SPIFFEID.String()
	if u.jwtSubject != "" {
		subject = u.jwtSubject
	}
	u.mu.Unlock()
	if fail != nil {
		return nil, fail
	}
	ttl := e.JWTSVIDTTL
	if ttl == 0 {
		ttl = 5 * time.Minute
	}
	now := u.now().Truncate(time.Second)
	token, err := signJWT(key, kid, subject, audience, now, now.Add(ttl))
	if err != nil {
		return nil, err
	}
	if hook != nil {
		hook()
	}
	return &JWTSVID{Token: token, ID: e.SPIFFEID, Audience: audience, IssuedAt: now, ExpiresAt: now.Add(ttl)}, nil
}

func signJWT(key crypto.Signer, kid, sub string, aud []string, iat, exp time.Time) (string, error) {
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: jose.JSONWebKey{Key: key, KeyID: kid}},
		(&jose.SignerOptions{}).WithType("JWT"))
	if err != nil {
		return "", err
	}
	return jwt.Signed(signer).Claims(jwt.Claims{Subject: sub, Audience: aud,
		IssuedAt: jwt.NewNumericDate(iat), Expiry: jwt.NewNumericDate(exp)}).Serialize()
}

func (u *testUpstream) set(f func(u *testUpstream)) {
	u.mu.Lock()
	f(u)
	u.mu.Unlock()
}

// bundle is the upstream's current local bundle.
func (u *testUpstream) bundle() *spiffebundle.Bundle {
	u.mu.Lock()
	defer u.mu.Unlock()
	b := spiffebundle.FromX509Authorities(testTD, []*x509.Certificate{u.ca.cert})
	if err := b.AddJWTAuthority(u.jwtKID, u.jwtKey.Public()); err != nil {
		panic(err)
	}
	return b
}

func newTestCache(t *testing.T) (*Cache, *testUpstream) {
	up := newTestUpstream(t)
	return NewCache(hclog.NewNullLogger(), up), up
}

func testEntry(id, spiffeID string, created int64, sels ...string) *Entry {
	return &Entry{ID: id, SPIFFEID: spiffeid.RequireFromString(spiffeID), CreatedAt: created, Selectors: mustSels(sels...)}
}

func mustSels(ss ...string) []attestor.Selector {
	var out []attestor.Selector
	for _, s := range ss {
		sel, err := attestor.ParseSelector(s)
		if err != nil {
			panic(err)
		}
		out = append(out, sel)
	}
	return attestor.SortSelectors(out)
}

func clone(e *Entry) *Entry {
	c := *e
	c.Selectors = slices.Clone(e.Selectors)
	return &c
}

func entryIDs(snap *X509Snapshot) []string {
	var ids []string
	for _, s := range snap.SVIDs {
		ids = append(ids, s.EntryID)
	}
	return ids
}

// fakeClock is a settable clock for the cache and the test upstream.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (f *fakeClock) Now() time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.now
}

func (f *fakeClock) Set(t time.Time) {
	f.mu.Lock()
	f.now = t
	f.mu.Unlock()
}

// eventually polls cond for a bounded time.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (c *Cache) svidOf(entryID string) *X509SVID { return c.store.svid(entryID) }

// kickRenewal has the rotator look at its queue now, as after the clock
// moved.
func (c *Cache) kickRenewal() { c.rotator.kickLoop() }

func expectSignal(t *testing.T, s *Subscription, what string) {
	t.Helper()
	select {
	case <-s.C:
	default:
		t.Errorf("no notification after %s", what)
	}
}

func expectNoSignal(t *testing.T, s *Subscription, what string) {
	t.Helper()
	select {
	case <-s.C:
		t.Errorf("a notification after %s", what)
	default:
	}
}

// checkSVID checks that svid is a well-formed, verifiable SVID for e.
func checkSVID(t *testing.T, svid *X509SVID, e *Entry, bundle *spiffebundle.Bundle) {
	t.Helper()
	if svid.EntryID != e.ID || svid.ID != e.SPIFFEID {
		t.Errorf("SVID for %s/%s, want %s/%s", svid.EntryID, svid.ID, e.ID, e.SPIFFEID)
	}
	id, _, err := x509svid.Verify(svid.Chain, bundle)
	if err != nil || id != e.SPIFFEID {
		t.Errorf("x509svid.Verify = %v, %v", id, err)
	}
	var der []byte
	for _, c := range svid.Chain {
		der = append(der, c.Raw...)
	}
	if !bytes.Equal(der, svid.ChainDER) {
		t.Error("ChainDER is not the chain's certificates")
	}
	key, err := x509.ParsePKCS8PrivateKey(svid.KeyDER)
	if err != nil {
		t.Fatalf("KeyDER: %v", err)
	}
	if !svid.Chain[0].PublicKey.(*ecdsa.PublicKey).Equal(key.(*ecdsa.PrivateKey).Public()) {
		t.Error("KeyDER does not match the leaf")
	}
	if !svid.NotAfter.Equal(svid.Chain[0].NotAfter) || !svid.NotBefore.Equal(svid.Chain[0].NotBefore) {
		t.Error("NotBefore/NotAfter differ from the leaf")
	}
	if !svid.RenewAt.After(svid.NotBefore) || !svid.RenewAt.Before(svid.NotAfter) {
		t.Errorf("RenewAt %v outside %v..%v", svid.RenewAt, svid.NotBefore, svid.NotAfter)
	}
}

func TestMatchIsSubset(t *testing.T) {
	c, up := newTestCache(t)
	a := testEntry("a", "spiffe://example.org/a", 1, "unix:uid:1")
	ab := testEntry("ab", "spiffe://example.org/ab", 2, "unix:uid:1", "unix:gid:2")
	cc := testEntry("c", "spiffe://example.org/c", 3, "unix:uid:3")
	c.SetEntries([]*Entry{cc, ab, a})
	c.SetBundles(up.bundle(), nil)
	sel := func(s string) attestor.Selector { return mustSels(s)[0] }
	for _, tc := range []struct {
		name string
		sels []attestor.Selector
		want []string
	}{
		{"one selector", mustSels("unix:uid:1"), []string{"a"}},
		{"two selectors", mustSels("unix:uid:1", "unix:gid:2"), []string{"a", "ab"}},
		{"superset", mustSels("k8s:ns:x", "unix:uid:1", "unix:gid:2", "unix:uid:3"), []string{"a", "ab", "c"}},
		{"part of an entry", mustSels("unix:gid:2"), nil},
		{"unrelated", mustSels("unix:uid:9"), nil},
		{"none", nil, nil},
		{"unsorted", []attestor.Selector{sel("unix:uid:3"), sel("unix:gid:2"), sel("unix:uid:1")}, []string{"a", "ab", "c"}},
		// A repeated selector must not stand in for a missing one.
		{"duplicates", []attestor.Selector{sel("unix:uid:1"), sel("unix:uid:1")}, []string{"a"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			snap, err := c.X509Identities(t.Context(), tc.sels)
			if tc.want == nil {
				if !errors.Is(err, ErrNoIdentity) {
					t.Fatalf("X509Identities = %v, %v; want ErrNoIdentity", snap, err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := entryIDs(snap); !slices.Equal(got, tc.want) {
				t.Fatalf("entries %v, want %v", got, tc.want)
			}
			for i, svid := range snap.SVIDs {
				checkSVID(t, svid, c.store.entry(tc.want[i]), up.bundle())
			}
			if snap.Local == nil || !snap.Local.Equal(up.bundle()) {
				t.Error("the snapshot lacks the local bundle")
			}
		})
	}
}

func TestOrderAndHints(t *testing.T) {
	c, up := newTestCache(t)
	z := testEntry("z", "spiffe://example.org/z", 5, "unix:uid:1")
	y := testEntry("y", "spiffe://example.org/y", 1, "unix:uid:1")
	y.Hint = "h"
	a := testEntry("a", "spiffe://example.org/a", 5, "unix:uid:1")
	a.Hint = "h" // younger than y: dropped
	w := testEntry("w", "spiffe://example.org/w", 7, "unix:uid:1")
	c.SetEntries([]*Entry{z, a, w, y})
	c.SetBundles(up.bundle(), nil)
	snap, err := c.X509Identities(t.Context(), mustSels("unix:uid:1"))
	if err != nil {
		t.Fatal(err)
	}
	if got := entryIDs(snap); !slices.Equal(got, []string{"y", "z", "w"}) {
		t.Errorf("entries %v, want [y z w]: oldest first, ties by ID, one per hint", got)
	}
	if !slices.Equal(snap.Hints, []string{"h", "", ""}) {
		t.Errorf("hints %q", snap.Hints)
	}
	// Without the older entry, the younger one gets the hint.
	c.SetEntries([]*Entry{z, a, w})
	snap, err = c.X509Identities(t.Context(), mustSels("unix:uid:1"))
	if err != nil {
		t.Fatal(err)
	}
	if got := entryIDs(snap); !slices.Equal(got, []string{"a", "z", "w"}) || snap.Hints[0] != "h" {
		t.Errorf("entries %v hints %q, want [a z w] with a holding the hint", got, snap.Hints)
	}
}

func TestNotReady(t *testing.T) {
	c, up := newTestCache(t)
	ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
	defer cancel()
	if _, err := c.X509Identities(ctx, mustSels("unix:uid:1")); !errors.Is(err, ErrNotReady) {
		t.Errorf("X509Identities before the upstream delivered = %v, want ErrNotReady", err)
	}
	c.SetEntries(nil)
	select {
	case <-c.Ready():
		t.Fatal("ready with entries but no bundles")
	default:
	}
	c.SetBundles(up.bundle(), nil)
	select {
	case <-c.Ready():
	default:
		t.Fatal("not ready with entries and bundles")
	}
	// An empty entry list is a valid state: nobody has an identity.
	if _, err := c.X509Identities(t.Context(), mustSels("unix:uid:1")); !errors.Is(err, ErrNoIdentity) {
		t.Errorf("X509Identities with no entries = %v, want ErrNoIdentity", err)
	}
}

func TestConcurrentFetchMintsOnce(t *testing.T) {
	c, up := newTestCache(t)
	e := testEntry("a", "spiffe://example.org/a", 1, "unix:uid:1")
	c.SetEntries([]*Entry{e})
	c.SetBundles(up.bundle(), nil)
	gate := make(chan struct{})
	up.set(func(u *testUpstream) { u.gate = gate })

	const n = 16
	results := make(chan *X509SVID, n)
	errs := make(chan error, n)
	for range n {
		go func() {
			snap, err := c.X509Identities(context.Background(), mustSels("unix:uid:1"))
			if err != nil {
				errs <- err
				return
			}
			results <- snap.SVIDs[0]
		}()
	}
	eventually(t, "the first signing call", func() bool { return up.x509Calls.Load() >= 1 })
	// Give the other callers time to pile up on the signing in flight.
	time.Sleep(100 * time.Millisecond)
	close(gate)
	var first *X509SVID
	for range n {
		select {
		case err := <-errs:
			t.Fatal(err)
		case svid := <-results:
			if first == nil {
				first = svid
			} else if svid != first {
				t.Error("callers got different SVIDs for one entry")
			}
		case <-time.After(15 * time.Second):
			t.Fatal("callers did not return")
		}
	}
	if got := up.x509Calls.Load(); got != 1 {
		t.Errorf("the upstream was asked %d times, want once", got)
	}
}

func TestMintBatches(t *testing.T) {
	c, up := newTestCache(t)
	var entries []*Entry
	for i := range maxBatch + 1 {
		entries = append(entries, testEntry(string(rune('a'+i%26))+string(rune('0'+i/26)), "spiffe://example.org/w", int64(i), "unix:uid:1"))
	}
	c.SetEntries(entries)
	c.SetBundles(up.bundle(), nil)
	snap, err := c.X509Identities(t.Context(), mustSels("unix:uid:1"))
	if err != nil {
		t.Fatal(err)
	}
	if len(snap.SVIDs) != maxBatch+1 {
		t.Errorf("%d SVIDs, want %d", len(snap.SVIDs), maxBatch+1)
	}
	up.mu.Lock()
	batches := slices.Clone(up.batches)
	up.mu.Unlock()
	if !slices.Equal(batches, []int{maxBatch, 1}) {
		t.Errorf("signing batches %v, want [%d 1]", batches, maxBatch)
	}
}

func TestSetEntriesKeepsAndDropsSVIDs(t *testing.T) {
	c, up := newTestCache(t)
	e := testEntry("a", "spiffe://example.org/a", 1, "unix:uid:1")
	other := testEntry("b", "spiffe://example.org/b", 2, "unix:uid:2")
	c.SetEntries([]*Entry{e, other})
	c.SetBundles(up.bundle(), nil)
	fetch := func() *X509Snapshot {
		t.Helper()
		snap, err := c.X509Identities(t.Context(), mustSels("unix:uid:1"))
		if err != nil {
			t.Fatal(err)
		}
		return snap
	}
	first := fetch().SVIDs[0]
	if c.svidOf("b") != nil {
		t.Error("an SVID was minted for an entry nobody asked for")
	}

	c.SetEntries([]*Entry{clone(e), clone(other)})
	if got := fetch().SVIDs[0]; got != first {
		t.Error("an unchanged entry lost its SVID")
	}
	hinted := clone(e)
	hinted.Hint, hinted.RevisionNumber, hinted.JWTSVIDTTL = "new-hint", 2, time.Minute
	c.SetEntries([]*Entry{hinted, clone(other)})
	snap := fetch()
	if snap.SVIDs[0] != first || snap.Hints[0] != "new-hint" {
		t.Error("a change that does not alter the certificate must keep the SVID and show the new hint")
	}
	if up.x509Calls.Load() != 1 {
		t.Errorf("%d signing calls, want 1", up.x509Calls.Load())
	}

	moved := clone(hinted)
	moved.SPIFFEID = spiffeid.RequireFromString("spiffe://example.org/moved")
	c.SetEntries([]*Entry{moved, clone(other)})
	if c.svidOf("a") != nil {
		t.Error("changing the SPIFFE ID did not drop the SVID")
	}
	renamed := fetch().SVIDs[0]
	if renamed == first || renamed.ID != moved.SPIFFEID {
		t.Errorf("after the SPIFFE ID changed the SVID is for %s", renamed.ID)
	}

	dns := clone(moved)
	dns.DNSNames = []string{"a.example.org"}
	c.SetEntries([]*Entry{dns, clone(other)})
	if c.svidOf("a") != nil {
		t.Error("changing the DNS names did not drop the SVID")
	}
	ttl := clone(dns)
	ttl.X509SVIDTTL = time.Minute
	fetch()
	c.SetEntries([]*Entry{ttl, clone(other)})
	if c.svidOf("a") != nil {
		t.Error("changing the X509 TTL did not drop the SVID")
	}
	fetch()

	c.SetEntries([]*Entry{clone(other)})
	if c.svidOf("a") != nil {
		t.Error("a removed entry kept its SVID")
	}
	if _, err := c.X509Identities(t.Context(), mustSels("unix:uid:1")); !errors.Is(err, ErrNoIdentity) {
		t.Errorf("after removal: %v, want ErrNoIdentity", err)
	}
}

func TestEntryChangedWhileMinting(t *testing.T) {
	c, up := newTestCache(t)
	e := testEntry("a", "spiffe://example.org/old", 1, "unix:uid:1")
	c.SetEntries([]*Entry{e})
	c.SetBundles(up.bundle(), nil)
	gate := make(chan struct{})
	up.set(func(u *testUpstream) { u.gate = gate })
	done := make(chan *X509Snapshot, 1)
	errc := make(chan error, 1)
	go func() {
		snap, err := c.X509Identities(context.Background(), mustSels("unix:uid:1"))
		if err != nil {
			errc <- err
			return
		}
		done <- snap
	}()
	eventually(t, "the signing call", func() bool { return up.x509Calls.Load() >= 1 })
	changed := clone(e)
	changed.SPIFFEID = spiffeid.RequireFromString("spiffe://example.org/new")
	c.SetEntries([]*Entry{changed})
	up.set(func(u *testUpstream) { u.gate = nil })
	close(gate)
	select {
	case snap := <-done:
		if snap.SVIDs[0].ID != changed.SPIFFEID {
			t.Errorf("the caller got an SVID for %s after the entry changed to %s", snap.SVIDs[0].ID, changed.SPIFFEID)
		}
	case err := <-errc:
		t.Fatal(err)
	case <-time.After(15 * time.Second):
		t.Fatal("X509Identities did not return")
	}
}

func TestUpstreamErrors(t *testing.T) {
	c, up := newTestCache(t)
	e := testEntry("a", "spiffe://example.org/a", 1, "unix:uid:1")
	c.SetEntries([]*Entry{e})
	c.SetBundles(up.bundle(), nil)
	for _, tc := range []struct {
		name string
		set  func(u *testUpstream)
		want string
	}{
		{"call fails", func(u *testUpstream) { u.fail = errors.New("upstream down") }, "upstream down"},
		{"one result fails", func(u *testUpstream) {
			u.hook = func(r []X509Result) []X509Result { return []X509Result{{Err: errors.New("entry refused")}} }
		}, "entry refused"},
		{"wrong SPIFFE ID", func(u *testUpstream) {
			u.hook = func(r []X509Result) []X509Result {
				leaf, err := u.ca.sign(r[0].Chain[0].PublicKey, "spiffe://example.org/else", time.Now(), time.Now().Add(time.Hour))
				return []X509Result{{Chain: []*x509.Certificate{leaf}, Err: err}}
			}
		}, "not spiffe://example.org/a"},
		{"too few results", func(u *testUpstream) {
			u.hook = func([]X509Result) []X509Result { return nil }
		}, "answered 0 of 1"},
		{"empty chain", func(u *testUpstream) {
			u.hook = func([]X509Result) []X509Result { return []X509Result{{}} }
		}, "empty chain"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up.set(func(u *testUpstream) { u.fail, u.hook = nil, nil })
			up.set(tc.set)
			_, err := c.X509Identities(t.Context(), mustSels("unix:uid:1"))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %v, want one saying %q", err, tc.want)
			}
			if c.svidOf("a") != nil {
				t.Error("a failed signing left an SVID")
			}
		})
	}
	up.set(func(u *testUpstream) { u.fail, u.hook = nil, nil })
	snap, err := c.X509Identities(t.Context(), mustSels("unix:uid:1"))
	if err != nil {
		t.Fatalf("after the upstream recovered: %v", err)
	}
	checkSVID(t, snap.SVIDs[0], e, up.bundle())
}

func TestSubscriptions(t *testing.T) {
	c, up := newTestCache(t)
	s := c.Subscribe()
	e := testEntry("a", "spiffe://example.org/a", 1, "unix:uid:1")
	c.SetEntries([]*Entry{e})
	expectSignal(t, s, "the first entries")
	b := up.bundle()
	c.SetBundles(b, nil)
	expectSignal(t, s, "the first bundles")
	first := c.store.local

	c.SetBundles(b.Clone(), nil)
	expectNoSignal(t, s, "an identical SetBundles")
	if c.store.local != first {
		t.Error("an identical bundle replaced the cached one")
	}
	c.SetEntries([]*Entry{clone(e)})
	expectNoSignal(t, s, "an identical SetEntries")

	fed := spiffebundle.FromX509Authorities(otherTD, []*x509.Certificate{newTestCA(t, otherTD).cert})
	c.SetBundles(b, []*spiffebundle.Bundle{fed})
	expectSignal(t, s, "a new federated bundle")
	c.SetBundles(b, []*spiffebundle.Bundle{fed.Clone()})
	expectNoSignal(t, s, "the same federated bundle again")
	c.SetBundles(b, nil)
	expectSignal(t, s, "a federated bundle removed")

	changed := clone(e)
	changed.Hint = "x"
	c.SetEntries([]*Entry{changed})
	expectSignal(t, s, "a changed entry")
	c.SetEntries(nil)
	expectSignal(t, s, "entries removed")
	c.SetEntries([]*Entry{e})
	expectSignal(t, s, "entries added")

	if _, err := c.X509Identities(t.Context(), mustSels("unix:uid:1")); err != nil {
		t.Fatal(err)
	}
	expectSignal(t, s, "an SVID was minted")

	b2 := up.bundle()
	b2.SetSequenceNumber(7)
	c.SetBundles(b2, nil)
	expectSignal(t, s, "a new bundle sequence number")

	// Many changes, one pending wake-up.
	c.SetEntries(nil)
	c.SetEntries([]*Entry{e})
	expectSignal(t, s, "two changes")
	expectNoSignal(t, s, "the one wake-up was read")

	s.Close()
	c.SetEntries(nil)
	expectNoSignal(t, s, "Close")
}

func TestSnapshotSame(t *testing.T) {
	c, up := newTestCache(t)
	c.SetEntries([]*Entry{testEntry("a", "spiffe://example.org/a", 1, "unix:uid:1")})
	c.SetBundles(up.bundle(), nil)
	s1, err := c.X509Identities(t.Context(), mustSels("unix:uid:1"))
	if err != nil {
		t.Fatal(err)
	}
	c.SetBundles(up.bundle(), nil)
	s2, _ := c.X509Identities(t.Context(), mustSels("unix:uid:1"))
	if !s1.Same(s2) {
		t.Error("snapshots of an unchanged cache differ")
	}
	b1, _ := c.Bundles(t.Context(), mustSels("unix:uid:1"), false)
	up.set(func(u *testUpstream) { u.jwtKID = "kid-2" })
	c.SetBundles(up.bundle(), nil)
	s3, _ := c.X509Identities(t.Context(), mustSels("unix:uid:1"))
	if !s1.Same(s3) {
		t.Error("an X.509 snapshot changed with the JWT keys, which it does not carry")
	}
	b2, _ := c.Bundles(t.Context(), mustSels("unix:uid:1"), false)
	if b1.SameJWT(b2) || !b1.SameX509(b2) || !b2.SameJWT(b2) {
		t.Error("BundleSnapshot.SameJWT/SameX509 are wrong after a JWT-only change")
	}
	up.set(func(u *testUpstream) { u.ca = newTestCA(t, testTD) })
	c.SetBundles(up.bundle(), nil)
	s4, _ := c.X509Identities(t.Context(), mustSels("unix:uid:1"))
	b3, _ := c.Bundles(t.Context(), mustSels("unix:uid:1"), false)
	if s1.Same(s4) || b2.SameX509(b3) || !b2.SameJWT(b3) {
		t.Error("a new X.509 root is not seen, or is seen by the JWT bundle")
	}
	var nilSnap *X509Snapshot
	if nilSnap.Same(s1) || s1.Same(nil) {
		t.Error("a nil snapshot is Same as another")
	}
}

func TestRotationRenewsShortLivedSVID(t *testing.T) {
	c, up := newTestCache(t)
	e := testEntry("a", "spiffe://example.org/a", 1, "unix:uid:1")
	e.X509SVIDTTL = 2 * time.Second
	c.SetEntries([]*Entry{e})
	c.SetBundles(up.bundle(), nil)
	snap, err := c.X509Identities(t.Context(), mustSels("unix:uid:1"))
	if err != nil {
		t.Fatal(err)
	}
	first := snap.SVIDs[0]
	s := c.Subscribe()
	defer s.Close()
	startRotation(t, c)
	deadline := time.After(15 * time.Second)
	for c.svidOf("a") == first {
		select {
		case <-s.C:
		case <-deadline:
			t.Fatal("the SVID was not renewed")
		}
	}
	renewed := c.svidOf("a")
	// Certificate times have one-second resolution: with a 2s TTL renewed
	// after about 1s, both may end in the same second.
	if renewed.NotAfter.Before(first.NotAfter) {
		t.Errorf("renewed SVID ends %v, before the old %v", renewed.NotAfter, first.NotAfter)
	}
	if renewed.Key == first.Key {
		t.Error("renewal reused the private key")
	}
	checkSVID(t, renewed, e, up.bundle())
	snap, err = c.X509Identities(t.Context(), mustSels("unix:uid:1"))
	if err != nil || snap.SVIDs[0] != renewed {
		t.Errorf("X509Identities after renewal = %v, %v; want the renewed SVID", snap, err)
	}
}

// Upstreams backdate NotBefore (SPIRE and the local CA by 10s). An SVID's
// renewal time must still lie ahead of the moment it was minted, or a short
// TTL makes rotation re-sign it in a busy loop.
func TestRenewAtAfterMinting(t *testing.T) {
	c, up := newTestCache(t)
	up.backdate = 10 * time.Second
	e := testEntry("a", "spiffe://example.org/a", 1, "unix:uid:1")
	e.X509SVIDTTL = 2 * time.Second
	c.SetEntries([]*Entry{e})
	c.SetBundles(up.bundle(), nil)
	before := time.Now()
	snap, err := c.X509Identities(t.Context(), mustSels("unix:uid:1"))
	if err != nil {
		t.Fatal(err)
	}
	svid := snap.SVIDs[0]
	if !svid.RenewAt.After(before) || !svid.RenewAt.Before(svid.NotAfter) {
		t.Errorf("RenewAt %v is not between the minting time %v and NotAfter %v", svid.RenewAt, before, svid.NotAfter)
	}
}

func TestFailedRenewalKeepsOldSVID(t *testing.T) {
	c, up, clock := newClockedCache(t)
	e := testEntry("a", "spiffe://example.org/a", 1, "unix:uid:1")
	c.SetEntries([]*Entry{e})
	c.SetBundles(up.bundle(), nil)
	snap, err := c.X509Identities(t.Context(), mustSels("unix:uid:1"))
	if err != nil {
		t.Fatal(err)
	}
	first := snap.SVIDs[0]
	up.set(func(u *testUpstream) { u.fail = errors.New("upstream down") })
	clock.Set(first.RenewAt.Add(time.Second))

	startRotation(t, c)
	eventually(t, "a renewal attempt", func() bool { return up.x509Calls.Load() >= 2 })
	if c.svidOf("a") != first {
		t.Fatal("a failed renewal dropped the SVID")
	}
	snap, err = c.X509Identities(t.Context(), mustSels("unix:uid:1"))
	if err != nil || snap.SVIDs[0] != first {
		t.Fatalf("X509Identities during failed renewals = %v, want the old SVID", err)
	}
	// It retries, and succeeds once the upstream is back.
	up.set(func(u *testUpstream) { u.fail = nil })
	eventually(t, "a retried renewal", func() bool { return c.svidOf("a") != first })
	if got := c.svidOf("a"); !got.NotAfter.After(first.NotAfter) {
		t.Error("the retried renewal did not extend the SVID")
	}
}

func TestNewCARenewsAtOnce(t *testing.T) {
	c, up := newTestCache(t)
	e := testEntry("a", "spiffe://example.org/a", 1, "unix:uid:1")
	c.SetEntries([]*Entry{e})
	c.SetBundles(up.bundle(), nil)
	snap, err := c.X509Identities(t.Context(), mustSels("unix:uid:1"))
	if err != nil {
		t.Fatal(err)
	}
	first := snap.SVIDs[0]
	renewAt := first.RenewAt
	oldCA := up.ca

	startRotation(t, c)

	// A bundle that still holds the old CA keeps the SVID.
	newCA := newTestCA(t, testTD)
	both := up.bundle()
	both.AddX509Authority(newCA.cert)
	c.SetBundles(both, nil)
	kept := c.svidOf("a") == first && first.RenewAt.Equal(renewAt) && !first.replace.Load()
	if !kept {
		t.Error("adding a CA to the bundle scheduled a renewal of SVIDs that still chain")
	}

	up.set(func(u *testUpstream) { u.ca = newCA })
	c.SetBundles(up.bundle(), nil)
	eventually(t, "renewal under the new CA", func() bool { return c.svidOf("a") != first })
	renewed := c.svidOf("a")
	if err := renewed.Chain[0].CheckSignatureFrom(newCA.cert); err != nil {
		t.Errorf("the renewed SVID is not signed by the new CA: %v", err)
	}
	if renewed.Chain[0].CheckSignatureFrom(oldCA.cert) == nil {
		t.Error("the renewed SVID is still signed by the old CA")
	}
	checkSVID(t, renewed, e, up.bundle())
}

// Between a bundle that drops the CA of an SVID and that SVID's renewal,
// a fetch must not be handed the SVID with a bundle it does not verify
// against: it gets one signed by the new CA.
func TestSVIDNotChainingToBundleIsNotServed(t *testing.T) {
	c, up := newTestCache(t)
	e := testEntry("a", "spiffe://example.org/a", 1, "unix:uid:1")
	c.SetEntries([]*Entry{e})
	c.SetBundles(up.bundle(), nil)
	if _, err := c.X509Identities(t.Context(), mustSels("unix:uid:1")); err != nil {
		t.Fatal(err)
	}
	up.set(func(u *testUpstream) { u.ca = newTestCA(t, testTD) })
	c.SetBundles(up.bundle(), nil) // no rotation loop runs: nothing renews it
	snap, err := c.X509Identities(t.Context(), mustSels("unix:uid:1"))
	if err != nil {
		t.Fatal(err)
	}
	checkSVID(t, snap.SVIDs[0], e, snap.Local.Bundle)
}

func TestJWTSVIDs(t *testing.T) {
	c, up, clock := newClockedCache(t)
	a := testEntry("a", "spiffe://example.org/a", 1, "unix:uid:1")
	a.Hint = "first"
	b := testEntry("b", "spiffe://example.org/b", 2, "unix:uid:1")
	b.JWTSVIDTTL = time.Minute
	// Same identity as a, younger: it adds no second token.
	a2 := testEntry("a2", "spiffe://example.org/a", 3, "unix:uid:1")
	c.SetEntries([]*Entry{b, a2, a})
	c.SetBundles(up.bundle(), nil)
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
	withRoot.AddX509Authority(newTestCA(t, testTD).cert)
	c.SetBundles(withRoot, nil)
	if fetch([]string{"x"}, a.SPIFFEID)[0].Token != cur {
		t.Error("an X.509-only bundle change dropped cached JWT-SVIDs")
	}
	up.set(func(u *testUpstream) { u.jwtKID, u.jwtKey = "kid-2", newKey(t) })
	c.SetBundles(up.bundle(), nil)
	if fetch([]string{"x"}, a.SPIFFEID)[0].Token == cur {
		t.Error("new JWT keys did not drop cached tokens")
	}

	up.set(func(u *testUpstream) { u.fail = errors.New("no signer") })
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
	e := testEntry("a", "spiffe://example.org/a", 1, "unix:uid:1")
	c.SetEntries([]*Entry{e})
	c.SetBundles(up.bundle(), nil)
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
			up.set(func(u *testUpstream) { u.jwtKID, u.jwtKey = "kid-2", newKey(t) })
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
	up.set(func(u *testUpstream) { u.jwtHook, u.jwtKID, u.jwtKey = nil, "kid-3", newKey(t) })
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
	fedKey := newKey(t)
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
		tok, err := signJWT(key, kid, sub, []string{"aud"}, now, now.Add(time.Minute))
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
	foreign := newKey(t)
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

func TestBundlesVisibility(t *testing.T) {
	c, up := newTestCache(t)
	fedOther := spiffebundle.FromX509Authorities(otherTD, []*x509.Certificate{newTestCA(t, otherTD).cert})
	fedThird := spiffebundle.FromX509Authorities(thirdTD, []*x509.Certificate{newTestCA(t, thirdTD).cert})
	// A "federated" bundle for our own trust domain is ignored.
	own := spiffebundle.FromX509Authorities(testTD, []*x509.Certificate{newTestCA(t, testTD).cert})
	a := testEntry("a", "spiffe://example.org/a", 1, "unix:uid:1")
	a.FederatesWith = []spiffeid.TrustDomain{otherTD, spiffeid.RequireTrustDomainFromString("unknown.org")}
	plain := testEntry("p", "spiffe://example.org/p", 2, "unix:uid:2")
	c.SetEntries([]*Entry{a, plain})
	c.SetBundles(up.bundle(), []*spiffebundle.Bundle{fedThird, own, fedOther})

	tds := func(bs []*Bundle) []string {
		var out []string
		for _, b := range bs {
			out = append(out, b.TrustDomain().Name())
		}
		return out
	}
	snap, err := c.Bundles(t.Context(), mustSels("unix:uid:1"), false)
	if err != nil {
		t.Fatal(err)
	}
	if !snap.Local.Equal(up.bundle()) || !slices.Equal(tds(snap.Federated), []string{"other.org"}) {
		t.Errorf("a federating caller sees %v", tds(snap.Federated))
	}
	snap, err = c.Bundles(t.Context(), mustSels("unix:uid:2"), true)
	if err != nil || len(snap.Federated) != 0 {
		t.Errorf("a caller whose entries federate with nobody sees %v (%v)", snap, err)
	}
	if _, err := c.Bundles(t.Context(), mustSels("unix:uid:9"), false); !errors.Is(err, ErrNoIdentity) {
		t.Errorf("a caller without entries: %v, want ErrNoIdentity", err)
	}
	snap, err = c.Bundles(t.Context(), mustSels("unix:uid:9"), true)
	if err != nil {
		t.Fatal(err)
	}
	// A caller with no identity federates with no one: the local bundle only.
	if len(snap.Federated) != 0 || snap.Local == nil {
		t.Errorf("allowUnauthenticated: federated %v, want none", tds(snap.Federated))
	}
	if !snap.Local.Equal(up.bundle()) {
		t.Error("the own-trust-domain federated bundle replaced the local bundle")
	}
	x, err := c.X509Identities(t.Context(), mustSels("unix:uid:1", "unix:uid:2"))
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(tds(x.Federated), []string{"other.org"}) {
		t.Errorf("X509 snapshot federated %v", tds(x.Federated))
	}
}

func TestBundleEncodings(t *testing.T) {
	ca1, ca2 := newTestCA(t, testTD), newTestCA(t, testTD)
	k1, k2 := newKey(t), newKey(t)
	sb := spiffebundle.FromX509Authorities(testTD, []*x509.Certificate{ca1.cert, ca2.cert})
	_ = sb.AddJWTAuthority("b", k2.Public())
	_ = sb.AddJWTAuthority("a", k1.Public())
	b, err := newBundle(sb)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(b.X509DER, append(slices.Clone(ca1.cert.Raw), ca2.cert.Raw...)) {
		t.Error("X509DER is not the authorities' DER in order")
	}
	var set jose.JSONWebKeySet
	if err := json.Unmarshal(b.JWKS, &set); err != nil {
		t.Fatal(err)
	}
	if len(set.Keys) != 2 || set.Keys[0].KeyID != "a" || set.Keys[1].KeyID != "b" {
		t.Fatalf("JWKS keys %+v, want kids a, b", set.Keys)
	}
	for _, k := range set.Keys {
		if k.Use != "jwt-svid" {
			t.Errorf("kid %s has use %q", k.KeyID, k.Use)
		}
	}
	if !set.Keys[0].Key.(*ecdsa.PublicKey).Equal(k1.Public()) {
		t.Error("kid a carries the wrong key")
	}
}

func TestChainsTo(t *testing.T) {
	ca1, ca2 := newTestCA(t, testTD), newTestCA(t, testTD)
	key := newKey(t)
	leaf, err := ca1.sign(key.Public(), "spiffe://example.org/a", time.Now(), time.Now().Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	b1, _ := newBundle(spiffebundle.FromX509Authorities(testTD, []*x509.Certificate{ca1.cert}))
	b2, _ := newBundle(spiffebundle.FromX509Authorities(testTD, []*x509.Certificate{ca2.cert}))
	if !b1.chainsTo([]*x509.Certificate{leaf}) || !b1.chainsTo([]*x509.Certificate{leaf, ca1.cert}) {
		t.Error("a chain from the bundle's CA does not chain to it")
	}
	if b2.chainsTo([]*x509.Certificate{leaf}) {
		t.Error("a chain from another CA chains to the bundle")
	}
	// A certificate naming ca2's key ID but signed by ca1 is not ca2's.
	forged := *ca1.cert
	forged.SubjectKeyId = ca2.cert.SubjectKeyId
	tmpl := &x509.Certificate{SerialNumber: serial(t), NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour),
		URIs: leaf.URIs, KeyUsage: x509.KeyUsageDigitalSignature, BasicConstraintsValid: true}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, &forged, key.Public(), ca1.key)
	if err != nil {
		t.Fatal(err)
	}
	liar, _ := x509.ParseCertificate(der)
	if !bytes.Equal(liar.AuthorityKeyId, ca2.cert.SubjectKeyId) {
		t.Fatal("could not forge the authority key ID")
	}
	if b2.chainsTo([]*x509.Certificate{liar}) {
		t.Error("a matching authority key ID without a matching signature chained")
	}
	var nilBundle *Bundle
	if nilBundle.chainsTo([]*x509.Certificate{leaf}) || b1.chainsTo(nil) {
		t.Error("a nil bundle or empty chain chained")
	}
}

func TestRenewAtJitter(t *testing.T) {
	now := time.Now()
	na := now.Add(time.Hour)
	seen := map[time.Time]bool{}
	for range 200 {
		r := renewAt(now, na)
		if r.Before(now.Add(27*time.Minute)) || r.After(now.Add(33*time.Minute)) {
			t.Fatalf("renewAt %v is outside half-life +-10%%", r.Sub(now))
		}
		seen[r] = true
	}
	if len(seen) < 2 {
		t.Error("renewAt has no jitter")
	}
	// A certificate at or past its end is not renewed in a busy loop.
	for _, end := range []time.Time{now, now.Add(-time.Minute), now.Add(time.Millisecond)} {
		if r := renewAt(now, end); r.Before(now.Add(minRenewInterval)) {
			t.Errorf("renewAt with %v left = %v from now, under %v", end.Sub(now), r.Sub(now), minRenewInterval)
		}
	}
}

func TestBackoff(t *testing.T) {
	b := NewBackoff(time.Second, 8*time.Second)
	for i, ceiling := range []time.Duration{1, 2, 4, 8, 8, 8} {
		ceiling *= time.Second
		d := b.Next()
		if d < ceiling/2 || d > ceiling {
			t.Errorf("step %d: %v, want within [%v, %v]", i, d, ceiling/2, ceiling)
		}
	}
	b.Reset()
	if d := b.Next(); d > time.Second {
		t.Errorf("after reset: %v, want at most 1s", d)
	}
}

// TestUnfetchedSVIDIsNotRenewed: an SVID no workload fetched since it was
// signed (its workload is gone) is not renewed, is served while it lasts,
// and is dropped when it expires or must be replaced; a workload that asks
// for it again gets it renewed.
func TestUnfetchedSVIDIsNotRenewed(t *testing.T) {
	c, up, clock := newClockedCache(t)
	sels, first := fetchFirst(t, c, up)
	startRotation(t, c)
	advance := func(to time.Time) {
		clock.Set(to)
		c.kickRenewal()
	}

	// Fetched: renewed at its renewal time.
	second := renewedOnce(t, c, clock, first)
	calls := up.x509Calls.Load()

	// Not fetched since: its renewal time passes and it is kept, not renewed.
	advance(second.RenewAt.Add(time.Second))
	for range 20 {
		c.kickRenewal()
		time.Sleep(5 * time.Millisecond)
	}
	if c.svidOf("a") != second || up.x509Calls.Load() != calls {
		t.Fatal("an SVID no workload fetched was renewed")
	}
	// Fetched again past its renewal time: re-signed before it is handed
	// out, so the workload gets as much lifetime as from a renewed one.
	snap, err := c.X509Identities(t.Context(), sels)
	if err != nil || snap.SVIDs[0] == second || !snap.SVIDs[0].NotAfter.After(second.NotAfter) {
		t.Fatalf("fetch of the unrenewed SVID = %v, %v; want a fresh one", snap, err)
	}
	if c.svidOf("a") != snap.SVIDs[0] || up.x509Calls.Load() != calls+1 {
		t.Fatalf("the fresh SVID was not kept, or took %d signing calls", up.x509Calls.Load()-calls)
	}
	refreshed := snap.SVIDs[0]

	// The same with the upstream failing: the still-valid SVID is served,
	// and renewed once the upstream is back.
	unrenewed := renewedOnce(t, c, clock, refreshed)
	advance(unrenewed.RenewAt.Add(time.Second))
	up.set(func(u *testUpstream) { u.fail = errors.New("upstream down") })
	snap, err = c.X509Identities(t.Context(), sels)
	if err != nil || snap.SVIDs[0] != unrenewed {
		t.Fatalf("fetch with the upstream down = %v, %v; want the still-valid SVID", snap, err)
	}
	up.set(func(u *testUpstream) { u.fail = nil })
	eventually(t, "the renewal once fetched and the upstream back", func() bool {
		c.kickRenewal()
		return c.svidOf("a") != unrenewed
	})
	third := c.svidOf("a")

	// Not fetched, and expired: dropped.
	advance(third.NotAfter.Add(time.Second))
	eventually(t, "the expired unfetched SVID dropped", func() bool { return c.svidOf("a") == nil })
	calls = up.x509Calls.Load()
	if snap, err = c.X509Identities(t.Context(), sels); err != nil || up.x509Calls.Load() != calls+1 {
		t.Fatalf("a workload asking after the drop: %v, %d signing calls; want a new SVID", err, up.x509Calls.Load()-calls)
	}
	if snap.SVIDs[0] == third || !snap.SVIDs[0].NotAfter.After(clock.Now()) {
		t.Fatal("the workload asking after the drop did not get a new, valid SVID")
	}

	// Renewed once fetched, then not fetched, then its CA leaves the
	// bundle: dropped at once instead of re-signed.
	renewedOnce(t, c, clock, snap.SVIDs[0])
	calls = up.x509Calls.Load()
	up.set(func(u *testUpstream) { u.ca = newTestCA(t, testTD) })
	c.SetBundles(up.bundle(), nil)
	eventually(t, "the unfetched SVID of a replaced CA dropped", func() bool { return c.svidOf("a") == nil })
	if up.x509Calls.Load() != calls {
		t.Fatal("an unfetched SVID was re-signed for the new CA")
	}
}

// TestSavedSVIDIsServedAtOnce: an SVID loaded from the saved cache after
// its renewal time has passed is handed out at once with the upstream
// blocked (as it may be right after a restart): its renewal time counts
// from the restart, so no refresh (Cache.refresh) holds the caller.
func TestSavedSVIDIsServedAtOnce(t *testing.T) {
	dir := t.TempDir()
	c, up := newTestCache(t)
	c.PersistTo(dir, testTD)
	sels, saved := fetchFirst(t, c, up)
	c.persister.persist()

	clock := &fakeClock{now: saved.RenewAt.Add(time.Second)}
	up.set(func(u *testUpstream) { u.now = clock.Now; u.gate = make(chan struct{}) })
	restarted := NewCache(hclog.NewNullLogger(), up)
	restarted.now = clock.Now
	restarted.PersistTo(dir, testTD)
	calls := up.x509Calls.Load()
	snap, err := restarted.X509Identities(t.Context(), sels)
	if err != nil || !bytes.Equal(snap.SVIDs[0].ChainDER, saved.ChainDER) {
		t.Fatalf("fetch after the restart = %v, %v; want the saved SVID", snap, err)
	}
	if up.x509Calls.Load() != calls {
		t.Fatal("the saved SVID was held for a refresh")
	}
}

// startRotation runs c's rotation loop until the test ends or stop is
// called, and fails the test if the loop does not stop then.
func startRotation(t *testing.T, c *Cache) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = c.Rotator().Run(ctx)
	}()
	stop = sync.OnceFunc(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(15 * time.Second):
			t.Error("the rotator did not return after its context ended")
		}
	})
	t.Cleanup(stop)
	return stop
}

// newClockedCache is newTestCache with the cache and its upstream on one
// fake clock.
func newClockedCache(t *testing.T) (*Cache, *testUpstream, *fakeClock) {
	c, up := newTestCache(t)
	clock := &fakeClock{now: time.Now()}
	c.now, up.now = clock.Now, clock.Now
	return c, up, clock
}

// renewedOnce moves the clock past the renewal time of svid, entry "a"'s
// (see fetchFirst), and returns the SVID the rotation loop renews it into.
func renewedOnce(t *testing.T, c *Cache, clock *fakeClock, svid *X509SVID) *X509SVID {
	t.Helper()
	clock.Set(svid.RenewAt.Add(time.Second))
	c.kickRenewal()
	eventually(t, "the renewal of a fetched SVID", func() bool { return c.svidOf("a") != svid })
	return c.svidOf("a")
}

// fetchFirst gives the cache one entry, "a" for unix:uid:1, and fetches its
// SVID.
func fetchFirst(t *testing.T, c *Cache, up *testUpstream) ([]attestor.Selector, *X509SVID) {
	t.Helper()
	c.SetEntries([]*Entry{testEntry("a", "spiffe://example.org/a", 1, "unix:uid:1")})
	c.SetBundles(up.bundle(), nil)
	sels := mustSels("unix:uid:1")
	snap, err := c.X509Identities(t.Context(), sels)
	if err != nil {
		t.Fatal(err)
	}
	return sels, snap.SVIDs[0]
}

// TestAbandonedRefreshIsRenewedLater: a caller that stops waiting for the
// refresh of an SVID whose renewal was skipped is handed the old SVID; when
// that refresh then fails, the rotation loop still renews the SVID, which
// is now served, once the upstream is back.
func TestAbandonedRefreshIsRenewedLater(t *testing.T) {
	c, up, clock := newClockedCache(t)
	sels, first := fetchFirst(t, c, up)
	startRotation(t, c)
	unfetched := renewedOnce(t, c, clock, first)

	// Not fetched past its renewal time; then fetched while the upstream
	// hangs past refreshWait and then fails.
	clock.Set(unfetched.RenewAt.Add(time.Second))
	gate := make(chan struct{})
	up.set(func(u *testUpstream) { u.gate, u.fail = gate, errors.New("upstream down") })
	snap, err := c.X509Identities(t.Context(), sels)
	if err != nil || snap.SVIDs[0] != unfetched {
		t.Fatalf("fetch while the refresh hangs = %v, %v; want the still-valid SVID", snap, err)
	}
	// Let the rotation loop take the kick the fetch gave (the SVID is now
	// served) while the refresh is still in flight, as it would when the
	// upstream hangs for longer.
	eventually(t, "the rotation loop to take its kick", func() bool { return len(c.rotator.kick) == 0 })
	time.Sleep(100 * time.Millisecond)
	close(gate)
	up.set(func(u *testUpstream) { u.gate = nil })
	eventually(t, "the failed refresh", func() bool { return c.Health().UpstreamErr != nil })
	up.set(func(u *testUpstream) { u.fail = nil })
	// No kick from the test: the loop must come back by itself.
	eventually(t, "the renewal after the upstream came back", func() bool { return c.svidOf("a") != unfetched })
}

// TestDetachedRefreshEndsWithTheAgent: signing a caller stopped waiting for
// does not outlive the rotation loop (the agent's run).
func TestDetachedRefreshEndsWithTheAgent(t *testing.T) {
	c, up, clock := newClockedCache(t)
	sels, first := fetchFirst(t, c, up)
	stop := startRotation(t, c)
	unfetched := renewedOnce(t, c, clock, first)
	clock.Set(unfetched.RenewAt.Add(time.Second))
	up.set(func(u *testUpstream) { u.gate = make(chan struct{}) }) // never opens
	if _, err := c.X509Identities(t.Context(), sels); err != nil {
		t.Fatal(err)
	}
	inflight := c.signer.inFlight()
	if inflight != 1 {
		t.Fatalf("%d signings in flight after the caller stopped waiting, want 1", inflight)
	}
	stop()
	eventually(t, "the detached signing to end with the agent", func() bool {
		return c.signer.inFlight() == 0
	})
}

// TestKeyGenerationFailureSendsNoKeylessRequest: an entry whose key could
// not be generated fails alone; the others of the batch are still signed,
// and the upstream never gets a request without a key.
func TestKeyGenerationFailureSendsNoKeylessRequest(t *testing.T) {
	c, up := newTestCache(t)
	c.SetEntries([]*Entry{testEntry("a", "spiffe://example.org/a", 1, "unix:uid:1"), testEntry("b", "spiffe://example.org/b", 1, "unix:uid:1")})
	c.SetBundles(up.bundle(), nil)
	var calls atomic.Int32
	c.signer.newKey = func() (*ecdsa.PrivateKey, error) {
		if calls.Add(1) == 1 {
			return nil, errors.New("no entropy")
		}
		return ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	}
	svids, errs := c.signer.sign(t.Context(), []*mintCall{{entry: c.store.entry("a")}, {entry: c.store.entry("b")}})
	if errs[0] == nil || !strings.Contains(errs[0].Error(), "no entropy") || svids[0] != nil {
		t.Errorf("the call whose key failed: %v, %v", svids[0], errs[0])
	}
	if errs[1] != nil || svids[1] == nil {
		t.Errorf("the other call of the batch: %v, %v", svids[1], errs[1])
	}
}
