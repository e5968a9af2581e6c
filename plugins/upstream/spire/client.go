package spire

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/telemetry"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
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

// serverClient is the agent's connection to the SPIRE Server, authenticated
// with the agent SVID that agentIdentity holds. After the SVID is renewed
// the connection is retired (handed over): calls already on it finish, new
// ones go to a new connection that presents the new SVID, and the old one
// closes when its last call returns.
type serverClient struct {
	log               hclog.Logger
	addr              string // host:port
	serverID          spiffeid.ID
	insecureBootstrap bool
	// creds presents the agent SVID and verifies the server; refused is
	// told when the server refuses the SVID.
	creds interface {
		x509svid.Source
		x509bundle.Source
	}
	refused func(error)
	// metrics records the calls and connections to the server; nil
	// records nothing.
	metrics *telemetry.Metrics

	mu   sync.Mutex
	conn *serverConn
}

// serverConn is a gRPC connection and the calls on it.
type serverConn struct {
	cc      *grpc.ClientConn
	refs    int
	retired bool
}

// call runs fn on the mTLS connection with a timeout, and reports the
// server refusing the agent SVID.
func (c *serverClient) call(ctx context.Context, fn func(context.Context, *grpc.ClientConn) error) error {
	conn, err := c.acquire()
	if err != nil {
		return err
	}
	defer c.release(conn)
	ctx, cancel := context.WithTimeout(ctx, rpcTimeout)
	defer cancel()
	err = fn(ctx, conn.cc)
	if err == nil {
		return nil
	}
	c.mu.Lock()
	stale := conn.retired
	c.mu.Unlock()
	// A call on the previous SVID's connection: the next one uses the new SVID.
	if !stale {
		c.refused(err)
	}
	return err
}

// acquire returns the current mTLS connection, creating it if needed.
func (c *serverClient) acquire() (*serverConn, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.conn == nil {
		cfg := tlsconfig.MTLSClientConfig(c.creds, c.creds, tlsconfig.AuthorizeID(c.serverID))
		cc, err := c.dial(cfg)
		if err != nil {
			return nil, err
		}
		c.conn = &serverConn{cc: cc}
	}
	c.conn.refs++
	return c.conn, nil
}

func (c *serverClient) release(conn *serverConn) {
	c.mu.Lock()
	defer c.mu.Unlock()
	conn.refs--
	if conn.retired && conn.refs == 0 {
		conn.cc.Close()
	}
}

// retire makes the next call open a new connection.
func (c *serverClient) retire() {
	c.mu.Lock()
	defer c.mu.Unlock()
	conn := c.conn
	if conn == nil {
		return
	}
	c.conn = nil
	conn.retired = true
	if conn.refs == 0 {
		conn.cc.Close()
	}
}

func (c *serverClient) dial(cfg *tls.Config) (*grpc.ClientConn, error) {
	cc, err := grpc.NewClient(c.addr,
		grpc.WithTransportCredentials(grpccreds.NewTLS(cfg)),
		grpc.WithDefaultServiceConfig(roundRobin),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxRecvMsgSize)),
		c.metrics.UpstreamDialOption(),
	)
	if err != nil {
		return nil, fmt.Errorf("connecting to the SPIRE Server at %s: %w", c.addr, err)
	}
	return cc, nil
}

// dialAttest opens a connection for node attestation: the server is
// verified against the authorities the agent has, or, with
// insecure_bootstrap and none yet, only asked to present the server's
// SPIFFE ID.
func (c *serverClient) dialAttest(haveRoots bool) (*grpc.ClientConn, error) {
	if haveRoots {
		return c.dial(tlsconfig.TLSClientConfig(c.creds, tlsconfig.AuthorizeID(c.serverID)))
	}
	if !c.insecureBootstrap {
		return nil, errors.New("no trust bundle to verify the SPIRE Server with: set trust_bundle_path, or insecure_bootstrap = true")
	}
	c.log.Warn("Insecure bootstrap: the SPIRE Server's certificate is not verified for this attestation")
	want := c.serverID.String()
	return c.dial(&tls.Config{
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
