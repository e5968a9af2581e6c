// Package fakeagent has fakes of the agent's interfaces for tests outside
// package agent: an Upstream that signs with real keys and a Sink that
// records what it is handed. (Package agent's own tests cannot import it;
// they build their fake from testkit's CA and SignJWT.)
package fakeagent

import (
	"context"
	"crypto/ecdsa"
	"crypto/x509"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/conf"
	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// ErrNoJWTKey is MintJWTSVID's error when the upstream has no JWT key.
var ErrNoJWTKey = errors.New("the fake upstream has no JWT key")

// Upstream signs X509-SVIDs and JWT-SVIDs with real keys and counts what it
// is asked; the tests set the agent's entries and bundles themselves, so Run
// delivers nothing. Its fields may be changed while it runs through the
// setters; set the others before the agent uses it.
type Upstream struct {
	// Faults: SetFail makes every signing call fail, SetGate makes them
	// wait (X.509 only).
	testkit.Faults

	mu     sync.Mutex
	ca     *testkit.CA
	jwtKID string
	jwtKey *ecdsa.PrivateKey

	// Now is the signing time (default time.Now).
	Now func() time.Time
	// Backdate is how long before Now an X509-SVID's validity starts
	// (default a second, so that a workload's clock skew is harmless).
	Backdate time.Duration
	// JWTAudience, when set, is the audience of every JWT-SVID signed,
	// whatever was asked: an upstream that gets it wrong.
	JWTAudience []string
	// JWTSubject, when set, is the subject of every JWT-SVID signed.
	JWTSubject string
	// Hook, when set, may rewrite the results of a signing call.
	Hook func([]agent.X509Result) []agent.X509Result
	// JWTHook, when set, runs after a JWT-SVID is signed and before it is
	// returned: a test changes the bundle while a signing is in flight.
	JWTHook func()

	batches             []int
	x509Calls, jwtCalls atomic.Int32
}

var _ agent.Upstream = (*Upstream)(nil)

// NewUpstream is an upstream for td with a new CA and JWT key "kid-1".
func NewUpstream(t testing.TB, td spiffeid.TrustDomain) *Upstream {
	t.Helper()
	return &Upstream{ca: testkit.NewTrustDomainCA(t, td), jwtKID: "kid-1", jwtKey: testkit.NewKey(t),
		Now: time.Now, Backdate: time.Second}
}

// CA is the CA that signs now.
func (u *Upstream) CA() *testkit.CA {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.ca
}

// SetCA changes the CA that signs from now on.
func (u *Upstream) SetCA(ca *testkit.CA) {
	u.mu.Lock()
	u.ca = ca
	u.mu.Unlock()
}

// JWTKey is the JWT signing key and its key ID.
func (u *Upstream) JWTKey() (string, *ecdsa.PrivateKey) {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.jwtKID, u.jwtKey
}

// SetJWTKey changes the JWT signing key; nil makes MintJWTSVID fail with
// ErrNoJWTKey.
func (u *Upstream) SetJWTKey(kid string, key *ecdsa.PrivateKey) {
	u.mu.Lock()
	u.jwtKID, u.jwtKey = kid, key
	u.mu.Unlock()
}

// Batches is the size of every MintX509SVIDs batch so far, in order.
func (u *Upstream) Batches() []int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]int(nil), u.batches...)
}

// X509Calls and JWTCalls count the signing calls.
func (u *Upstream) X509Calls() int { return int(u.x509Calls.Load()) }
func (u *Upstream) JWTCalls() int  { return int(u.jwtCalls.Load()) }

// LocalBundle is td's bundle with roots as X.509 authorities (the current
// CA's when none are given) and the current JWT key.
func (u *Upstream) LocalBundle(t testing.TB, td spiffeid.TrustDomain, roots ...*x509.Certificate) *spiffebundle.Bundle {
	t.Helper()
	u.mu.Lock()
	defer u.mu.Unlock()
	if len(roots) == 0 {
		roots = []*x509.Certificate{u.ca.Cert}
	}
	b := spiffebundle.FromX509Authorities(td, roots)
	if u.jwtKey != nil {
		if err := b.AddJWTAuthority(u.jwtKID, u.jwtKey.Public()); err != nil {
			t.Fatal(err)
		}
	}
	return b
}

// Run delivers nothing: the test sets entries and bundles.
func (u *Upstream) Run(ctx context.Context, _ agent.Sink) error {
	<-ctx.Done()
	return nil
}

// Resync reports false: the entries change only when the test sets them.
func (u *Upstream) Resync(context.Context) (bool, error) { return false, nil }

// Reconfigure accepts any data.
func (u *Upstream) Reconfigure(*conf.Section) error { return nil }

// MintX509SVIDs signs each request with the current CA, for the entry's
// X509SVIDTTL (default an hour), with its DNS names.
func (u *Upstream) MintX509SVIDs(ctx context.Context, reqs []agent.X509Request) ([]agent.X509Result, error) {
	u.x509Calls.Add(1)
	u.mu.Lock()
	ca := u.ca
	u.batches = append(u.batches, len(reqs))
	u.mu.Unlock()
	if err := u.Enter(ctx); err != nil {
		return nil, err
	}
	now := u.Now()
	out := make([]agent.X509Result, len(reqs))
	for i, r := range reqs {
		leaf, err := ca.UpstreamSVID(r.Key, r.Entry.SPIFFEID.String(), now, u.Backdate, r.Entry.X509SVIDTTL, r.Entry.DNSNames...)
		if errors.Is(err, testkit.ErrNoKey) {
			return nil, fmt.Errorf("request %d for %s: %w", i, r.Entry.SPIFFEID, err)
		}
		out[i] = agent.X509Result{Chain: []*x509.Certificate{leaf}, Err: err}
	}
	if u.Hook != nil {
		out = u.Hook(out)
	}
	return out, nil
}

// MintJWTSVID signs a JWT-SVID for the entry's JWTSVIDTTL (default five
// minutes) with the current JWT key.
func (u *Upstream) MintJWTSVID(_ context.Context, e *agent.Entry, audience []string) (*agent.JWTSVID, error) {
	u.jwtCalls.Add(1)
	u.mu.Lock()
	kid, key := u.jwtKID, u.jwtKey
	u.mu.Unlock()
	if u.JWTAudience != nil {
		audience = u.JWTAudience
	}
	subject := e.SPIFFEID.String()
	if u.JWTSubject != "" {
		subject = u.JWTSubject
	}
	if err := u.Err(); err != nil {
		return nil, err
	}
	if key == nil {
		return nil, ErrNoJWTKey
	}
	token, iat, exp, err := testkit.SignJWTSVID(key, kid, subject, audience, u.Now(), e.JWTSVIDTTL)
	if err != nil {
		return nil, err
	}
	if u.JWTHook != nil {
		u.JWTHook()
	}
	return &agent.JWTSVID{Token: token, ID: e.SPIFFEID, Audience: audience, IssuedAt: iat, ExpiresAt: exp}, nil
}
