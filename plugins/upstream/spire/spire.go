// Package spire is the upstream that makes Lanyard a drop-in for
// spire-agent: it attests the node to a SPIRE Server (agent/v1 AttestAgent),
// keeps and renews the agent SVID, syncs the node's registration entries
// and bundles, and has the server sign workload SVIDs, all over mTLS with
// the agent SVID.
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
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/conf"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	agentv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/server/agent/v1"
	bundlev1 "github.com/spiffe/spire-api-sdk/proto/spire/api/server/bundle/v1"
	svidv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/server/svid/v1"
	"github.com/spiffe/spire-api-sdk/proto/spire/api/types"
	"golang.org/x/sync/semaphore"
	"golang.org/x/time/rate"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
)

// Name is the upstream's name; the agent picks it when server_address is set.
const Name = "spire"

const (
	typeNodeAttestor = "NodeAttestor"
	typeKeyManager   = "KeyManager"
	// maxBatch is BatchNewX509SVID's limit on CSRs a call.
	maxBatch = 500
	// joinTokenAttestor is the attestor -joinToken selects.
	joinTokenAttestor = "join_token"
)

func init() {
	agent.RegisterUpstream(Name, New)
}

// Spire is the SPIRE Server upstream.
type Spire struct {
	log               hclog.Logger
	td                spiffeid.TrustDomain
	serverID          spiffeid.ID
	addr              string
	syncInterval      time.Duration
	bootstrap         []*x509.Certificate
	insecureBootstrap bool
	attestorName      string
	attestor          agent.NodeAttestor
	store             *store
	now               func() time.Time

	// persistMu orders writes of the stored state, which both the sync
	// and the rotation loops make.
	persistMu sync.Mutex

	mu        sync.RWMutex
	creds     *credentials
	roots     []*x509.Certificate // the trust domain's X.509 authorities: verify the server with them
	conn      *serverConn
	ready     chan struct{} // closed once the agent has an SVID
	readyOnce sync.Once

	renewKick    chan struct{}
	reattestKick chan struct{}
	fatal        chan error

	// syncMu serializes syncs, periodic and on demand (Resync). A caller
	// of Resync stops waiting for it when its context ends: a sync may
	// take up to rpcTimeout while the server is unreachable.
	syncMu   *semaphore.Weighted // of weight 1
	sync     syncState
	sink     agent.Sink
	lastSync time.Time     // when the last sync started
	synced   chan struct{} // restarts the periodic timer after a Resync
	// resyncBudget holds the tokens of syncs on demand; see Resync. The
	// first two of a run of them that find nothing new start at least
	// resyncFirstSpacing after the previous sync, the next ones
	// resyncSpacing. Guarded by syncMu, except the limiter.
	resyncBudget       *rate.Limiter
	resyncFirstSpacing time.Duration
	resyncSpacing      time.Duration
	resyncStreak       int       // syncs on demand since one brought new entries
	lastResync         time.Time // when the last sync on demand started
	entrySets          int64     // how many times entries were handed to the sink
	// fetched counts entries received in full, syncs the syncs started;
	// for tests and debugging.
	fetched atomic.Int64
	syncs   atomic.Int64
}

// New reads the agent block, the NodeAttestor and the KeyManager. It does
// not talk to the server: `lanyard validate` runs it too.
func New(cfg agent.UpstreamConfig) (agent.Upstream, error) {
	var none struct{}
	if err := cfg.Data.Decode(&none); err != nil {
		return nil, err
	}
	if cfg.Config == nil {
		return nil, errors.New("the spire upstream needs the agent config (this is a bug in the caller)")
	}
	a := cfg.Config.Agent
	agentErr := func(key, format string, args ...any) error {
		return a.Errorf(strings.TrimPrefix(key, "agent."), format, args...)
	}
	if a.ServerAddress == "" {
		return nil, agentErr("agent.server_address", "server_address is not set: the spire upstream needs the SPIRE Server's host name or IP")
	}
	port := a.ServerPort
	if port == 0 {
		port = conf.DefaultServerPort
	}
	serverID, err := spiffeid.FromPath(cfg.TrustDomain, "/spire/server")
	if err != nil {
		return nil, err
	}
	s := &Spire{
		log:               cfg.Log,
		td:                cfg.TrustDomain,
		serverID:          serverID,
		addr:              net.JoinHostPort(a.ServerAddress, strconv.Itoa(port)),
		syncInterval:      a.SyncInterval,
		insecureBootstrap: a.InsecureBootstrap,
		now:               time.Now,
		ready:             make(chan struct{}),
		renewKick:         make(chan struct{}, 1),
		reattestKick:      make(chan struct{}, 1),
		fatal:             make(chan error, 1),
		synced:            make(chan struct{}, 1),
		syncMu:            semaphore.NewWeighted(1),
	}
	if s.syncInterval <= 0 {
		s.syncInterval = conf.DefaultSyncInterval
	}
	s.resyncBudget = rate.NewLimiter(rate.Every(resyncEarnEvery*s.syncInterval), resyncBurst)
	s.resyncFirstSpacing = s.syncInterval / resyncFirstSpacingDivisor
	s.resyncSpacing = s.syncInterval / resyncSpacingDivisor
	switch {
	case a.TrustBundlePath != "":
		if s.bootstrap, err = loadTrustBundle(a.TrustBundlePath, a.TrustBundleFormat, cfg.TrustDomain); err != nil {
			return nil, agentErr("agent.trust_bundle_path", "%v", err)
		}
	case !a.InsecureBootstrap:
		return nil, agentErr("agent.trust_bundle_path", "trust_bundle_path is not set: write the SPIRE Server's bundle to a file (spire-server bundle show > bundle.pem) and point trust_bundle_path at it, or set insecure_bootstrap = true")
	}
	if s.attestorName, s.attestor, err = nodeAttestor(cfg, a.JoinToken); err != nil {
		return nil, err
	}
	keyDir, err := keyManager(cfg)
	if err != nil {
		return nil, err
	}
	s.store = &store{statePath: filepath.Join(cfg.DataDir, stateFileName), keyDir: keyDir, td: cfg.TrustDomain}
	s.sync.init()
	return s, nil
}

// nodeAttestor builds the configured NodeAttestor; a join token, as for
// spire-agent, selects join_token whatever else is configured.
func nodeAttestor(cfg agent.UpstreamConfig, joinToken string) (string, agent.NodeAttestor, error) {
	var found *conf.Plugin
	for _, p := range cfg.Config.Plugins {
		if p.Type != typeNodeAttestor || !p.Enabled {
			continue
		}
		if found != nil {
			return "", nil, p.Errorf("a second NodeAttestor: the agent attests with one (already %q)", found.Name)
		}
		found = p
	}
	name := joinTokenAttestor
	data := emptySection()
	switch {
	case joinToken != "" && found != nil && found.Name != joinTokenAttestor:
		cfg.Log.Info("A join token is set, so the node attests with join_token rather than the configured NodeAttestor", "node_attestor", found.Name)
	case found != nil:
		name, data = found.Name, found.Data
	case joinToken == "":
		return "", nil, &conf.Error{Pos: cfg.Config.Agent.Pos, Key: "plugins", Msg: "no NodeAttestor is configured: add NodeAttestor \"join_token\" { plugin_data {} } and pass -joinToken, or NodeAttestor \"x509pop\" { plugin_data { ... } }"}
	}
	factory, ok := agent.LookupNodeAttestor(name)
	if !ok {
		msg := fmt.Sprintf("NodeAttestor %q is not supported by Lanyard (compiled in: %s)", name, strings.Join(agent.RegisteredNodeAttestors(), ", "))
		if found != nil {
			return "", nil, found.Errorf("%s", msg)
		}
		return "", nil, errors.New(msg)
	}
	na, err := factory(agent.NodeAttestorConfig{
		Name:        name,
		Data:        data,
		Log:         cfg.Log.Named("nodeattestor." + name),
		TrustDomain: cfg.TrustDomain,
		JoinToken:   joinToken,
	})
	if err != nil {
		return "", nil, err
	}
	return name, na, nil
}

// keyManager returns the directory the agent key is kept in: the disk key
// manager's directory (data_dir when it is not set, or when there is no
// KeyManager block), or "" for the memory key manager.
func keyManager(cfg agent.UpstreamConfig) (string, error) {
	var found *conf.Plugin
	for _, p := range cfg.Config.Plugins {
		if p.Type != typeKeyManager || !p.Enabled {
			continue
		}
		if found != nil {
			return "", p.Errorf("a second KeyManager: the agent has one (already %q)", found.Name)
		}
		found = p
	}
	if found == nil {
		return cfg.DataDir, nil
	}
	switch found.Name {
	case "disk":
		var d struct {
			Directory string `hcl:"directory"`
		}
		if err := found.Data.Decode(&d); err != nil {
			return "", err
		}
		if d.Directory == "" {
			return cfg.DataDir, nil
		}
		if info, err := os.Stat(d.Directory); err == nil && !info.IsDir() {
			return "", found.Data.Errorf("directory", "%s is not a directory", d.Directory)
		}
		return d.Directory, nil
	case "memory":
		var none struct{}
		if err := found.Data.Decode(&none); err != nil {
			return "", err
		}
		return "", nil
	default:
		return "", found.Errorf("KeyManager %q is not supported by Lanyard: use \"disk\" (the agent key survives restarts) or \"memory\" (the node attests again on every start)", found.Name)
	}
}

func emptySection() *conf.Section {
	s, err := conf.NewSection("", "")
	if err != nil {
		panic(err) // an empty body always parses
	}
	return s
}

// loadTrustBundle reads the bootstrap bundle: PEM certificates, or a SPIFFE
// bundle (JWKS) for trust_bundle_format = "spiffe".
func loadTrustBundle(path, format string, td spiffeid.TrustDomain) ([]*x509.Certificate, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading the trust bundle: %w", err)
	}
	if format == "spiffe" {
		b, err := spiffebundle.Parse(td, data)
		if err != nil {
			return nil, fmt.Errorf("%s is not a SPIFFE bundle (%v): fix it, or set trust_bundle_format = \"pem\" if it holds PEM certificates", path, err)
		}
		if len(b.X509Authorities()) == 0 {
			return nil, fmt.Errorf("the SPIFFE bundle in %s has no X.509 authority to verify the server with", path)
		}
		return b.X509Authorities(), nil
	}
	certs, err := agent.ParseCertificatesPEM(data)
	if err != nil {
		return nil, fmt.Errorf("parsing %s: %w", path, err)
	}
	if len(certs) == 0 {
		return nil, fmt.Errorf("%s holds no PEM certificate: write the server's bundle with `spire-server bundle show`, or set trust_bundle_format = \"spiffe\" for a SPIFFE bundle", path)
	}
	return certs, nil
}

// Run attests the node (or loads its stored SVID), then syncs entries and
// bundles every sync_interval and renews the agent SVID at half-life, until
// ctx ends or the server refuses the agent for good.
//
// The agent runs it again after it returns an error; it then resumes with
// the SVID it holds.
func (s *Spire) Run(ctx context.Context, sink agent.Sink) error {
	drainErr(s.fatal)
	if err := s.start(ctx); err != nil {
		if ctx.Err() != nil {
			return nil
		}
		sink.ReportUpstream(err)
		return err
	}
	if err := s.syncMu.Acquire(ctx, 1); err != nil {
		return nil // ctx ended
	}
	s.sink = sink
	s.sync.delivered = false
	s.syncMu.Release(1)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	rotated := make(chan struct{})
	go func() {
		defer close(rotated)
		s.runRotation(ctx)
	}()
	err := s.runSync(ctx, sink)
	cancel()
	<-rotated
	s.mu.Lock()
	s.retireConnLocked()
	s.mu.Unlock()
	return err
}

// start loads the stored agent SVID or attests the node.
func (s *Spire) start(ctx context.Context) error {
	if c := s.currentCreds(); c != nil && !c.expired(s.now()) {
		return nil // from an earlier Run
	}
	creds, roots, why, err := s.store.load()
	if err != nil {
		return err
	}
	s.mu.Lock()
	s.roots = roots
	if len(s.roots) == 0 {
		s.roots = s.bootstrap
	}
	s.mu.Unlock()
	if creds != nil && creds.expired(s.now()) {
		creds, why = nil, fmt.Sprintf("the stored agent SVID expired at %s", creds.svid[0].NotAfter.Format(time.RFC3339))
	}
	if creds == nil {
		creds, err = s.adoptSpireAgent()
		if err != nil {
			return err
		}
	}
	if creds != nil {
		creds.renewAt = renewAt(creds.svid[0])
		s.mu.Lock()
		s.creds = creds
		s.mu.Unlock()
		s.log.Info("Loaded the agent SVID; no node attestation needed", "spiffe_id", redactID(creds.id()), "expires_at", creds.svid[0].NotAfter, "state", s.store.statePath)
	} else {
		s.log.Info("Attesting the node", "reason", why, "node_attestor", s.attestorName, "server", s.addr)
		bo := agent.NewBackoff(time.Second, time.Minute)
		for {
			creds, err = s.attest(ctx)
			if err == nil {
				break
			}
			if !transient(err) {
				return fmt.Errorf("node attestation with %s failed: %w", s.attestorName, err)
			}
			d := bo.Next()
			s.logRetry("Could not reach the SPIRE Server to attest; retrying", d, err)
			if !sleep(ctx, d) {
				return ctx.Err()
			}
		}
		if err := s.install(nil, creds); err != nil {
			return err
		}
		s.log.Info("Node attestation succeeded", "spiffe_id", redactID(creds.id()), "expires_at", creds.svid[0].NotAfter, "reattestable", creds.reattestable)
	}
	s.readyOnce.Do(func() { close(s.ready) })
	return nil
}

// adoptSpireAgent takes over the agent SVID spire-agent left in data_dir
// and the disk key manager's directory, and stores it as Lanyard's own.
func (s *Spire) adoptSpireAgent() (*credentials, error) {
	creds, bundle, err := s.store.loadSpireAgent(s.now())
	if err != nil || creds == nil || creds.expired(s.now()) {
		return nil, err
	}
	s.mu.Lock()
	if len(bundle) > 0 {
		s.roots = bundle
	}
	s.mu.Unlock()
	creds.renewAt = renewAt(creds.svid[0])
	if err := s.install(nil, creds); err != nil {
		return nil, err
	}
	s.log.Info("Took over the agent SVID spire-agent stored in data_dir; spire-agent must not run on this node any more", "spiffe_id", redactID(creds.id()))
	return creds, nil
}

// attest runs node attestation and returns new credentials. It also
// fetches the bundle over the same connection: with insecure bootstrap that
// is where trust in the server comes from.
func (s *Spire) attest(ctx context.Context) (*credentials, error) {
	key, csr, err := newAgentKey()
	if err != nil {
		return nil, err
	}
	cc, err := s.dialAttest()
	if err != nil {
		return nil, err
	}
	defer cc.Close()
	ctx, cancel := context.WithTimeout(ctx, attestTimeout)
	defer cancel()
	stream := &attestStream{client: agentv1.NewAgentClient(cc), csr: csr}
	if err := s.attestor.Attest(ctx, stream); err != nil {
		return nil, err
	}
	if stream.result == nil {
		return nil, fmt.Errorf("the %s attestor finished before the SPIRE Server accepted the node", s.attestorName)
	}
	creds, err := s.newCredentials(stream.result.Svid, key)
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
	if local.TrustDomain() != s.td {
		return nil, fmt.Errorf("the SPIRE Server serves trust domain %s, not %s: check trust_domain", local.TrustDomain(), s.td)
	}
	s.mu.Lock()
	s.roots = local.X509Authorities()
	s.mu.Unlock()
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

func (s *Spire) newCredentials(svid *types.X509SVID, key *ecdsa.PrivateKey) (*credentials, error) {
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
	id, err := spiffeid.FromURI(leaf.URIs[0])
	if err != nil || id.TrustDomain() != s.td {
		return nil, fmt.Errorf("the agent SVID names %s, which is not in trust domain %s", leaf.URIs[0], s.td)
	}
	if !key.PublicKey.Equal(leaf.PublicKey) {
		return nil, errors.New("the agent SVID is not for the key the agent sent")
	}
	return &credentials{svid: chain, key: key, renewAt: renewAt(leaf)}, nil
}

// install persists new credentials and switches to them: new connections
// present the new SVID. The first use activates it on the server (and
// retires the old one), so it must be on disk before that.
func (s *Spire) install(prev, next *credentials) error {
	s.persistMu.Lock()
	defer s.persistMu.Unlock()
	s.mu.RLock()
	roots := s.roots
	s.mu.RUnlock()
	if err := s.store.save(prev, next, roots); err != nil {
		return fmt.Errorf("storing the agent SVID: %w", err)
	}
	s.mu.Lock()
	s.creds = next
	s.retireConnLocked()
	s.mu.Unlock()
	return nil
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

func (s *Spire) currentCreds() *credentials {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.creds
}

func (s *Spire) waitReady(ctx context.Context) error {
	select {
	case <-s.ready:
		return nil
	case <-ctx.Done():
		return errors.New("the agent is not attested to the SPIRE Server yet")
	}
}

func kick(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

func drainErr(ch chan error) {
	select {
	case <-ch:
	default:
	}
}

func drain(ch chan struct{}) {
	select {
	case <-ch:
	default:
	}
}

// fail stops Run with err.
func (s *Spire) fail(err error) {
	select {
	case s.fatal <- err:
	default:
	}
}

// call runs fn on the mTLS connection with a timeout, and acts on the
// server refusing the agent SVID.
func (s *Spire) call(ctx context.Context, fn func(context.Context, *grpc.ClientConn) error) error {
	c, err := s.acquire()
	if err != nil {
		return err
	}
	defer s.release(c)
	ctx, cancel := context.WithTimeout(ctx, rpcTimeout)
	defer cancel()
	err = fn(ctx, c.cc)
	if err == nil {
		return nil
	}
	s.mu.RLock()
	stale := c.retired
	s.mu.RUnlock()
	switch {
	case stale:
		// A call on the previous SVID's connection: the next one uses the new SVID.
	case banned(err):
		s.fail(s.forget(fmt.Errorf("the SPIRE Server has banned this agent: it deleted its stored SVID; to rejoin, evict it on the server (spire-server agent evict) and start it with a new join token or attestation: %w", err)))
	case mustReattest(err):
		s.log.Warn("The SPIRE Server asks the agent to attest again", "error", err)
		kick(s.reattestKick)
	}
	return err
}

// forget drops the agent SVID, stored and held (so the next Run attests
// again), and returns err.
func (s *Spire) forget(err error) error {
	s.persistMu.Lock()
	defer s.persistMu.Unlock()
	s.mu.Lock()
	roots := s.roots
	s.creds = nil
	s.retireConnLocked()
	s.mu.Unlock()
	if ferr := s.store.forget(roots); ferr != nil {
		s.log.Error("Could not remove the stored agent SVID", "error", ferr)
	}
	return err
}

// runRotation renews the agent SVID at half-life, at once when its
// authority is tainted, and attests again when the server asks.
func (s *Spire) runRotation(ctx context.Context) {
	bo := agent.NewBackoff(time.Second, time.Minute)
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		c := s.currentCreds()
		if c == nil {
			// Forgotten after the server refused it; Run is ending.
			<-ctx.Done()
			return
		}
		timer.Reset(max(c.renewAt.Sub(s.now()), 0))
		reattest := false
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		case <-s.renewKick:
		case <-s.reattestKick:
			reattest = true
		}
		for {
			err := s.rotate(ctx, reattest)
			if err == nil {
				bo.Reset()
				break
			}
			if ctx.Err() != nil {
				return
			}
			if errors.Is(err, errPermanent) {
				s.fail(s.forget(err))
				return
			}
			d := bo.Next()
			s.logRetry("Could not renew the agent SVID (it expires at "+c.svid[0].NotAfter.Format(time.RFC3339)+"); retrying", d, err)
			if !sleep(ctx, d) {
				return
			}
		}
	}
}

// errPermanent marks rotation errors that retrying cannot fix.
var errPermanent = errors.New("the agent cannot get a new SVID")

// rotate renews the agent SVID with RenewAgent, or by attesting again when
// the attestor allows it (as spire-agent does), the SVID has expired, or the
// server asked for it.
func (s *Spire) rotate(ctx context.Context, reattest bool) error {
	prev := s.currentCreds()
	if prev == nil {
		return fmt.Errorf("%w: it was refused by the server", errPermanent)
	}
	var next *credentials
	var err error
	how := "renewed"
	if reattest || prev.reattestable || prev.expired(s.now()) {
		how = "re-attested"
		next, err = s.attest(ctx)
	} else {
		next, err = s.renew(ctx)
		if err != nil && mustReattest(err) {
			s.log.Warn("The SPIRE Server refused to renew the agent SVID; attesting again", "error", err)
			how = "re-attested"
			next, err = s.attest(ctx)
		}
	}
	if err != nil {
		if how == "re-attested" && !transient(err) {
			return fmt.Errorf("%w: node attestation with %s failed (%v); if it is join_token, whose tokens are single-use, generate a new token and restart the agent with it", errPermanent, s.attestorName, err)
		}
		if banned(err) {
			return fmt.Errorf("%w: the SPIRE Server has banned this agent (%v); evict it on the server (spire-server agent evict) and start it with a new join token or attestation", errPermanent, err)
		}
		return err
	}
	if err := s.install(prev, next); err != nil {
		return err
	}
	// Requests made against the SVID just replaced are answered.
	drain(s.renewKick)
	drain(s.reattestKick)
	s.log.Info("Agent SVID "+how, "spiffe_id", redactID(next.id()), "expires_at", next.svid[0].NotAfter)
	return nil
}

func (s *Spire) renew(ctx context.Context) (*credentials, error) {
	key, csr, err := newAgentKey()
	if err != nil {
		return nil, err
	}
	var resp *agentv1.RenewAgentResponse
	err = s.call(ctx, func(ctx context.Context, cc *grpc.ClientConn) error {
		var err error
		resp, err = agentv1.NewAgentClient(cc).RenewAgent(ctx, &agentv1.RenewAgentRequest{Params: &agentv1.AgentX509SVIDParams{Csr: csr}})
		return err
	})
	if err != nil {
		return nil, err
	}
	creds, err := s.newCredentials(resp.Svid, key)
	if err != nil {
		return nil, err
	}
	if c := s.currentCreds(); c != nil {
		creds.reattestable = c.reattestable
	}
	return creds, nil
}

// MintX509SVIDs has the server sign the agent's keys, up to maxBatch a call.
func (s *Spire) MintX509SVIDs(ctx context.Context, reqs []agent.X509Request) ([]agent.X509Result, error) {
	if err := s.waitReady(ctx); err != nil {
		return nil, err
	}
	results := make([]agent.X509Result, 0, len(reqs))
	for start := 0; start < len(reqs); start += maxBatch {
		chunk := reqs[start:min(start+maxBatch, len(reqs))]
		params := make([]*svidv1.NewX509SVIDParams, len(chunk))
		for i, r := range chunk {
			csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{r.Entry.SPIFFEID.URL()}}, r.Key)
			if err != nil {
				return nil, fmt.Errorf("creating a CSR for %s: %w", r.Entry.SPIFFEID, err)
			}
			params[i] = &svidv1.NewX509SVIDParams{EntryId: r.Entry.ID, Csr: csr}
		}
		var resp *svidv1.BatchNewX509SVIDResponse
		err := s.call(ctx, func(ctx context.Context, cc *grpc.ClientConn) error {
			var err error
			resp, err = svidv1.NewSVIDClient(cc).BatchNewX509SVID(ctx, &svidv1.BatchNewX509SVIDRequest{Params: params})
			return err
		})
		if err != nil {
			return nil, fmt.Errorf("signing X509-SVIDs with the SPIRE Server: %w", err)
		}
		if len(resp.Results) != len(chunk) {
			return nil, fmt.Errorf("the SPIRE Server answered %d of %d signing requests", len(resp.Results), len(chunk))
		}
		for i, r := range resp.Results {
			results = append(results, x509Result(chunk[i].Entry, r))
		}
	}
	return results, nil
}

func x509Result(e *agent.Entry, r *svidv1.BatchNewX509SVIDResponse_Result) agent.X509Result {
	if st := r.GetStatus(); st != nil && codes.Code(st.Code) != codes.OK {
		return agent.X509Result{Err: fmt.Errorf("the SPIRE Server refused to sign %s (entry %s): %s: %s", e.SPIFFEID, e.ID, codes.Code(st.Code), st.Message)}
	}
	if r.GetSvid() == nil || len(r.Svid.CertChain) == 0 {
		return agent.X509Result{Err: fmt.Errorf("the SPIRE Server returned no SVID for %s (entry %s)", e.SPIFFEID, e.ID)}
	}
	chain, err := parseDERs(r.Svid.CertChain)
	if err != nil {
		return agent.X509Result{Err: fmt.Errorf("parsing the SVID the SPIRE Server signed for %s: %w", e.SPIFFEID, err)}
	}
	return agent.X509Result{Chain: chain}
}

// MintJWTSVID has the server sign a JWT-SVID for entry.
func (s *Spire) MintJWTSVID(ctx context.Context, entry *agent.Entry, audience []string) (*agent.JWTSVID, error) {
	if err := s.waitReady(ctx); err != nil {
		return nil, err
	}
	var resp *svidv1.NewJWTSVIDResponse
	err := s.call(ctx, func(ctx context.Context, cc *grpc.ClientConn) error {
		var err error
		resp, err = svidv1.NewSVIDClient(cc).NewJWTSVID(ctx, &svidv1.NewJWTSVIDRequest{EntryId: entry.ID, Audience: audience})
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("signing a JWT-SVID with the SPIRE Server: %w", err)
	}
	svid := resp.GetSvid()
	switch {
	case svid == nil || svid.Token == "":
		return nil, errors.New("the SPIRE Server returned no JWT-SVID")
	case svid.IssuedAt == 0 || svid.ExpiresAt == 0 || svid.IssuedAt > svid.ExpiresAt:
		return nil, fmt.Errorf("the SPIRE Server returned a JWT-SVID with bad times (issued %d, expires %d)", svid.IssuedAt, svid.ExpiresAt)
	}
	return &agent.JWTSVID{
		Token:     svid.Token,
		ID:        entry.SPIFFEID,
		Audience:  audience,
		IssuedAt:  time.Unix(svid.IssuedAt, 0),
		ExpiresAt: time.Unix(svid.ExpiresAt, 0),
	}, nil
}

// sleep waits d or until ctx ends; it reports whether d passed.
func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}
