package telemetry

import (
	"context"
	"errors"
	"net"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/lanyard-dev/lanyard/telemetry/metrictest"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// Every metric is defined once, with a name Prometheus accepts, and the
// labels that make series unbounded never appear.
func TestDefsAreUniqueAndBounded(t *testing.T) {
	valid := regexp.MustCompile(`^lanyard_[a-z0-9_]+$`)
	seen := map[string]bool{}
	for _, d := range Defs() {
		if !valid.MatchString(d.Name) || seen[d.Name] {
			t.Errorf("%q: duplicate or not a lanyard_ name", d.Name)
		}
		seen[d.Name] = true
		if d.Help == "" {
			t.Errorf("%s has no help", d.Name)
		}
		for _, l := range d.Labels {
			switch l {
			case "spiffe_id", "pid", "uid", "entry_id", "selector":
				t.Errorf("%s is labelled by %s, which is unbounded", d.Name, l)
			}
		}
		if d.Kind == Counter && !strings.HasSuffix(d.Name, "_total") {
			t.Errorf("counter %s does not end in _total", d.Name)
		}
	}
}

// What New registers is in Defs, named and labelled as defined there, and
// passes promlint.
func TestRegisteredMetricsAreDefined(t *testing.T) {
	m := New()
	m.CacheSaved(time.Now(), nil)
	m.LocalCAActive(time.Now().Add(time.Hour), false)
	byName := map[string]Def{}
	for _, d := range Defs() {
		byName[d.Name] = d
	}
	problems, err := testutil.GatherAndLint(m.Registry())
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("promlint: %s: %s", p.Metric, p.Text)
	}
	// Series appear as they are used; use them all, then compare.
	m.Attestor("unix").Answered(time.Millisecond)
	m.Attestor("unix").Failed(AttestorError)
	m.Attestation(time.Millisecond)
	m.SVIDRenewed("example.org", nil)
	m.SVIDRenewed("example.org", errors.New("down"))
	m.CacheSaved(time.Now(), errors.New("full"))
	m.FailedOver()
	for name, mf := range metrictest.Gather(t, m.Registry()) {
		d, ok := byName[name]
		if !ok {
			t.Errorf("%s is registered but not in Defs", name)
			continue
		}
		if got := strings.ToLower(mf.GetType().String()); got != string(d.Kind) {
			t.Errorf("%s is a %s, Defs says %s", name, got, d.Kind)
		}
		for _, s := range mf.GetMetric() {
			if len(s.GetLabel()) != len(d.Labels) {
				t.Errorf("%s has labels %v, Defs says %v", name, s.GetLabel(), d.Labels)
			}
		}
	}
}

func TestUIDClass(t *testing.T) {
	for uid, want := range map[uint32]string{0: UIDRoot, 1: UIDSystem, 999: UIDSystem, 1000: UIDUser, 65534: UIDUser} {
		if got := UIDClass(uid); got != want {
			t.Errorf("UIDClass(%d) = %s, want %s", uid, got, want)
		}
	}
}

// A nil *Metrics records nothing and does not fail, so that components
// built without a telemetry block (and tests) need no checks.
func TestNilMetricsRecordNothing(t *testing.T) {
	var m *Metrics
	m.Register()
	m.Attestation(time.Second)
	m.Attestor("unix").Answered(time.Second)
	m.Attestor("unix").Failed(AttestorTimeout)
	m.SVIDRenewed("example.org", nil)
	m.CacheSaved(time.Now(), nil)
	m.LocalCAActive(time.Now(), true)
	m.FailedOver()
	if _, empty := m.UpstreamDialOption().(grpc.EmptyDialOption); !empty || m.ServerRPC(nil) != nil || m.Registry() != nil {
		t.Fatal("nil Metrics built something")
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if m.CountConns(l, "workload", nil) != l {
		t.Fatal("nil Metrics wrapped the listener")
	}
}

// The upstream's dial option records unary calls and streams by method
// and code, and the connection to the server, against a real gRPC server
// on loopback.
func TestUpstreamDialOptionRecordsCallsAndConnections(t *testing.T) {
	m := New()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	healthpb.RegisterHealthServer(srv, health.NewServer())
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(srv.Stop)
	conn, err := grpc.NewClient(l.Addr().String(), m.UpstreamDialOption(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	client := healthpb.NewHealthClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := client.Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
		t.Fatal(err)
	}
	if _, err := client.Check(ctx, &healthpb.HealthCheckRequest{Service: "absent"}); err == nil {
		t.Fatal("Check of an unknown service succeeded")
	}
	watch, err := client.Watch(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := watch.Recv(); err != nil {
		t.Fatal(err)
	}
	server := map[string]string{"address": l.Addr().String()}
	if v, _ := metrictest.Gather(t, m.Registry()).Value(UpstreamServer.Name, server); v != 1 {
		t.Fatalf("connections to the server: %v, want 1", v)
	}
	srv.Stop() // ends the stream: Unavailable
	if _, err := watch.Recv(); err == nil {
		t.Fatal("the stream outlived the server")
	}

	f := metrictest.Gather(t, m.Registry())
	for _, c := range []struct {
		method, code string
	}{{"Check", "OK"}, {"Check", "NotFound"}, {"Watch", "Unavailable"}} {
		labels := map[string]string{"service": "grpc.health.v1.Health", "method": c.method, "code": c.code}
		if v, ok := f.Value(UpstreamRPCHandled.Name, labels); !ok || v != 1 {
			t.Errorf("%v: %v (%v); series: %s", labels, v, ok, f.Labels(UpstreamRPCHandled.Name))
		}
	}
	if v, _ := f.Value(UpstreamRPCDuration.Name, map[string]string{"method": "Check"}); v != 2 {
		t.Errorf("Check latency observed %v times, want 2", v)
	}
	conn.Close()
	testkit.WaitFor(t, 10*time.Second, "the closed connection to leave the metrics", func() bool {
		_, ok := metrictest.Gather(t, m.Registry()).Value(UpstreamServer.Name, server)
		return !ok
	})
}

// stubStream is the least of a server stream the interceptor reads.
type stubStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s *stubStream) Context() context.Context { return s.ctx }
func (s *stubStream) SendMsg(any) error        { return nil }

// The fetch path pays no allocation for metrics on a unary call, and one
// (the wrapper that times the first response) on a stream.
func TestServerInterceptorsAllocateOnlyTheStreamWrapper(t *testing.T) {
	m := New()
	srv := grpc.NewServer()
	healthpb.RegisterHealthServer(srv, health.NewServer())
	rpc := m.ServerRPC(func(context.Context) (uint32, bool) { return 1000, true })
	rpc.Index(srv)
	unary := rpc.WrapUnary(func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, next grpc.UnaryHandler) (any, error) {
		return next(ctx, req)
	})
	if len(rpc.ServerOptions()) != 2 || (*ServerRPC)(nil).ServerOptions() != nil {
		t.Error("ServerOptions: want the two interceptors, none without metrics")
	}
	info := &grpc.UnaryServerInfo{FullMethod: "/grpc.health.v1.Health/Check"}
	ctx := context.Background()
	handler := func(context.Context, any) (any, error) { return nil, nil }
	if n := testing.AllocsPerRun(100, func() { _, _ = unary(ctx, nil, info, handler) }); n != 0 {
		t.Errorf("a unary call allocates %v times for its metrics", n)
	}
	stream := rpc.WrapStream(func(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, next grpc.StreamHandler) error {
		return next(srv, ss)
	})
	sinfo := &grpc.StreamServerInfo{FullMethod: "/grpc.health.v1.Health/Watch"}
	var ss grpc.ServerStream = &stubStream{ctx: ctx}
	send := func(_ any, ss grpc.ServerStream) error { return ss.SendMsg(nil) }
	if n := testing.AllocsPerRun(100, func() { _ = stream(nil, ss, sinfo, send) }); n != 1 {
		t.Errorf("a stream allocates %v times for its metrics, want 1", n)
	}
	f := metrictest.Gather(t, m.Registry())
	if v, ok := f.Value(OpenStreams.Name, map[string]string{"uid_class": UIDUser}); !ok || v != 0 {
		t.Errorf("open streams of the user class: %v (series present: %v), want a series at 0", v, ok)
	}
	if v, _ := f.Value(RPCFirstResponse.Name, map[string]string{"method": "Watch"}); v != 101 {
		t.Errorf("first responses timed: %v, want 101", v)
	}
	if v, _ := f.Value(RPCHandled.Name, map[string]string{"method": "Check", "code": "OK"}); v != 101 {
		t.Errorf("Check calls counted: %v, want 101", v)
	}
}
