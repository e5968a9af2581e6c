// Package spire is the upstream that makes Lanyard a drop-in for
// spire-agent: it attests the node to a SPIRE Server (agent/v1 AttestAgent),
// keeps and renews the agent SVID, syncs the node's registration entries
// and bundles, and has the server sign workload SVIDs, all over mTLS with
// the agent SVID.
//
// Three parts, each with its own lock: agentIdentity (identity.go,
// rotation.go) holds the agent SVID and the authorities the server is
// verified with; serverClient (client.go) is the connection that presents
// them; syncer (syncer.go, entries.go, bundles.go) keeps entries and
// bundles up to date. Spire wires them and signs for the workloads.
package spire

import (
	"context"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"fmt"
	"net/url"
	"path/filepath"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/conf"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	svidv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/server/svid/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
)

// Name is the upstream's name; the agent picks it when server_address is set.
const Name = agent.ServerUpstream

// maxBatch is BatchNewX509SVID's limit on CSRs a call.
const maxBatch = 500

func init() {
	agent.RegisterUpstream(Name, New)
}

var (
	_ agent.SelfIdentity     = (*Spire)(nil)
	_ agent.ServerConnection = (*Spire)(nil)
)

// Spire is the SPIRE Server upstream.
type Spire struct {
	log      hclog.Logger
	identity *agentIdentity
	client   *serverClient
	syncer   *syncer
}

// New wires the parts from the agent's ServerConfig. It reads nothing and
// does not talk to the server: `lanyard validate` runs it too.
func New(cfg agent.UpstreamConfig) (agent.Upstream, error) {
	var none struct{}
	if err := cfg.Data.Decode(&none); err != nil {
		return nil, err
	}
	server := cfg.Server
	if server == nil {
		return nil, errors.New("the spire upstream needs the SPIRE Server's settings (this is a bug in the caller)")
	}
	serverID, err := spiffeid.FromPath(cfg.TrustDomain, "/spire/server")
	if err != nil {
		return nil, err
	}
	st := &store{statePath: filepath.Join(cfg.DataDir, stateFileName), keyDir: server.KeyDir, td: cfg.TrustDomain}
	identity := newAgentIdentity(cfg.Log, cfg.TrustDomain, server, st)
	client := &serverClient{
		log:               cfg.Log,
		addr:              server.Address,
		serverID:          serverID,
		insecureBootstrap: server.InsecureBootstrap,
		creds:             identity,
		refused:           identity.refused,
		metrics:           cfg.Metrics,
	}
	identity.client = client
	return &Spire{
		log:      cfg.Log,
		identity: identity,
		client:   client,
		syncer:   newSyncer(cfg.Log, cfg.TrustDomain, serverID, server.SyncInterval, client, identity),
	}, nil
}

// GetX509SVID returns the agent SVID: the broker endpoint presents it.
func (s *Spire) GetX509SVID() (*x509svid.SVID, error) { return s.identity.GetX509SVID() }

// ServerAddress is the address (ip:port) of the SPIRE Server that answered
// last, since server_address may name several; server_address:server_port
// before any answered.
func (s *Spire) ServerAddress() string { return s.client.serverInUse() }

// LastSync is when a sync with the server last succeeded.
func (s *Spire) LastSync() time.Time {
	if ns := s.syncer.lastSuccess.Load(); ns != 0 {
		return time.Unix(0, ns)
	}
	return time.Time{}
}

// Run attests the node (or loads its stored SVID), then syncs entries and
// bundles every sync_interval and renews the agent SVID at half-life, until
// ctx ends or the server refuses the agent for good.
//
// The agent runs it again after it returns an error; it then resumes with
// the SVID it holds.
func (s *Spire) Run(ctx context.Context, sink agent.Sink) error {
	drainErr(s.identity.fatal)
	if err := s.identity.start(ctx); err != nil {
		if ctx.Err() != nil {
			return nil
		}
		sink.ReportUpstream(err)
		return err
	}
	if !s.syncer.attach(ctx, sink) {
		return nil // ctx ended
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	rotated := make(chan struct{})
	go func() {
		defer close(rotated)
		s.identity.runRotation(ctx)
	}()
	err := s.syncer.run(ctx, sink)
	cancel()
	<-rotated
	s.client.retire()
	return err
}

// Resync syncs now for a workload that found no identity; see syncer.Resync.
func (s *Spire) Resync(ctx context.Context) (bool, error) { return s.syncer.Resync(ctx) }

// Reconfigure accepts a SIGHUP: the spire upstream has no plugin_data; the
// agent block's server settings come through ReloadServer.
func (s *Spire) Reconfigure(*conf.Section) error { return nil }

var _ agent.ServerReloader = (*Spire)(nil)

// ReloadServer takes the server settings of a SIGHUP. A new address
// retires the connection: calls in flight finish on it, the next ones go
// to the new address. A new sync_interval times the next periodic sync.
// The agent SVID, entries and bundles stay: the agent block refuses a new
// trust domain, so the new servers are the same deployment's.
func (s *Spire) ReloadServer(settings agent.ServerSettings) {
	if s.client.setAddress(settings.Address) {
		s.log.Info("The SPIRE Server's address changed; reconnecting", "server", settings.Address)
	}
	if s.syncer.interval() != settings.SyncInterval {
		s.syncer.setInterval(settings.SyncInterval)
		s.log.Info("sync_interval changed", "sync_interval", settings.SyncInterval)
	}
}

func logRetry(log hclog.Logger, msg string, wait time.Duration, err error) {
	args := []any{"retry_in", wait, "error", err}
	if hint := handshakeHint(err); hint != "" {
		args = append(args, "hint", hint)
	}
	log.Warn(msg, args...)
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

// MintX509SVIDs has the server sign the agent's keys, up to maxBatch a call.
func (s *Spire) MintX509SVIDs(ctx context.Context, reqs []agent.X509Request) ([]agent.X509Result, error) {
	if err := s.identity.waitReady(ctx); err != nil {
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
		err := s.client.call(ctx, func(ctx context.Context, cc *grpc.ClientConn) error {
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
	if err := s.identity.waitReady(ctx); err != nil {
		return nil, err
	}
	var resp *svidv1.NewJWTSVIDResponse
	err := s.client.call(ctx, func(ctx context.Context, cc *grpc.ClientConn) error {
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
