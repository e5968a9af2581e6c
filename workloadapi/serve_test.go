package workloadapi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/lanyard-dev/lanyard/internal/testkit/fakeagent"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
)

// endpointOn runs the env's server as a supervised service on a second
// socket, and returns a copy of the env that dials it.
func endpointOn(t *testing.T, e *testEnv, ready <-chan struct{}) (*testEnv, context.CancelFunc, <-chan error) {
	t.Helper()
	other := *e
	other.socket = filepath.Join(filepath.Dir(e.socket), "endpoint.sock")
	l, err := agent.Listen(other.socket, 256, hclog.NewNullLogger())
	if err != nil {
		t.Fatal(err)
	}
	ep := e.srv.Endpoint(l, ready, waitLimit)
	if ep.Name() != "workload-api" {
		t.Errorf("the endpoint is named %q", ep.Name())
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- ep.Run(ctx) }()
	t.Cleanup(cancel)
	return &other, cancel, done
}

func healthOf(t *testing.T, socket string) healthpb.HealthCheckResponse_ServingStatus {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	resp, err := healthpb.NewHealthClient(conn).Check(t.Context(), &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	return resp.GetStatus()
}

// Stopping the service is Shutdown: open streams end with Unavailable at
// once, without waiting for the grace, and the socket stops accepting.
func TestEndpointServesUntilStoppedThenEndsStreams(t *testing.T) {
	e := newTestEnv(t, envOptions{entries: []*agent.Entry{newEntry("/a", 1, mySelector())}})
	ready := make(chan struct{})
	ep, stop, done := endpointOn(t, e, ready)

	if got := healthOf(t, ep.socket); got != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Fatalf("health before the cache is ready: %s", got)
	}
	close(ready)
	testkit.WaitFor(t, waitLimit, "health SERVING once the cache is ready", func() bool { return healthOf(t, ep.socket) == healthpb.HealthCheckResponse_SERVING })

	svids := openX509Stream(t, ep.client(t))
	nextMsg(t, svids, "X509-SVIDs through the endpoint")
	start := time.Now()
	stop()
	err := streamEnd(t, svids, codes.Unavailable, "X509-SVIDs when the endpoint stops")
	if !strings.Contains(status.Convert(err).Message(), "shutting down") {
		t.Errorf("the stream ended with %v, not the shutdown's status", err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Run after its context ended = %v, want nil", err)
		}
	case <-time.After(waitLimit):
		t.Fatal("Run did not return")
	}
	if d := time.Since(start); d > waitLimit/2 {
		t.Fatalf("stopping took %s", d)
	}
}

// A listener that fails is the service failing: the supervisor stops the
// agent rather than leaving it up with no Workload API.
func TestEndpointFailsWhenItsListenerDoes(t *testing.T) {
	e := newTestEnv(t, envOptions{})
	other := filepath.Join(filepath.Dir(e.socket), "closed.sock")
	l, err := agent.Listen(other, 256, hclog.NewNullLogger())
	if err != nil {
		t.Fatal(err)
	}
	l.Close()
	done := make(chan error, 1)
	go func() { done <- e.srv.Endpoint(l, nil, time.Second).Run(t.Context()) }()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "serving on") {
			t.Fatalf("Run on a closed listener = %v, want the serving error", err)
		}
	case <-time.After(waitLimit):
		t.Fatal("Run did not return when its listener failed")
	}
}

// Each class of cache error gets a message that says what went wrong and
// what to do, and only a missing identity is not retried.
func TestStatusOfSaysWhatWentWrong(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
		code codes.Code
		says []string
	}{
		{"no identity", agent.ErrNoIdentity, codes.PermissionDenied, []string{"no identity issued", "register one"}},
		{"not ready", fmt.Errorf("waiting: %w", agent.ErrNotReady), codes.Unavailable, []string{agent.ErrNotReady.Error(), "retry shortly"}},
		{"caller gone", context.Canceled, codes.Unavailable, []string{"the caller went away", "retry"}},
		{"signing timed out", fmt.Errorf("signing: %w", context.DeadlineExceeded), codes.Unavailable, []string{"did not sign in time", "agent's log"}},
		{"server timed out", fmt.Errorf("signing X509-SVIDs with the SPIRE Server: %w", status.Error(codes.DeadlineExceeded, "slow")), codes.Unavailable, []string{"did not sign in time", "slow"}},
		{"server unreachable", fmt.Errorf("signing X509-SVIDs with the SPIRE Server: %w", status.Error(codes.Unavailable, "connection refused")), codes.Unavailable, []string{"cannot be reached", "connection refused", "keeps trying"}},
		{"server refused", fmt.Errorf("signing a JWT-SVID with the SPIRE Server: %w", status.Error(codes.PermissionDenied, "not authorized")), codes.Unavailable, []string{"refused to sign", "not authorized", "registration entry"}},
		{"other", errors.New("the upstream returned an empty chain for spiffe://example.org/a"), codes.Unavailable, []string{"could not sign an SVID", "empty chain", "agent's log"}},
	} {
		st := status.Convert(statusOf(tc.err))
		if st.Code() != tc.code {
			t.Errorf("%s: code %s, want %s", tc.name, st.Code(), tc.code)
		}
		for _, want := range tc.says {
			if !strings.Contains(st.Message(), want) {
				t.Errorf("%s: message %q does not say %q", tc.name, st.Message(), want)
			}
		}
	}
}

// signingsInFlight counts the X509-SVID signings the upstream is in.
type signingsInFlight struct {
	*fakeagent.Upstream
	n atomic.Int32
}

func (u *signingsInFlight) MintX509SVIDs(ctx context.Context, reqs []agent.X509Request) ([]agent.X509Result, error) {
	u.n.Add(1)
	defer u.n.Add(-1)
	return u.Upstream.MintX509SVIDs(ctx, reqs)
}

// TestStopWhileTheUpstreamHangs: the agent told to stop while a stream's
// fetch waits on an upstream that hangs stops within the grace, not once
// the signing times out (30 s, past Kubernetes' grace period), the signing
// ends with it, and the cache is still saved on the way out.
func TestStopWhileTheUpstreamHangs(t *testing.T) {
	a, b := newEntry("/a", 1, mySelector()), newEntry("/b", 2, mySelector())
	dir := t.TempDir()
	var up *signingsInFlight
	e := newTestEnv(t, envOptions{entries: []*agent.Entry{a}, persistDir: dir, upstream: func(u *fakeagent.Upstream) agent.Upstream {
		up = &signingsInFlight{Upstream: u}
		return up
	}})
	svids := openX509Stream(t, e.client(t))
	nextMsg(t, svids, "the SVID of /a")

	// A new entry of the caller: the stream's fetch signs its SVID, and
	// the upstream hangs until the call's context ends.
	e.up.SetGate(make(chan struct{}))
	e.cache.SetEntries([]*agent.Entry{a, b})
	testkit.WaitFor(t, waitLimit, "the signing of /b in flight", func() bool { return up.n.Load() == 1 })

	stopped := make(chan struct{})
	go func() {
		e.stop()
		close(stopped)
	}()
	select {
	case <-stopped:
	case <-time.After(waitLimit):
		t.Fatal("the agent did not stop while its upstream hung")
	}
	testkit.WaitFor(t, waitLimit, "the hung signing to end with the agent", func() bool { return up.n.Load() == 0 })

	data, err := os.ReadFile(filepath.Join(dir, "cache.json"))
	if err != nil {
		t.Fatalf("the cache was not saved: %v", err)
	}
	var saved struct {
		Entries []struct{ ID string }
		SVIDs   []struct {
			EntryID string `json:"entry_id"`
		} `json:"x509_svids"`
	}
	if err := json.Unmarshal(data, &saved); err != nil {
		t.Fatal(err)
	}
	if len(saved.Entries) != 2 || len(saved.SVIDs) != 1 || saved.SVIDs[0].EntryID != a.ID {
		t.Fatalf("saved %+v, want both entries and the SVID of %s", saved, a.ID)
	}
}
