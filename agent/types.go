// Package agent runs the node agent: it starts the upstream CA, keeps the
// registration entries and bundles it delivers, mints and renews the SVIDs
// workloads ask for, and tells open Workload API streams when they change.
package agent

import (
	"context"
	"crypto"
	"crypto/x509"
	"errors"
	"slices"
	"sync/atomic"
	"time"

	"github.com/lanyard-dev/lanyard/attestor/selector"
	"github.com/lanyard-dev/lanyard/conf"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// Entry is a registration entry: the selectors a workload must have, and the
// identity it then gets. Entries are immutable once handed to the cache.
type Entry struct {
	ID            string
	SPIFFEID      spiffeid.ID
	Selectors     []selector.Selector // sorted, unique
	X509SVIDTTL   time.Duration       // 0: the upstream's default
	JWTSVIDTTL    time.Duration       // 0: the upstream's default
	Hint          string
	DNSNames      []string
	FederatesWith []spiffeid.TrustDomain
	// CreatedAt orders entries: the oldest is a caller's default identity
	// and wins when two entries share a hint.
	CreatedAt int64
	// RevisionNumber changes whenever the upstream changes the entry.
	RevisionNumber int64
	// Admin and Downstream mark SPIRE's admin and downstream entries: the
	// Delegated Identity API leaves their X509-SVIDs out, as spire-agent
	// does; workloads get them as any other.
	Admin, Downstream bool
}

// sameSVIDShape reports whether an SVID minted for a may be served for b.
func (a *Entry) sameSVIDShape(b *Entry) bool {
	return a.ID == b.ID && a.SPIFFEID == b.SPIFFEID && a.X509SVIDTTL == b.X509SVIDTTL &&
		slices.Equal(a.DNSNames, b.DNSNames)
}

// equal reports whether two entries are the same in every field.
func (a *Entry) equal(b *Entry) bool {
	return a.sameSVIDShape(b) && a.JWTSVIDTTL == b.JWTSVIDTTL && a.Hint == b.Hint &&
		a.CreatedAt == b.CreatedAt && a.RevisionNumber == b.RevisionNumber &&
		a.Admin == b.Admin && a.Downstream == b.Downstream &&
		slices.Equal(a.Selectors, b.Selectors) && slices.Equal(a.FederatesWith, b.FederatesWith)
}

// X509SVID is a minted X.509-SVID with its private key, kept in memory in
// the encodings the Workload API sends so that a fetch marshals nothing.
type X509SVID struct {
	EntryID   string
	ID        spiffeid.ID
	Chain     []*x509.Certificate // leaf first
	Key       crypto.Signer
	ChainDER  []byte // the chain's certificates, concatenated
	KeyDER    []byte // PKCS#8
	NotBefore time.Time
	NotAfter  time.Time
	RenewAt   time.Time // half-life with jitter; see state
	// replace marks an SVID to replace at once, whatever its age: its CA
	// left the bundle or its signer was tainted.
	replace atomic.Bool
	// served records that a workload was handed this SVID. One that no
	// workload fetched since it was signed is not renewed: it is served
	// until it expires, then dropped, so that a node's cache holds the
	// SVIDs of the workloads that run there, not of every one that ever
	// did.
	served atomic.Bool
	// checked remembers whether Chain ends at the last local bundle it was
	// checked against: the check can cost a signature verification (tens
	// of microseconds), and the fetch path asks on every call.
	checked atomic.Pointer[chainCheck]
}

type chainCheck struct {
	bundle *Bundle
	ok     bool
}

// chainsTo reports whether the SVID's chain ends at one of b's X.509
// authorities, verifying it once per bundle: bundles are replaced, never
// changed, so the answer for one holds for as long as it is in use.
func (s *X509SVID) chainsTo(b *Bundle) bool {
	if c := s.checked.Load(); c != nil && c.bundle == b {
		return c.ok
	}
	ok := b.chainsTo(s.Chain)
	s.checked.Store(&chainCheck{bundle: b, ok: ok})
	return ok
}

// renewalSkipped reports whether the SVID's renewal time has passed (or it
// was marked for replacement) while no workload was handed it, so that the
// rotator let it be: still valid, maybe about to expire.
func (s *X509SVID) renewalSkipped(now time.Time) bool {
	return !s.served.Load() && (s.replace.Load() || !now.Before(s.RenewAt))
}

// JWTSVID is a signed JWT-SVID.
type JWTSVID struct {
	Token string
	Hint  string
	ID    spiffeid.ID
	// Audience is what the upstream was asked for; the cache replaces it
	// with the aud claim read from the token, and hands the token out
	// only for exactly that audience.
	Audience  []string
	IssuedAt  time.Time
	ExpiresAt time.Time
	// keyID is the token's kid header, read by the cache: the key of the
	// local bundle that verifies it.
	keyID string
}

// X509Request asks the upstream to sign an X.509-SVID for an entry. The agent
// generates the key; the upstream signs its public half.
type X509Request struct {
	Entry *Entry
	Key   crypto.Signer
}

// X509Result is the answer to one X509Request: the chain, leaf first, or why
// it could not be signed.
type X509Result struct {
	Chain []*x509.Certificate
	Err   error
}

// ErrNodeAttestationRefused marks an upstream's Run that ended because the
// node cannot attest (the server refused it, or the attestor cannot build
// its proof): a retry gives the same answer. An agent that has nothing to
// serve (no sync yet, no saved cache) exits on it, as spire-agent does;
// one that loaded a saved cache keeps serving it and retries.
var ErrNodeAttestationRefused = errors.New("the node's attestation was refused")

// Upstream is the CA that signs SVIDs and the source of registration entries
// and trust bundles: the embedded local CA, or a SPIRE Server.
type Upstream interface {
	// Run delivers the current entries and bundles to sink as soon as it
	// has them, and again on every change, until ctx ends. It wraps
	// ErrNodeAttestationRefused when the node cannot attest.
	Run(ctx context.Context, sink Sink) error
	// MintX509SVIDs signs a batch; the results line up with reqs.
	MintX509SVIDs(ctx context.Context, reqs []X509Request) ([]X509Result, error)
	// MintJWTSVID signs a JWT-SVID for entry with the given audience.
	MintJWTSVID(ctx context.Context, entry *Entry, audience []string) (*JWTSVID, error)
	// Resync fetches entries on demand, so that a workload whose entry
	// was just created gets it at once rather than at the next periodic
	// sync. It returns after the new entries reached the sink, or at once
	// when it is rate-limited or the upstream's entries cannot change
	// between syncs; it reports whether it synced. The upstream owns the
	// rate limit, so that the server sees no more load than from its
	// periodic sync.
	Resync(ctx context.Context) (bool, error)
	// Reconfigure takes new plugin_data on SIGHUP. It must leave the
	// upstream's state untouched when the new data is invalid.
	Reconfigure(data *conf.Section) error
}

// SelfIdentity is an upstream that gives the agent an X509-SVID of its own:
// the SPIRE Server upstream's agent SVID, the local CA's self-issued one.
// The broker endpoint presents it in mTLS and the Debug API reports it.
type SelfIdentity interface {
	// GetX509SVID returns the agent's current SVID, its chain ending
	// below a root of the local bundle; an error before it has one.
	GetX509SVID() (*x509svid.SVID, error)
	// LastSync is when the upstream last delivered entries and bundles
	// with success; zero before the first.
	LastSync() time.Time
}

// ServerConnection is an upstream that talks to a server: `lanyard status`
// shows which.
type ServerConnection interface {
	// ServerAddress is the address (host:port) of the server in use, or
	// the configured one before the first connection.
	ServerAddress() string
}

// Sink receives the upstream's state and tells the agent's health how the
// upstream fares. SetEntries and SetBundles carry the full set each call.
type Sink interface {
	SetEntries(entries []*Entry)
	// SetBundles sets the bundle of the agent's trust domain and those of
	// the trust domains it federates with.
	SetBundles(local *spiffebundle.Bundle, federated []*spiffebundle.Bundle)
	// TaintX509Authorities and TaintJWTAuthorities are told when
	// authorities of the local bundle are tainted (SPIRE's `localauthority
	// x509 taint` / `jwt taint`): their keys may be compromised, so what
	// they signed is replaced at once rather than at half-life. A tainted
	// authority stays in the bundle, so that peers holding SVIDs it signed
	// are still trusted while they rotate.
	TaintX509Authorities(authorities []*x509.Certificate)
	TaintJWTAuthorities(keyIDs []string)
	// ReportUpstream records whether the upstream works: the agent reports
	// degraded readiness while it does not.
	ReportUpstream(err error)
	// ReportSave records the outcome of saving path, nil once it succeeds.
	ReportSave(path string, err error)
}
