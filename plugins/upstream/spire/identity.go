package spire

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"fmt"
	"math/big"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/agent"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	agentv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/server/agent/v1"
	bundlev1 "github.com/spiffe/spire-api-sdk/proto/spire/api/server/bundle/v1"
	"github.com/spiffe/spire-api-sdk/proto/spire/api/types"
	"google.golang.org/grpc"
)

// agentIdentity is the agent's credentials towards the SPIRE Server: the
// agent SVID and its key, and the trust domain's X.509 authorities that
// the server is verified with. It attests the node, stores what it holds,
// renews the SVID at half-life and attests again when the server asks
// (rotation.go). The server client reads it in every TLS handshake.
type agentIdentity struct {
	log          hclog.Logger
	td           spiffeid.TrustDomain
	bootstrap    []*x509.Certificate
	attestorName string
	attestor     agent.NodeAttestor
	store        *store
	client       *serverClient
	now          func() time.Time

	// persistMu orders writes of the stored state, which both the
	// syncer (new authorities) and the rotation (new SVIDs) make.
	persistMu sync.Mutex

	mu    sync.RWMutex
	creds *credentials
	roots []*x509.Certificate // verify the server with them

	ready     chan struct{} // closed once the agent has an SVID
	readyOnce sync.Once

	renewKick    chan struct{}
	reattestKick chan struct{}
	// fatal carries why the agent lost its identity for good; it ends Run.
	fatal chan error
}

func newAgentIdentity(log hclog.Logger, td spiffeid.TrustDomain, server *agent.ServerConfig, st *store) *agentIdentity {
	return &agentIdentity{
		log:          log,
		td:           td,
		bootstrap:    server.Bootstrap,
		attestorName: server.NodeAttestorName,
		attestor:     server.NodeAttestor,
		store:        st,
		now:          time.Now,
		ready:        make(chan struct{}),
		renewKick:    make(chan struct{}, 1),
		reattestKick: make(chan struct{}, 1),
		fatal:        make(chan error, 1),
	}
}

// start loads the stored agent SVID or attests the node.
func (id *agentIdentity) start(ctx context.Context) error {
	if c := id.current(); c != nil && !c.expired(id.now()) {
		return nil // from an earlier Run
	}
	creds, roots, why, err := id.store.load()
	if err != nil {
		return err
	}
	if len(roots) == 0 {
		roots = id.bootstrap
	}
	id.mu.Lock()
	id.roots = roots
	id.mu.Unlock()
	if creds != nil && creds.expired(id.now()) {
		creds, why = nil, fmt.Sprintf("the stored agent SVID expired at %s", creds.svid[0].NotAfter.Format(time.RFC3339))
	}
	if creds == nil {
		creds, err = id.adoptSpireAgent()
		if err != nil {
			return err
		}
	}
	if creds != nil {
		creds.renewAt = renewAt(creds.svid[0])
		id.mu.Lock()
		id.creds = creds
		id.mu.Unlock()
		id.log.Info("Loaded the agent SVID; no node attestation needed", "spiffe_id", redactID(creds.id()), "expires_at", creds.svid[0].NotAfter, "state", id.store.statePath)
	} else if err := id.attestUntilDone(ctx, why); err != nil {
		return err
	}
	id.readyOnce.Do(func() { close(id.ready) })
	return nil
}

// attestUntilDone attests the node, retrying while the server is out of
// reach, and installs the SVID it gets.
func (id *agentIdentity) attestUntilDone(ctx context.Context, why string) error {
	id.log.Info("Attesting the node", "reason", why, "node_attestor", id.attestorName, "server", id.client.address())
	bo := agent.NewBackoff(time.Second, time.Minute)
	for {
		creds, err := id.attest(ctx)
		if err == nil {
			if err := id.install(nil, creds); err != nil {
				return err
			}
			id.log.Info("Node attestation succeeded", "spiffe_id", redactID(creds.id()), "expires_at", creds.svid[0].NotAfter, "reattestable", creds.reattestable)
			return nil
		}
		if !transient(err) {
			return fmt.Errorf("node attestation with %s failed: %w (%w)", id.attestorName, err, agent.ErrNodeAttestationRefused)
		}
		d := bo.Next()
		logRetry(id.log, "Could not reach the SPIRE Server to attest; retrying", d, err)
		if !sleep(ctx, d) {
			return ctx.Err()
		}
	}
}

// adoptSpireAgent takes over the agent SVID spire-agent left in data_dir
// and the disk key manager's directory, and stores it as Lanyard's own.
func (id *agentIdentity) adoptSpireAgent() (*credentials, error) {
	creds, bundle, err := id.store.loadSpireAgent(id.now())
	if err != nil || creds == nil || creds.expired(id.now()) {
		return nil, err
	}
	if len(bundle) > 0 {
		id.mu.Lock()
		id.roots = bundle
		id.mu.Unlock()
	}
	creds.renewAt = renewAt(creds.svid[0])
	if err := id.install(nil, creds); err != nil {
		return nil, err
	}
	id.log.Info("Took over the agent SVID spire-agent stored in data_dir; spire-agent must not run on this node any more", "spiffe_id", redactID(creds.id()))
	return creds, nil
}

// attest runs node attestation and returns new credentials. It also
// fetches the bundle over the same connection: with insecure bootstrap that
// is where trust in the server comes from.
func (id *agentIdentity) attest(ctx context.Context) (*credentials, error) {
	key, csr, err := newAgentKey()
	if err != nil {
		return nil, err
	}
	cc, err := id.client.dialAttest(id.haveRoots())
	if err != nil {
		return nil, err
	}
	defer cc.Close()
	ctx, cancel := context.WithTimeout(ctx, attestTimeout)
	defer cancel()
	stream := &attestStream{client: agentv1.NewAgentClient(cc), csr: csr}
	if err := id.attestor.Attest(ctx, stream); err != nil {
		return nil, err
	}
	if stream.result == nil {
		return nil, fmt.Errorf("the %s attestor finished before the SPIRE Server accepted the node", id.attestorName)
	}
	creds, err := id.newCredentials(stream.result.Svid, key)
	if err != nil {
		return nil, err
	}
	creds.reattestable = stream.result.Reattestable
	b, err := bundlev1.NewBundleClient(cc).GetBundle(ctx, &bundlev1.GetBundleRequest{})
	if err != nil {
		return nil, fmt.Errorf("fetching the bundle after attestation: %w", err)
	}
	local, err := bundleFromProto(b)
	if err != nil {
		return nil, err
	}
	if local.TrustDomain() != id.td {
		return nil, fmt.Errorf("the SPIRE Server serves trust domain %s, not %s: check trust_domain", local.TrustDomain(), id.td)
	}
	id.mu.Lock()
	id.roots = local.X509Authorities()
	id.mu.Unlock()
	return creds, nil
}

// newAgentKey generates the agent SVID's key and a CSR for it. The server
// takes only the public key from the CSR.
func newAgentKey() (*ecdsa.PrivateKey, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generating the agent key: %w", err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		return nil, nil, fmt.Errorf("creating the agent CSR: %w", err)
	}
	return key, csr, nil
}

func (id *agentIdentity) newCredentials(svid *types.X509SVID, key *ecdsa.PrivateKey) (*credentials, error) {
	if svid == nil || len(svid.CertChain) == 0 {
		return nil, errors.New("the SPIRE Server returned no agent SVID")
	}
	chain, err := parseDERs(svid.CertChain)
	if err != nil {
		return nil, fmt.Errorf("parsing the agent SVID: %w", err)
	}
	leaf := chain[0]
	if len(leaf.URIs) != 1 {
		return nil, errors.New("the agent SVID has no single URI SAN")
	}
	sid, err := spiffeid.FromURI(leaf.URIs[0])
	if err != nil || sid.TrustDomain() != id.td {
		return nil, fmt.Errorf("the agent SVID names %s, which is not in trust domain %s", leaf.URIs[0], id.td)
	}
	if !key.PublicKey.Equal(leaf.PublicKey) {
		return nil, errors.New("the agent SVID is not for the key the agent sent")
	}
	return &credentials{svid: chain, key: key, renewAt: renewAt(leaf)}, nil
}

// install persists new credentials and switches to them: new connections
// present the new SVID. The first use activates it on the server (and
// retires the old one), so it must be on disk before that.
func (id *agentIdentity) install(prev, next *credentials) error {
	id.persistMu.Lock()
	defer id.persistMu.Unlock()
	if err := id.store.save(prev, next, id.currentRoots()); err != nil {
		return fmt.Errorf("storing the agent SVID: %w", err)
	}
	id.mu.Lock()
	id.creds = next
	id.mu.Unlock()
	id.client.retire()
	return nil
}

// forget drops the agent SVID, stored and held (so the next Run attests
// again), and returns err.
func (id *agentIdentity) forget(err error) error {
	id.persistMu.Lock()
	defer id.persistMu.Unlock()
	id.mu.Lock()
	roots := id.roots
	id.creds = nil
	id.mu.Unlock()
	id.client.retire()
	if ferr := id.store.forget(roots); ferr != nil {
		id.log.Error("Could not remove the stored agent SVID", "error", ferr)
	}
	return err
}

// setRoots switches server verification to new authorities and stores
// them, so that a restart trusts the server's current CAs rather than the
// bootstrap bundle, which rotation may have left behind.
func (id *agentIdentity) setRoots(roots []*x509.Certificate) {
	id.persistMu.Lock()
	defer id.persistMu.Unlock()
	id.mu.Lock()
	id.roots = roots
	creds := id.creds
	id.mu.Unlock()
	if err := id.store.writeState(creds, roots); err != nil {
		id.log.Error("Could not store the trust bundle; a restart will verify the server with the previous one", "error", err)
	}
	// A CA revoked before the agent SVID it signed was replaced: renew
	// now, on the connection still open, before new ones are refused.
	if creds != nil && !signedBy(creds.svid, roots) {
		id.log.Warn("The agent SVID's CA left the bundle; renewing it now")
		kick(id.renewKick)
	}
}

// taint renews the agent SVID at once when one of the tainted
// authorities signed it.
func (id *agentIdentity) taint(authorities []*x509.Certificate) {
	if c := id.current(); c != nil && len(authorities) > 0 && signedBy(c.svid, authorities) {
		id.log.Info("The agent SVID was signed by a tainted authority; renewing it now")
		kick(id.renewKick)
	}
}

// refused acts on the server refusing the agent SVID on a call.
func (id *agentIdentity) refused(err error) {
	switch {
	case banned(err):
		id.fail(id.forget(fmt.Errorf("the SPIRE Server has banned this agent: it deleted its stored SVID; to rejoin, evict it on the server (spire-server agent evict) and start it with a new join token or attestation: %w", err)))
	case mustReattest(err):
		id.log.Warn("The SPIRE Server asks the agent to attest again", "error", err)
		kick(id.reattestKick)
	}
}

// fail stops Run with err.
func (id *agentIdentity) fail(err error) {
	select {
	case id.fatal <- err:
	default:
	}
}

// renewAt is the agent SVID's half-life, with +-10% jitter so that agents
// attested together do not renew together.
func renewAt(leaf *x509.Certificate) time.Time {
	life := leaf.NotAfter.Sub(leaf.NotBefore)
	half := life / 2
	jitter := time.Duration(0)
	if span := int64(half / 5); span > 0 {
		if n, err := rand.Int(rand.Reader, big.NewInt(span)); err == nil {
			jitter = time.Duration(n.Int64()) - half/10
		}
	}
	return leaf.NotBefore.Add(half + jitter)
}

func (id *agentIdentity) current() *credentials {
	id.mu.RLock()
	defer id.mu.RUnlock()
	return id.creds
}

func (id *agentIdentity) currentRoots() []*x509.Certificate {
	id.mu.RLock()
	defer id.mu.RUnlock()
	return id.roots
}

func (id *agentIdentity) haveRoots() bool { return len(id.currentRoots()) > 0 }

func (id *agentIdentity) waitReady(ctx context.Context) error {
	select {
	case <-id.ready:
		return nil
	case <-ctx.Done():
		return errors.New("the agent is not attested to the SPIRE Server yet")
	}
}

func (id *agentIdentity) isReady() bool {
	select {
	case <-id.ready:
		return true
	default:
		return false
	}
}

// GetX509SVID presents the current agent SVID in TLS handshakes.
func (id *agentIdentity) GetX509SVID() (*x509svid.SVID, error) {
	c := id.current()
	if c == nil {
		return nil, errors.New("the agent has no SVID yet")
	}
	return &x509svid.SVID{ID: c.id(), Certificates: c.svid, PrivateKey: c.key}, nil
}

// GetX509BundleForTrustDomain verifies the server against the latest
// authorities.
func (id *agentIdentity) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	if td != id.td {
		return nil, fmt.Errorf("no bundle for trust domain %s", td)
	}
	return x509bundle.FromX509Authorities(td, id.currentRoots()), nil
}

// renew has the server sign a new agent SVID for a new key.
func (id *agentIdentity) renew(ctx context.Context) (*credentials, error) {
	key, csr, err := newAgentKey()
	if err != nil {
		return nil, err
	}
	var resp *agentv1.RenewAgentResponse
	err = id.client.call(ctx, func(ctx context.Context, cc *grpc.ClientConn) error {
		var err error
		resp, err = agentv1.NewAgentClient(cc).RenewAgent(ctx, &agentv1.RenewAgentRequest{Params: &agentv1.AgentX509SVIDParams{Csr: csr}})
		return err
	})
	if err != nil {
		return nil, err
	}
	creds, err := id.newCredentials(resp.Svid, key)
	if err != nil {
		return nil, err
	}
	if c := id.current(); c != nil {
		creds.reattestable = c.reattestable
	}
	return creds, nil
}
