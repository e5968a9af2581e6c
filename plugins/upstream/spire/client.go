package spire

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/lanyard-dev/lanyard/agent"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	agentv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/server/agent/v1"
	"github.com/spiffe/spire-api-sdk/proto/spire/api/types"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	grpccreds "google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
)

const (
	// rpcTimeout bounds one call to the server.
	rpcTimeout = 30 * time.Second
	// attestTimeout bounds one node attestation, challenges included.
	attestTimeout = time.Minute
	// maxRecvMsgSize lets large entry lists through (SPIRE #2675): the
	// fallback GetAuthorizedEntries sends them in one message.
	maxRecvMsgSize = 64 << 20
	// roundRobin spreads agents over the addresses a server name resolves
	// to, as spire-agent does for HA servers behind one DNS name.
	roundRobin = `{"loadBalancingConfig": [{"round_robin": {}}]}`
)

// serverConn is a gRPC connection authenticated with one agent SVID. After
// the SVID is renewed the connection is retired: calls already on it finish,
// new ones go to a new connection that presents the new SVID, and the old
// one closes when its last call returns.
type serverConn struct {
	cc      *grpc.ClientConn
	refs    int
	retired bool
}

// acquire returns the current mTLS connection, creating it if needed.
func (s *Spire) acquire() (*serverConn, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.conn == nil {
		cfg := tlsconfig.MTLSClientConfig(svidSource{s}, bundleSource{s}, tlsconfig.AuthorizeID(s.serverID))
		cc, err := s.dial(cfg)
		if err != nil {
			return nil, err
		}
		s.conn = &serverConn{cc: cc}
	}
	s.conn.refs++
	return s.conn, nil
}

func (s *Spire) release(c *serverConn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	c.refs--
	if c.retired && c.refs == 0 {
		c.cc.Close()
	}
}

// retireConnLocked makes the next call open a new connection.
func (s *Spire) retireConnLocked() {
	c := s.conn
	if c == nil {
		return
	}
	s.conn = nil
	c.retired = true
	if c.refs == 0 {
		c.cc.Close()
	}
}

func (s *Spire) dial(cfg *tls.Config) (*grpc.ClientConn, error) {
	cc, err := grpc.NewClient(s.addr,
		grpc.WithTransportCredentials(grpccreds.NewTLS(cfg)),
		grpc.WithDefaultServiceConfig(roundRobin),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxRecvMsgSize)),
	)
	if err != nil {
		return nil, fmt.Errorf("connecting to the SPIRE Server at %s: %w", s.addr, err)
	}
	return cc, nil
}

// dialAttest opens a connection for node attestation: the server is
// verified against the bundle, or, with insecure_bootstrap and no bundle
// yet, only asked to present the server's SPIFFE ID.
func (s *Spire) dialAttest() (*grpc.ClientConn, error) {
	s.mu.RLock()
	haveRoots := len(s.roots) > 0
	s.mu.RUnlock()
	if haveRoots {
		return s.dial(tlsconfig.TLSClientConfig(bundleSource{s}, tlsconfig.AuthorizeID(s.serverID)))
	}
	if !s.insecureBootstrap {
		return nil, errors.New("no trust bundle to verify the SPIRE Server with: set trust_bundle_path, or insecure_bootstrap = true")
	}
	s.log.Warn("Insecure bootstrap: the SPIRE Server's certificate is not verified for this attestation")
	want := s.serverID.String()
	return s.dial(&tls.Config{
		MinVersion: tls.VersionTLS12,
		// Nothing to verify against yet; the server's bundle fetched on
		// this connection becomes the trust anchor (trust on first use).
		InsecureSkipVerify: true,
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			if len(raw) == 0 {
				return errors.New("the SPIRE Server presented no certificate")
			}
			leaf, err := x509.ParseCertificate(raw[0])
			if err != nil {
				return err
			}
			if len(leaf.URIs) != 1 || leaf.URIs[0].String() != want {
				return fmt.Errorf("the server presented %v, not the SPIRE Server ID %s: check server_address and trust_domain", leaf.URIs, want)
			}
			return nil
		},
	})
}

// svidSource presents the current agent SVID in TLS handshakes.
type svidSource struct{ s *Spire }

func (src svidSource) GetX509SVID() (*x509svid.SVID, error) {
	src.s.mu.RLock()
	c := src.s.creds
	src.s.mu.RUnlock()
	if c == nil {
		return nil, errors.New("the agent has no SVID yet")
	}
	return &x509svid.SVID{ID: c.id(), Certificates: c.svid, PrivateKey: c.key}, nil
}

// bundleSource verifies the server against the latest local bundle.
type bundleSource struct{ s *Spire }

func (src bundleSource) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	if td != src.s.td {
		return nil, fmt.Errorf("no bundle for trust domain %s", td)
	}
	src.s.mu.RLock()
	roots := src.s.roots
	src.s.mu.RUnlock()
	return x509bundle.FromX509Authorities(td, roots), nil
}

// attestStream runs AttestAgent for a NodeAttestor.
type attestStream struct {
	client agentv1.AgentClient
	csr    []byte
	stream agentv1.Agent_AttestAgentClient
	result *agentv1.AttestAgentResponse_Result
}

var _ agent.AttestationStream = (*attestStream)(nil)

func (a *attestStream) SendAttestationData(ctx context.Context, data agent.AttestationData) ([]byte, error) {
	return a.send(ctx, &agentv1.AttestAgentRequest{Step: &agentv1.AttestAgentRequest_Params_{
		Params: &agentv1.AttestAgentRequest_Params{
			Data:   &types.AttestationData{Type: data.Type, Payload: data.Payload},
			Params: &agentv1.AgentX509SVIDParams{Csr: a.csr},
		},
	}})
}

func (a *attestStream) SendChallengeResponse(ctx context.Context, response []byte) ([]byte, error) {
	if a.stream == nil {
		return nil, errors.New("a challenge response was sent before the attestation data")
	}
	return a.send(ctx, &agentv1.AttestAgentRequest{Step: &agentv1.AttestAgentRequest_ChallengeResponse{ChallengeResponse: response}})
}

func (a *attestStream) send(ctx context.Context, req *agentv1.AttestAgentRequest) ([]byte, error) {
	if a.result != nil {
		return nil, errors.New("attestation already completed")
	}
	if a.stream == nil {
		stream, err := a.client.AttestAgent(ctx)
		if err != nil {
			return nil, fmt.Errorf("opening the attestation stream: %w", err)
		}
		a.stream = stream
	}
	if err := a.stream.Send(req); err != nil {
		// The server's reason is in the status Recv returns.
		if _, rerr := a.stream.Recv(); rerr != nil {
			err = rerr
		}
		return nil, fmt.Errorf("node attestation: %w", err)
	}
	resp, err := a.stream.Recv()
	if err != nil {
		return nil, fmt.Errorf("node attestation: %w", err)
	}
	if ch := resp.GetChallenge(); ch != nil {
		return ch, nil
	}
	res := resp.GetResult()
	if res == nil || res.Svid == nil {
		return nil, errors.New("node attestation: the SPIRE Server answered with neither a challenge nor an SVID")
	}
	a.result = res
	_ = a.stream.CloseSend()
	return nil, nil
}

// transient reports whether an error may go away by retrying: the server
// is unreachable, overloaded or failed internally, or the call timed out.
func transient(err error) bool {
	if err == nil {
		return false
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return true
	}
	st, ok := status.FromError(err)
	if !ok {
		return false
	}
	switch st.Code() {
	case codes.Unavailable, codes.DeadlineExceeded, codes.ResourceExhausted, codes.Aborted, codes.Internal, codes.Unknown, codes.Canceled:
		return true
	}
	return false
}

// denialReason returns the reason the server gave for refusing the agent's
// SVID, or UNKNOWN.
func denialReason(err error) types.PermissionDeniedDetails_Reason {
	st, ok := status.FromError(err)
	if !ok || st.Code() != codes.PermissionDenied {
		return types.PermissionDeniedDetails_UNKNOWN
	}
	for _, d := range st.Details() {
		if pd, ok := d.(*types.PermissionDeniedDetails); ok {
			return pd.Reason
		}
	}
	return types.PermissionDeniedDetails_UNKNOWN
}

// mustReattest reports whether the server wants the agent to attest again.
func mustReattest(err error) bool {
	switch denialReason(err) {
	case types.PermissionDeniedDetails_AGENT_EXPIRED, types.PermissionDeniedDetails_AGENT_NOT_ACTIVE,
		types.PermissionDeniedDetails_AGENT_NOT_ATTESTED, types.PermissionDeniedDetails_AGENT_MUST_REATTEST:
		return true
	}
	return false
}

func banned(err error) bool {
	return denialReason(err) == types.PermissionDeniedDetails_AGENT_BANNED
}

// handshakeHint adds what to check when TLS with the server failed.
func handshakeHint(err error) string {
	msg := err.Error()
	switch {
	case strings.Contains(msg, "x509svid: could not verify leaf certificate"), strings.Contains(msg, "unknown authority"):
		return "the SPIRE Server's certificate does not chain to the trust bundle: check trust_bundle_path (spire-server bundle show)"
	case strings.Contains(msg, "authentication handshake failed"):
		return "TLS with the SPIRE Server failed: check server_address, server_port and trust_domain"
	}
	return ""
}

// redactID hides the token in join_token agent IDs, which spell it out
// (spiffe://td/spire/agent/join_token/<token>).
func redactID(id spiffeid.ID) string {
	const marker = "/spire/agent/join_token/"
	s := id.String()
	if i := strings.Index(s, marker); i >= 0 {
		return s[:i+len(marker)] + "<redacted>"
	}
	return s
}
