// Package adminapi serves spire-agent's admin API on its own Unix socket:
// the Delegated Identity API, through which a node proxy (Cilium, Istio's
// ztunnel) gets the identities of the workloads it serves. Its callers are
// attested from their peer credentials like any workload; a caller is a
// delegate when an entry it matches has a SPIFFE ID of
// agent.authorized_delegates. Nothing of the Workload API is served here.
package adminapi

import (
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/attestor"
	"github.com/lanyard-dev/lanyard/attestor/selector"
	adminv1 "github.com/lanyard-dev/lanyard/proto/lanyard/admin/v1"
	"github.com/lanyard-dev/lanyard/workloadapi"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	debugv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/agent/debug/v1"
	delegatedv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/agent/delegatedidentity/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/reflection"
	"google.golang.org/grpc/status"
)

// Identities is what the admin API needs of the agent's cache;
// *agent.SVIDManager is the real one.
type Identities interface {
	// EntryIDs are the SPIFFE IDs of the entries sels match.
	EntryIDs(ctx context.Context, sels []selector.Selector) ([]spiffeid.ID, error)
	DelegatedX509Identities(ctx context.Context, sels []selector.Selector) (*agent.X509Snapshot, error)
	AllBundles(ctx context.Context) (*agent.BundleSnapshot, error)
	DelegatedJWTSVIDs(ctx context.Context, sels []selector.Selector, audience []string) ([]*agent.JWTSVID, error)
	Subscribe() *agent.Subscription
	// Health gives the cache sizes the Debug API reports.
	Health() agent.Health
}

// Config configures the admin API.
type Config struct {
	Log hclog.Logger
	// Attestor attests callers and the workloads named by PID; the
	// Workload API's.
	Attestor   workloadapi.Attestor
	Identities Identities
	// Delegates are agent.authorized_delegates.
	Delegates []spiffeid.ID
	// SendTimeout bounds one stream message; zero means
	// workloadapi.DefaultSendTimeout.
	SendTimeout time.Duration
	// Grace bounds the shutdown: streams end with Unavailable, calls in
	// flight get this long.
	Grace time.Duration
	// Self is the agent's own identity, for the Debug API; nil when the
	// upstream gives it none.
	Self agent.SelfIdentity
	// Started is when the agent started, for the Debug API's uptime.
	Started time.Time
	// TrustDomain and Status are what `lanyard status` reads beyond the
	// cache.
	TrustDomain spiffeid.TrustDomain
	Status      StatusInfo
}

// maxConns bounds the admin socket's connections. Only the agent's user
// and group reach it, and a delegate holds a few streams on one or two
// connections.
const maxConns = 64

// Endpoint is the admin API on its socket, as a service for the agent's
// supervisor.
type Endpoint struct {
	cfg      Config
	grpc     *grpc.Server
	listener net.Listener
	stopping chan struct{}
	stopOnce sync.Once
	debug    *debug
}

// New binds the admin socket at path (agent.ListenAdmin: a trusted
// directory, made 0750, a socket 0770) and builds its server; a socket
// that is busy fails here, before any service starts.
func New(cfg Config, path string) (*Endpoint, error) {
	if cfg.SendTimeout == 0 {
		cfg.SendTimeout = workloadapi.DefaultSendTimeout
	}
	if cfg.Started.IsZero() {
		cfg.Started = time.Now()
	}
	l, err := agent.ListenAdmin(path, maxConns, cfg.Log.Named("listener"))
	if err != nil {
		return nil, err
	}
	e := &Endpoint{cfg: cfg, listener: l, stopping: make(chan struct{})}
	e.grpc = grpc.NewServer(workloadapi.ServerOptions()...)
	delegatedv1.RegisterDelegatedIdentityServer(e.grpc, &delegated{e: e})
	e.debug = &debug{e: e, now: time.Now}
	debugv1.RegisterDebugServer(e.grpc, e.debug)
	adminv1.RegisterStatusServer(e.grpc, &statusService{e: e})
	// Operators explore the admin socket with grpcurl; only the agent's
	// user and group reach it.
	reflection.Register(e.grpc)
	return e, nil
}

// Name names the service in the log.
func (e *Endpoint) Name() string { return "admin-api" }

// Run serves until ctx ends, then shuts down within the grace.
func (e *Endpoint) Run(ctx context.Context) error {
	served := make(chan error, 1)
	go func() { served <- e.grpc.Serve(e.listener) }()
	e.cfg.Log.Info("Serving the admin API", "socket", e.listener.Addr().String(), "delegates", len(e.cfg.Delegates))
	select {
	case <-ctx.Done():
		e.shutdown()
		<-served
		return nil
	case err := <-served:
		e.shutdown()
		if err == nil {
			err = errors.New("it stopped unasked")
		}
		return fmt.Errorf("serving the admin API on %s: %w", e.listener.Addr(), err)
	}
}

// shutdown ends open streams with Unavailable and stops; after the grace
// it cuts what is left.
func (e *Endpoint) shutdown() {
	e.stopOnce.Do(func() { close(e.stopping) })
	workloadapi.StopWithin(e.grpc, e.cfg.Grace)
}

var errShuttingDown = status.Error(codes.Unavailable, "the agent is shutting down")

// send sends one stream message within the send timeout.
func (e *Endpoint) send(caller *attestor.Caller, send func() error) error {
	return workloadapi.SendWithin(e.cfg.Log, caller, e.cfg.SendTimeout, send)
}

// authorize attests the caller and checks that it is a delegate. It
// returns the caller's selectors, for checkDelegate on every later update,
// as spire-agent re-checks them.
func (e *Endpoint) authorize(ctx context.Context) ([]selector.Selector, *attestor.Caller, error) {
	sels, caller, err := workloadapi.AttestCaller(ctx, e.cfg.Attestor, e.cfg.Log)
	if err != nil {
		return nil, nil, err
	}
	if err := e.checkDelegate(ctx, caller, sels); err != nil {
		return nil, nil, err
	}
	return sels, caller, nil
}

// checkDelegate reports whether a caller with sels matches an entry whose
// SPIFFE ID is an authorized delegate.
func (e *Endpoint) checkDelegate(ctx context.Context, caller *attestor.Caller, sels []selector.Selector) error {
	ids, err := e.cfg.Identities.EntryIDs(ctx, sels)
	if err != nil {
		return statusOf(err)
	}
	if len(ids) == 0 {
		e.cfg.Log.Warn("Refusing an admin API caller with no identity", "pid", caller.PID, "uid", caller.UID)
		return status.Error(codes.PermissionDenied, "no identity issued: no registration entry matches the caller; register the delegate's workload and list its SPIFFE ID in authorized_delegates")
	}
	for _, id := range ids {
		if slices.Contains(e.cfg.Delegates, id) {
			return nil
		}
	}
	e.cfg.Log.Warn("Refusing an admin API caller that is not an authorized delegate", "pid", caller.PID, "uid", caller.UID, "spiffe_id", ids[0].String())
	return status.Errorf(codes.PermissionDenied, "caller not configured as an authorized delegate: its identities (%s first) are not in authorized_delegates", ids[0])
}

// statusOf is the status of a cache error: a cache not ready is
// Unavailable; anything else the Workload API's.
func statusOf(err error) error {
	if errors.Is(err, agent.ErrNotReady) {
		return status.Error(codes.Unavailable, agent.ErrNotReady.Error()+": retry shortly")
	}
	if errors.Is(err, context.Canceled) {
		return status.Error(codes.Canceled, "the call ended")
	}
	return status.Errorf(codes.Unavailable, "%v; retry, and if it persists see the agent's log", err)
}
