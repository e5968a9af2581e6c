package docker

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync"
	"syscall"
	"time"

	cerrdefs "github.com/containerd/errdefs"
	"github.com/hashicorp/go-hclog"
	"github.com/moby/moby/api/types/container"
	"github.com/moby/moby/client"
	"go.opentelemetry.io/otel/trace/noop"
)

const (
	// maxResponseSize bounds one answer of the engine. An inspected
	// container is 3-5 KiB; its labels and environment are set by whoever
	// created it, and a process environment is at most a few MiB (the
	// kernel's ARG_MAX is a quarter of the stack limit, 2 MiB by default).
	maxResponseSize = 8 << 20
	// engineTimeout bounds a call when the attestation's deadline is
	// longer (workload_attestor_timeout): an engine that accepts the
	// connection and never answers.
	engineTimeout = 30 * time.Second
)

// errResponseTooLarge: the engine's answer exceeded maxResponseSize.
var errResponseTooLarge = fmt.Errorf("the container engine's answer is larger than %d bytes", maxResponseSize)

// engine is the Docker Engine API of dockerd, or Podman's Docker-compatible
// service, over its unix socket.
type engine struct {
	api      *client.Client
	endpoint string
	log      hclog.Logger

	mu    sync.Mutex
	cause string // why the last call failed for every container; "" when it answered
}

// newEngine builds the client; it connects nothing.
func newEngine(s settings, log hclog.Logger) (*engine, error) {
	opts := []client.Opt{
		// One connection a request, so that the bound on what a
		// connection reads is a bound on one answer. A unix socket's
		// connect costs far less than an inspect.
		client.WithHTTPClient(&http.Client{Transport: &http.Transport{DisableKeepAlives: true}}),
		client.WithHost(s.endpoint()),
		// Plain HTTP over the socket: a cloned http.Transport carries a
		// TLS config, from which the client would otherwise infer https.
		client.WithScheme("http"),
		client.WithDialContext(dialLimited(s.socketPath)),
		client.WithTimeout(engineTimeout),
		client.WithTraceProvider(noop.NewTracerProvider()),
	}
	if s.apiVersion != "" {
		opts = append(opts, client.WithAPIVersion(s.apiVersion))
	}
	api, err := client.New(opts...)
	if err != nil {
		return nil, fmt.Errorf("docker client for %s: %w", s.endpoint(), err)
	}
	return &engine{api: api, endpoint: s.endpoint(), log: log}, nil
}

// dialLimited connects to the socket; the connection reads at most
// maxResponseSize bytes (headers included).
func dialLimited(path string) func(ctx context.Context, _, _ string) (net.Conn, error) {
	var d net.Dialer
	return func(ctx context.Context, _, _ string) (net.Conn, error) {
		c, err := d.DialContext(ctx, "unix", path)
		if err != nil {
			return nil, err
		}
		return &limitedConn{Conn: c, left: maxResponseSize}, nil
	}
}

type limitedConn struct {
	net.Conn
	left int64
}

func (c *limitedConn) Read(p []byte) (int, error) {
	if c.left <= 0 {
		return 0, errResponseTooLarge
	}
	if int64(len(p)) > c.left {
		p = p[:c.left]
	}
	n, err := c.Conn.Read(p)
	c.left -= int64(n)
	return n, err
}

// inspect returns the container, or found false when the engine has no
// container by that ID (it may be another runtime's).
func (e *engine) inspect(ctx context.Context, id string) (c container.InspectResponse, found bool, err error) {
	res, err := e.api.ContainerInspect(ctx, id, client.ContainerInspectOptions{})
	switch {
	case err == nil:
		e.answered()
		return res.Container, true, nil
	case cerrdefs.IsNotFound(err):
		e.answered()
		return container.InspectResponse{}, false, nil
	case ctx.Err() != nil:
		// The attestation's deadline: the MultiAttestor reports it.
		return container.InspectResponse{}, false, fmt.Errorf("inspecting container %s at %s: %w", id, e.endpoint, ctx.Err())
	}
	err = e.explain(id, err)
	return container.InspectResponse{}, false, err
}

// explain turns a failed call into an error that says what to fix, and
// logs it once each time the cause changes rather than for every fetch.
func (e *engine) explain(id string, err error) error {
	var cause, fix string
	switch {
	case errors.Is(err, errResponseTooLarge):
		// About one container, not the engine: not logged as its state.
		return fmt.Errorf("inspecting container %s at %s: %w", id, e.endpoint, errResponseTooLarge)
	case errors.Is(err, syscall.ENOENT), errors.Is(err, syscall.ECONNREFUSED):
		cause, fix = "unreachable", "is the engine running (dockerd, or podman system service for Podman), and is docker_socket_path its socket?"
	case errors.Is(err, syscall.EACCES), errors.Is(err, syscall.EPERM):
		cause, fix = "permission denied", "the agent needs read and write access to the engine's socket (run it as root)"
	case client.IsErrConnectionFailed(err):
		cause, fix = "connection failed", "is docker_socket_path the engine's socket?"
	case cerrdefs.IsInvalidArgument(err):
		cause, fix = "API version", "set docker_version to a version the engine serves (docker version shows it), or leave it out to negotiate"
	default:
		cause, fix = "failed", "see the engine's log"
	}
	e.mu.Lock()
	changed := e.cause != cause
	e.cause = cause
	e.mu.Unlock()
	if changed {
		e.log.Error("The container engine cannot be used; workloads in containers get no docker selectors until it answers", "endpoint", e.endpoint, "cause", cause, "error", err, "fix", fix)
	}
	return fmt.Errorf("the container engine at %s: %s: %w; %s", e.endpoint, cause, err, fix)
}

func (e *engine) answered() {
	e.mu.Lock()
	was := e.cause
	e.cause = ""
	e.mu.Unlock()
	if was != "" {
		e.log.Info("The container engine answers again", "endpoint", e.endpoint)
	}
}
