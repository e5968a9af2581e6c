// Package brokerapi serves the SPIFFE Broker Endpoint (SPIFFE_Broker_API.md,
// SPIFFE_Broker_Endpoint.md), as spire-agent's experimental.broker does: a
// broker (a node proxy, a CNI) authenticated by its X509-SVID over mutual
// TLS, and allowed by its SPIFFE ID, gets the SVIDs and bundles of the
// workloads it names by reference (a PID on this node, or a Kubernetes
// pod). The workload is attested by the agent, never described by the
// broker.
package brokerapi

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/attestor/selector"
	"github.com/lanyard-dev/lanyard/conf"
	"github.com/lanyard-dev/lanyard/workloadapi"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/exp/proto/spiffe/broker"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"golang.org/x/net/netutil"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/reflection"
	"google.golang.org/grpc/status"
)

// Identities is what the Broker API needs of the agent's cache;
// *agent.SVIDManager is the real one.
type Identities interface {
	BrokerX509Identities(ctx context.Context, sels []selector.Selector) (*agent.X509Snapshot, error)
	JWTSVIDs(ctx context.Context, sels []selector.Selector, audience []string, id spiffeid.ID) ([]*agent.JWTSVID, error)
	AllBundles(ctx context.Context) (*agent.BundleSnapshot, error)
	// AwaitIdentity holds a new request whose workload matched no entry
	// while the upstream syncs, as the Workload API does for a workload.
	AwaitIdentity(ctx context.Context, sels []selector.Selector, id spiffeid.ID) bool
	Subscribe() *agent.Subscription
}

// Config configures the Broker Endpoint.
type Config struct {
	Log hclog.Logger
	// Attestor attests the processes named by a WorkloadPIDReference; the
	// Workload API's.
	Attestor   workloadapi.Attestor
	Identities Identities
	// PodAttestor resolves a KubernetesObjectReference to a pod; nil
	// refuses that reference type as one this agent does not understand.
	PodAttestor PodAttestor
	// SVIDSource is the agent's own X509-SVID, which the endpoint presents.
	SVIDSource x509svid.Source
	// BundleSource verifies the brokers' SVIDs; nil means every bundle of
	// Identities, the local one and the federated ones.
	BundleSource x509bundle.Source
	// Broker is agent.experimental.broker: where to listen and whom to
	// serve.
	Broker conf.Broker
	// SendTimeout bounds one stream message; zero means
	// workloadapi.DefaultSendTimeout.
	SendTimeout time.Duration
	// Grace bounds the shutdown: streams end with Unavailable, calls in
	// flight get this long.
	Grace time.Duration
}

// Connection caps. On the Unix socket only the agent's user and group
// connect (fairly shared, as on the admin socket); on TCP a connection
// that is not a broker is closed by the handshake within its timeout, so
// the cap bounds what strangers can hold open at once.
const (
	maxUnixConns = 64
	maxTCPConns  = 256
)

// maxStreamsPerConn replaces the Workload API's 100: a broker holds a
// stream or three per workload it serves (a node runs up to 110 pods by
// Kubernetes' default, 250 at most), on one connection, and a client past
// the cap waits for a stream to end, which these never do. Only a listed
// broker gets past the handshake to open any.
const maxStreamsPerConn = 2048

const (
	headerKey = "broker.spiffe.io"
	// reflectionPrefix covers grpc.reflection.v1 and v1alpha.
	reflectionPrefix = "/grpc.reflection."
)

// Endpoint is the Broker Endpoint on its listeners, as a service for the
// agent's supervisor.
type Endpoint struct {
	cfg       Config
	policy    map[spiffeid.ID]policy
	grpc      *grpc.Server
	listeners []net.Listener
	stopping  chan struct{}
	stopOnce  sync.Once
	// pidCheck and podCheck space the checks that a stream's workload
	// still runs (tests shorten them).
	pidCheck, podCheck time.Duration
}

// New checks cfg, binds the Unix socket (agent.ListenBroker: a trusted
// directory made 0750, a socket 0770) and the TCP address, and builds the
// server; a socket or port that is busy fails here, before any service
// starts.
func New(cfg Config) (*Endpoint, error) {
	switch {
	case cfg.Broker.SocketPath == "" && cfg.Broker.BindAddress == "":
		return nil, errors.New("the broker endpoint needs a socket path, a bind address, or both")
	case len(cfg.Broker.Brokers) == 0:
		return nil, errors.New("the broker endpoint needs at least one authorized broker")
	case cfg.Attestor == nil || cfg.Identities == nil || cfg.SVIDSource == nil:
		return nil, errors.New("the broker endpoint needs an attestor, the identities and an SVID source (this is a bug in the caller)")
	}
	if cfg.BundleSource == nil {
		cfg.BundleSource = cacheBundles{cfg.Identities}
	}
	if cfg.SendTimeout == 0 {
		cfg.SendTimeout = workloadapi.DefaultSendTimeout
	}
	e := &Endpoint{cfg: cfg, policy: policies(cfg.Broker.Brokers), stopping: make(chan struct{}),
		pidCheck: pidCheckInterval, podCheck: podCheckInterval}
	if err := e.listen(); err != nil {
		return nil, err
	}
	ids := make([]spiffeid.ID, len(cfg.Broker.Brokers))
	for i, b := range cfg.Broker.Brokers {
		ids[i] = b.ID
	}
	tlsConfig := tlsconfig.MTLSServerConfig(cfg.SVIDSource, cfg.BundleSource, tlsconfig.AuthorizeOneOf(ids...))
	// A resumed session skips the authorizer; every connection is checked.
	tlsConfig.SessionTicketsDisabled = true
	e.grpc = grpc.NewServer(append(workloadapi.ServerLimits(),
		grpc.Creds(brokerCreds{credentials.NewTLS(tlsConfig)}),
		grpc.MaxConcurrentStreams(maxStreamsPerConn), // after ServerLimits: it wins
		grpc.ChainUnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, next grpc.UnaryHandler) (any, error) {
			if err := checkCall(ctx, info.FullMethod); err != nil {
				return nil, err
			}
			return next(ctx, req)
		}),
		grpc.ChainStreamInterceptor(func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, next grpc.StreamHandler) error {
			if err := checkCall(ss.Context(), info.FullMethod); err != nil {
				return err
			}
			return next(srv, ss)
		}),
	)...)
	broker.RegisterAPIServer(e.grpc, &service{e: e})
	reflection.Register(e.grpc)
	return e, nil
}

// listen binds every configured listener, or none.
func (e *Endpoint) listen() error {
	b := e.cfg.Broker
	if b.SocketPath != "" {
		l, err := agent.ListenBroker(b.SocketPath, maxUnixConns, e.cfg.Log.Named("listener"))
		if err != nil {
			return err
		}
		e.listeners = append(e.listeners, l)
	}
	if b.BindAddress != "" {
		l, err := net.Listen("tcp", b.BindAddress)
		if err != nil {
			for _, l := range e.listeners {
				l.Close()
			}
			return fmt.Errorf("listening for brokers on %s (experimental.broker.bind_address): %w", b.BindAddress, err)
		}
		e.listeners = append(e.listeners, netutil.LimitListener(l, maxTCPConns))
	}
	return nil
}

// Addrs are the addresses the endpoint listens on: the Unix socket first.
func (e *Endpoint) Addrs() []net.Addr {
	addrs := make([]net.Addr, len(e.listeners))
	for i, l := range e.listeners {
		addrs[i] = l.Addr()
	}
	return addrs
}

// Name names the service in the log.
func (e *Endpoint) Name() string { return "broker-api" }

// Run serves until ctx ends, then shuts down within the grace.
func (e *Endpoint) Run(ctx context.Context) error {
	served := make(chan error, len(e.listeners))
	for _, l := range e.listeners {
		go func() { served <- e.grpc.Serve(l) }()
		e.cfg.Log.Info("Serving the SPIFFE Broker API", "network", l.Addr().Network(), "address", l.Addr().String(), "brokers", len(e.cfg.Broker.Brokers))
	}
	var err error
	select {
	case <-ctx.Done():
	case err = <-served:
		if err == nil {
			err = errors.New("it stopped unasked")
		}
		err = fmt.Errorf("serving the SPIFFE Broker API: %w", err)
	}
	e.shutdown()
	for range len(e.listeners) - btoi(err != nil) {
		<-served
	}
	return err
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// shutdown ends open streams with Unavailable and stops; after the grace
// it cuts what is left.
func (e *Endpoint) shutdown() {
	e.stopOnce.Do(func() { close(e.stopping) })
	workloadapi.StopWithin(e.grpc, e.cfg.Grace)
}

var errShuttingDown = status.Error(codes.Unavailable, "the agent is shutting down")

// checkCall applies the endpoint's rules to every method, reflection
// included, as spire-agent does: reflection only on the Unix socket (it
// lists what a TCP listener offers to whoever got a broker's key), and the
// security header (InvalidArgument without it, as the spec asks).
func checkCall(ctx context.Context, method string) error {
	if strings.HasPrefix(method, reflectionPrefix) && !overUnixSocket(ctx) {
		return status.Error(codes.PermissionDenied, "server reflection is only available over the Unix socket")
	}
	// ValueFromIncomingContext copies only this key.
	if v := metadata.ValueFromIncomingContext(ctx, headerKey); len(v) != 1 || v[0] != "true" {
		return status.Error(codes.InvalidArgument, "security header missing from request: send exactly one \""+headerKey+": true\"")
	}
	return nil
}
