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
	"google.golang.org/grpc/peer"
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
	// onePerAgent holds one server connection at a time (gRPC's pick_first)
	// rather than one to every address a name resolves to (spire-agent's
	// round_robin, which makes every server pay for every agent: SPIRE
	// #4696), and shuffles the addresses at every resolution so that agents
	// spread over the servers. A connection that fails moves on to the next
	// address at once.
	onePerAgent = `{"loadBalancingConfig": [{"pick_first": {"shuffleAddressList": true}}]}`
)

// serverClient is the agent's connection to the SPIRE Server, authenticated
// with the agent SVID that agentIdentity holds. After the SVID is renewed
// the connection is retired (handed over): calls already on it finish, new
// ones go to a new connection that presents the new SVID, and the old one
// closes when its last call returns.
type serverClient struct {
	log               hclog.Logger
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
	// dialOptions are added to every dial: tests resolve the name with
	// their own resolver.
	dialOptions []grpc.DialOption

	mu   sync.Mutex
	addr string // host:port; a SIGHUP may change it
	conn *serverConn
	// peer is the address (ip:port) of the server that answered last;
	// "" after a deliberate move (a new SVID's connection, a new address).
	peer string
}

// serverConn is a gRPC connection and the calls on it.
type serverConn struct {
	cc      *grpc.ClientConn
	refs    int
	retired bool
}

// call runs fn on the mTLS connection with a timeout, and reports the
// server refusing the agent SVID. When the connection fails or no server
// answers, the next call gets a new one, which resolves the server name
// again and tries every address it gets without waiting out gRPC's
// reconnect backoff. A call that broke on a connection it did not dial
// (one that may have worked) is retried at once on a new one, so that
// losing a server costs no call; every call here is safe to repeat.
func (c *serverClient) call(ctx context.Context, fn func(context.Context, *grpc.ClientConn) error) error {
	fresh, err := c.callOnce(ctx, fn)
	if !fresh && unreachable(err) && ctx.Err() == nil {
		_, err = c.callOnce(ctx, fn)
	}
	return err
}

// callOnce runs fn once; fresh reports whether it dialed the connection
// it used, which then tried every address already.
func (c *serverClient) callOnce(ctx context.Context, fn func(context.Context, *grpc.ClientConn) error) (fresh bool, err error) {
	conn, fresh, err := c.acquire()
	if err != nil {
		return fresh, err
	}
	defer c.release(conn)
	rctx, cancel := context.WithTimeout(ctx, rpcTimeout)
	defer cancel()
	err = fn(rctx, conn.cc)
	if err == nil {
		return fresh, nil
	}
	// No answer within rpcTimeout: the server may be gone without a word
	// (a host powered off), which the connection cannot tell.
	silent := status.Code(err) == codes.DeadlineExceeded && ctx.Err() == nil
	if unreachable(err) || silent {
		c.retireConn(conn)
		return fresh, err
	}
	c.mu.Lock()
	stale := conn.retired
	c.mu.Unlock()
	// A call on the previous SVID's connection: the next one uses the new SVID.
	if !stale {
		c.refused(err)
	}
	return fresh, err
}

// unreachable reports whether no server answered the call: the connection
// broke, or none of the addresses took it.
func unreachable(err error) bool {
	return status.Code(err) == codes.Unavailable
}

// acquire returns the current mTLS connection, creating it if needed;
// fresh reports whether it did.
func (c *serverClient) acquire() (conn *serverConn, fresh bool, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.conn == nil {
		cfg := tlsconfig.MTLSClientConfig(c.creds, c.creds, tlsconfig.AuthorizeID(c.serverID))
		cc, err := c.dial(c.addr, cfg)
		if err != nil {
			return nil, false, err
		}
		c.conn = &serverConn{cc: cc}
		fresh = true
	}
	c.conn.refs++
	return c.conn, fresh, nil
}

func (c *serverClient) release(conn *serverConn) {
	c.mu.Lock()
	defer c.mu.Unlock()
	conn.refs--
	if conn.retired && conn.refs == 0 {
		conn.cc.Close()
	}
}

// retire makes the next call open a new connection, deliberately (a new
// agent SVID): the server it reaches may differ without a failure.
func (c *serverClient) retire() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.peer = ""
	if c.conn != nil {
		c.retireLocked(c.conn)
	}
}

// retireConn retires conn unless another call did already.
func (c *serverClient) retireConn(conn *serverConn) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.conn == conn {
		c.retireLocked(conn)
	}
}

func (c *serverClient) retireLocked(conn *serverConn) {
	c.conn = nil
	conn.retired = true
	if conn.refs == 0 {
		conn.cc.Close()
	}
}

// address is the server's host:port.
func (c *serverClient) address() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.addr
}

// serverInUse is the address of the server that answered last, or the
// configured one before any did.
func (c *serverClient) serverInUse() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.peer != "" {
		return c.peer
	}
	return c.addr
}

// notePeer records which server answered a call (the name may resolve to
// several).
func (c *serverClient) notePeer(p *peer.Peer) {
	if p.Addr == nil {
		return
	}
	addr := p.Addr.String()
	c.mu.Lock()
	// Another server answering, without a deliberate move, means the one in
	// use failed: a call here found no server, or gRPC's pick_first moved
	// the connection itself.
	failedOver := c.peer != "" && c.peer != addr
	c.peer = addr
	c.mu.Unlock()
	if failedOver {
		c.metrics.FailedOver()
	}
}

// setAddress points new connections at addr (after a SIGHUP); calls in
// flight finish on the old one. It reports whether addr is new.
func (c *serverClient) setAddress(addr string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if addr == c.addr {
		return false
	}
	c.addr, c.peer = addr, ""
	if c.conn != nil {
		c.retireLocked(c.conn)
	}
	return true
}

func (c *serverClient) dial(addr string, cfg *tls.Config) (*grpc.ClientConn, error) {
	opts := append([]grpc.DialOption{
		grpc.WithTransportCredentials(grpccreds.NewTLS(cfg)),
		grpc.WithDefaultServiceConfig(onePerAgent),
		// As spire-agent: no service config from DNS (_grpc_config TXT
		// records), which could undo onePerAgent; the default applies.
		grpc.WithDisableServiceConfig(),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxRecvMsgSize)),
		c.metrics.UpstreamDialOption(),
		grpc.WithChainUnaryInterceptor(func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoke grpc.UnaryInvoker, opts ...grpc.CallOption) error {
			var p peer.Peer
			err := invoke(ctx, method, req, reply, cc, append(opts, grpc.Peer(&p))...)
			c.notePeer(&p)
			return err
		}),
	}, c.dialOptions...)
	cc, err := grpc.NewClient(addr, opts...)
	if err != nil {
		return nil, fmt.Errorf("connecting to the SPIRE Server at %s: %w", addr, err)
	}
	return cc, nil
}

// dialAttest opens a connection for node attestation: the server is
// verified against the authorities the agent has, or, with
// insecure_bootstrap and none yet, only asked to present the server's
// SPIFFE ID.
func (c *serverClient) dialAttest(haveRoots bool) (*grpc.ClientConn, error) {
	addr := c.address()
	if haveRoots {
		return c.dial(addr, tlsconfig.TLSClientConfig(c.creds, tlsconfig.AuthorizeID(c.serverID)))
	}
	if !c.insecureBootstrap {
		return nil, errors.New("no trust bundle to verify the SPIRE Server with: set trust_bundle_path, or insecure_bootstrap = true")
	}
	c.log.Warn("Insecure bootstrap: the SPIRE Server's certificate is not verified for this attestation")
	want := c.serverID.String()
	return c.dial(addr, &tls.Config{
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
