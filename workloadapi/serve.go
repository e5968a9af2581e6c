package workloadapi

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/attestor"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/reflection"
	"google.golang.org/grpc/status"
)

// Server is the gRPC server with the Workload API, health and reflection.
type Server struct {
	GRPC    *grpc.Server
	Health  *health.Server
	handler *handler
}

// errShuttingDown ends open streams on shutdown; clients retry elsewhere or
// reconnect to the next agent.
var errShuttingDown = status.Error(codes.Unavailable, "the agent is shutting down")

// Shutdown ends open streams with Unavailable, lets calls in flight finish,
// and stops; after grace it cuts whatever is left and returns.
func (s *Server) Shutdown(grace time.Duration) {
	s.Health.Shutdown()
	s.handler.stopOnce.Do(func() { close(s.handler.stopping) })
	StopWithin(s.GRPC, grace)
}

// StopWithin stops s, letting calls in flight finish; after grace it cuts
// whatever is left and returns.
func StopWithin(s *grpc.Server, grace time.Duration) {
	done := make(chan struct{})
	go func() {
		s.GracefulStop()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(grace):
		// Stop closes every connection and ends the calls' contexts, but
		// GracefulStop would still wait for each handler to return: one
		// stuck on the upstream would hold the agent's stop, and its last
		// save, past the grace. Those end when the agent's signings do.
		s.Stop()
	}
}

// NewServer builds the gRPC server. Health reports NOT_SERVING until the
// agent sets it.
func NewServer(cfg Config) *Server {
	if cfg.SendTimeout == 0 {
		cfg.SendTimeout = DefaultSendTimeout
	}
	s := grpc.NewServer(append(ServerOptions(),
		grpc.ChainUnaryInterceptor(unaryHeaderCheck),
		grpc.ChainStreamInterceptor(streamHeaderCheck),
		grpc.ForceServerCodecV2(newSharedCodec()),
	)...)
	wh := &handler{cfg: cfg, stopping: make(chan struct{})}
	workload.RegisterSpiffeWorkloadAPIServer(s, wh)
	registerSDS(s, wh, cfg.SDS)
	h := health.NewServer()
	h.SetServingStatus("", healthpb.HealthCheckResponse_NOT_SERVING)
	healthpb.RegisterHealthServer(s, h)
	reflection.Register(s)
	return &Server{GRPC: s, Health: h, handler: wh}
}

// ServerOptions are the peer-credential transport and the limits of
// server.go, for every server on a socket that any local user may reach:
// the Workload API's, and the admin API's.
func ServerOptions() []grpc.ServerOption {
	return append([]grpc.ServerOption{grpc.Creds(attestor.Credentials())}, ServerLimits()...)
}

// ServerLimits are the limits of server.go without the transport, for a
// server with credentials of its own (the broker endpoint's mutual TLS).
func ServerLimits() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.MaxRecvMsgSize(maxRecvMsgSize),
		grpc.ConnectionTimeout(handshakeTimeout),
		grpc.KeepaliveParams(keepalive.ServerParameters{MaxConnectionIdle: maxConnectionIdle}),
		grpc.MaxConcurrentStreams(maxStreamsPerConn),
		grpc.MaxHeaderListSize(maxHeaderListSize),
		grpc.InitialWindowSize(windowSize),
		grpc.InitialConnWindowSize(windowSize),
		grpc.ReadBufferSize(readBufferSize),
		grpc.WriteBufferSize(writeBufferSize),
		grpc.NumStreamWorkers(streamWorkers),
	}
}

const (
	serviceName = "/SpiffeWorkloadAPI/"
	headerKey   = "workload.spiffe.io"
)

// checkHeader enforces the Workload API's security header on its methods.
// Health and reflection are exempt: probes cannot add headers.
func checkHeader(ctx context.Context, method string) error {
	if !strings.HasPrefix(method, serviceName) {
		return nil
	}
	// ValueFromIncomingContext copies only this key; FromIncomingContext
	// would copy every header of every call.
	if v := metadata.ValueFromIncomingContext(ctx, headerKey); len(v) != 1 || v[0] != "true" {
		return status.Error(codes.InvalidArgument, "security header missing from request: send exactly one \"workload.spiffe.io: true\"")
	}
	return nil
}

func unaryHeaderCheck(ctx context.Context, req any, info *grpc.UnaryServerInfo, next grpc.UnaryHandler) (any, error) {
	if err := checkHeader(ctx, info.FullMethod); err != nil {
		return nil, err
	}
	return next(ctx, req)
}

func streamHeaderCheck(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, next grpc.StreamHandler) error {
	if err := checkHeader(ss.Context(), info.FullMethod); err != nil {
		return err
	}
	return next(srv, ss)
}

// Endpoint is the server serving one listener, as a service for the
// agent's supervisor. Stopping it stops accepting, ends open streams with
// Unavailable and lets calls in flight finish, within the grace.
type Endpoint struct {
	srv      *Server
	listener net.Listener
	ready    <-chan struct{}
	grace    time.Duration
	log      hclog.Logger
}

// Endpoint serves s on l. Health reports SERVING once ready is closed (the
// cache has entries and bundles); stopping takes at most grace.
func (s *Server) Endpoint(l net.Listener, ready <-chan struct{}, grace time.Duration) *Endpoint {
	return &Endpoint{srv: s, listener: l, ready: ready, grace: grace, log: s.handler.cfg.Log}
}

// Name names the service in the log.
func (e *Endpoint) Name() string { return "workload-api" }

// Run serves until ctx ends, then shuts down. A server that stops by itself
// (its listener failed) is shut down too, and its error returned.
func (e *Endpoint) Run(ctx context.Context) error {
	served := make(chan error, 1)
	go func() { served <- e.srv.GRPC.Serve(e.listener) }()
	ready := e.ready
	for {
		select {
		case <-ready:
			e.srv.Health.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
			e.log.Info("Agent is ready: entries and bundles are loaded")
			ready = nil
		case <-ctx.Done():
			e.srv.Shutdown(e.grace)
			<-served
			return nil
		case err := <-served:
			e.srv.Shutdown(e.grace)
			if err == nil {
				err = errors.New("it stopped unasked")
			}
			return fmt.Errorf("serving on %s: %w", e.listener.Addr(), err)
		}
	}
}
