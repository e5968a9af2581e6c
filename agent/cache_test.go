package agent

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/x509"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/attestor/selector"
	"github.com/lanyard-dev/lanyard/conf"
	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

var (
	testTD  = spiffeid.RequireTrustDomainFromString("example.org")
	otherTD = spiffeid.RequireTrustDomainFromString("other.org")
	thirdTD = spiffeid.RequireTrustDomainFromString("third.org")
)

// waitLimit bounds every wait for something that must happen.
const waitLimit = 15 * time.Second

// newTestCA is a CA of td, valid from a day ago for a year: tests move the
// fake clock hours ahead.
func newTestCA(t testing.TB, td spiffeid.TrustDomain) *testkit.CA {
	t.Helper()
	now := time.Now()
	return testkit.NewTrustDomainCA(t, td, testkit.WithValidity(now.Add(-24*time.Hour), now.Add(365*24*time.Hour)))
}

// testUpstream signs with real keys and counts what it is asked: a small
// twin of fakeagent.Upstream, which imports this package. Its Faults make
// signing calls fail or (X.509 only) wait.
type testUpstream struct {
	testkit.Faults

	mu       sync.Mutex
	ca       *testkit.CA
	jwtKID   string
	jwtKey   *ecdsa.PrivateKey
	now      func() time.Time
	backdate time.Duration
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

func newTestUpstream(t testing.TB) *testUpstream {
	return &testUpstream{ca: newTestCA(t, testTD), jwtKID: "kid-1", jwtKey: testkit.NewKey(t), now: time.Now}
}

func (u *testUpstream) Run(ctx context.Context, _ Sink) error {
	<-ctx.Done()
	return nil
}

func (u *testUpstream) MintX509SVIDs(ctx context.Context, reqs []X509Request) ([]X509Result, error) {
	u.x509Calls.Add(1)
	u.mu.Lock()
	ca, hook, backdate := u.ca, u.hook, u.backdate
	u.batches = append(u.batches, len(reqs))
	u.mu.Unlock()
	if err := u.Enter(ctx); err != nil {
		return nil, err
	}
	now := u.now()
	out := make([]X509Result, len(reqs))
	for i, r := range reqs {
		leaf, err := ca.UpstreamSVID(r.Key, r.Entry.SPIFFEID.String(), now, backdate, r.Entry.X509SVIDTTL, r.Entry.DNSNames...)
		if errors.Is(err, testkit.ErrNoKey) {
			return nil, fmt.Errorf("request %d for %s: %w", i, r.Entry.SPIFFEID, err)
		}
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
	kid, key, hook := u.jwtKID, u.jwtKey, u.jwtHook
	if u.jwtAudience != nil {
		audience = u.jwtAudience
	}
	subject := e.SPIFFEID.String()
	if u.jwtSubject != "" {
		subject = u.jwtSubject
	}
	u.mu.Unlock()
	if err := u.Err(); err != nil {
		return nil, err
	}
	token, iat, exp, err := testkit.SignJWTSVID(key, kid, subject, audience, u.now(), e.JWTSVIDTTL)
	if err != nil {
		return nil, err
	}
	if hook != nil {
		hook()
	}
	return &JWTSVID{Token: token, ID: e.SPIFFEID, Audience: audience, IssuedAt: iat, ExpiresAt: exp}, nil
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
	b := spiffebundle.FromX509Authorities(testTD, []*x509.Certificate{u.ca.Cert})
	if err := b.AddJWTAuthority(u.jwtKID, u.jwtKey.Public()); err != nil {
		panic(err)
	}
	return b
}

func newTestCache(t *testing.T) (*SVIDManager, *testUpstream) {
	up := newTestUpstream(t)
	return NewSVIDManager(hclog.NewNullLogger(), up), up
}

func testEntry(id, spiffeID string, created int64, sels ...string) *Entry {
	return &Entry{ID: id, SPIFFEID: spiffeid.RequireFromString(spiffeID), CreatedAt: created, Selectors: mustSels(sels...)}
}

// entryA is the entry most tests hold: a, for unix:uid:1.
func entryA() *Entry { return testEntry("a", "spiffe://example.org/a", 1, "unix:uid:1") }

// hold has c hold entries and up's bundle.
func hold(c *SVIDManager, up *testUpstream, entries ...*Entry) {
	c.SetEntries(entries)
	c.SetBundles(up.bundle(), nil)
}

// fetchFirst has c hold e and returns e's selectors and the first SVID
// fetched with them.
func fetchFirst(t *testing.T, c *SVIDManager, up *testUpstream, e *Entry) ([]selector.Selector, *X509SVID) {
	t.Helper()
	hold(c, up, e)
	snap, err := c.X509Identities(t.Context(), e.Selectors)
	if err != nil {
		t.Fatal(err)
	}
	return e.Selectors, snap.SVIDs[0]
}

func mustSels(ss ...string) []selector.Selector {
	var out []selector.Selector
	for _, s := range ss {
		sel, err := selector.Parse(s)
		if err != nil {
			panic(err)
		}
		out = append(out, sel)
	}
	return selector.Sort(out)
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

func (m *SVIDManager) svidOf(entryID string) *X509SVID { return m.store.svid(entryID) }

// kickRenewal has the rotator look at its queue now, as after the clock
// moved.
func (m *SVIDManager) kickRenewal() { m.rotator.kickLoop() }

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

// newClockedCache is newTestCache with the cache and its upstream on one
// fake clock.
func newClockedCache(t *testing.T) (*SVIDManager, *testUpstream, *fakeClock) {
	c, up := newTestCache(t)
	clock := &fakeClock{now: time.Now()}
	c.now, up.now = clock.Now, clock.Now
	return c, up, clock
}
