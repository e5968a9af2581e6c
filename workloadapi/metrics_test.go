package workloadapi

import (
	"context"
	"os"
	"strings"
	"testing"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/lanyard-dev/lanyard/telemetry"
	"github.com/lanyard-dev/lanyard/telemetry/metrictest"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Calls, streams, connections and attestations are recorded by method,
// code and uid class, over a real socket and the real unix attestor.
func TestMetricsRecordCallsStreamsAndConnections(t *testing.T) {
	m := telemetry.New()
	e := newTestEnv(t, envOptions{entries: []*agent.Entry{newEntry("/a", 1, mySelector())}, metrics: m})
	myClass := telemetry.UIDClass(uint32(os.Getuid()))
	value := func(name string, labels map[string]string) float64 {
		v, _ := metrictest.Gather(t, m.Registry()).Value(name, labels)
		return v
	}
	const svc = "SpiffeWorkloadAPI"
	streams := map[string]string{"service": svc, "uid_class": myClass}
	conns := map[string]string{"socket": "workload", "uid_class": myClass}

	conn := testkit.Dial(t, e.socket)
	c := workload.NewSpiffeWorkloadAPIClient(conn)
	ctx, cancel := context.WithCancel(callCtx(t))
	stream, err := c.FetchX509SVID(ctx, &workload.X509SVIDRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Recv(); err != nil {
		t.Fatal(err)
	}
	if v := value(telemetry.OpenStreams.Name, streams); v != 1 {
		t.Fatalf("open streams = %v with one open; series: %s", v, metrictest.Gather(t, m.Registry()).Labels(telemetry.OpenStreams.Name))
	}
	if v := value(telemetry.RPCFirstResponse.Name, map[string]string{"service": svc, "method": "FetchX509SVID"}); v != 1 {
		t.Fatalf("first responses timed: %v, want 1", v)
	}
	if v := value(telemetry.Connections.Name, conns); v != 1 {
		t.Fatalf("open connections = %v, want 1", v)
	}

	if _, err := c.FetchJWTSVID(callCtx(t), &workload.JWTSVIDRequest{Audience: []string{"metrics"}}); err != nil {
		t.Fatal(err)
	}
	// Refused by the header check, which runs inside the metrics.
	_, err = c.FetchJWTSVID(t.Context(), &workload.JWTSVIDRequest{Audience: []string{"metrics"}})
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("a call without the header: %v", err)
	}
	for code, want := range map[string]float64{"OK": 1, "InvalidArgument": 1} {
		labels := map[string]string{"service": svc, "method": "FetchJWTSVID", "code": code}
		if v := value(telemetry.RPCHandled.Name, labels); v != want {
			t.Errorf("%v: %v, want %v", labels, v, want)
		}
	}
	if v := value(telemetry.RPCDuration.Name, map[string]string{"service": svc, "method": "FetchJWTSVID"}); v != 2 {
		t.Errorf("FetchJWTSVID durations observed: %v, want 2", v)
	}

	cancel()
	testkit.WaitFor(t, waitLimit, "the stream to end", func() bool {
		return value(telemetry.OpenStreams.Name, streams) == 0 &&
			value(telemetry.RPCHandled.Name, map[string]string{"method": "FetchX509SVID", "code": "OK"}) == 1
	})
	if v := value(telemetry.AttestorDuration.Name, map[string]string{"attestor": "unix"}); v != 2 {
		t.Errorf("unix attestor answers timed: %v, want 2 (the stream and the JWT call with the header)", v)
	}
	if v := value(telemetry.AttestationDuration.Name, nil); v != 2 {
		t.Errorf("attestations timed: %v, want 2", v)
	}
	conn.Close()
	testkit.WaitFor(t, waitLimit, "the connection to count as closed", func() bool {
		return value(telemetry.Connections.Name, conns) == 0
	})
	if v := value(telemetry.ConnectionsTotal.Name, conns); v != 1 {
		t.Errorf("connections accepted: %v, want 1", v)
	}
}

// A denial is logged at INFO with the selectors found, once per uid per
// interval; a stream's first SVIDs and its pushes are logged at DEBUG.
func TestDenialsAndPushesAreLogged(t *testing.T) {
	e := newTestEnv(t, envOptions{entries: []*agent.Entry{newEntry("/other", 1, otherSelector())}})
	c := e.client(t)
	for range 3 {
		_, err := c.FetchJWTSVID(callCtx(t), &workload.JWTSVIDRequest{Audience: []string{"x"}})
		if status.Code(err) != codes.PermissionDenied {
			t.Fatalf("a caller without an entry: %v", err)
		}
	}
	logs := e.logs.String()
	const denial = "No registration entry matches the caller's selectors: no identity issued"
	if n := strings.Count(logs, denial); n != 1 {
		t.Fatalf("%d denial lines for 3 denials of one uid within a minute, want 1:\n%s", n, logs)
	}
	line := logLine(logs, denial)
	for _, want := range []string{"[INFO]", mySelector().String(), "method=/SpiffeWorkloadAPI/FetchJWTSVID", "uid="} {
		if !strings.Contains(line, want) {
			t.Errorf("the denial line lacks %q: %s", want, line)
		}
	}

	// The entry arrives: the stream's first SVIDs, then a push.
	e.cache.SetEntries([]*agent.Entry{newEntry("/a", 1, mySelector())})
	ch := openX509Stream(t, c)
	nextMsg(t, ch, "first message")
	e.cache.SetEntries([]*agent.Entry{newEntry("/a", 1, mySelector()), newEntry("/b", 2, mySelector())})
	nextMsg(t, ch, "the pushed change")
	testkit.WaitFor(t, waitLimit, "the push to be logged", func() bool {
		return strings.Contains(e.logs.String(), "Pushed a change on an X509-SVID stream")
	})
	logs = e.logs.String()
	first := logLine(logs, "Sent the first response on an X509-SVID stream")
	if !strings.Contains(first, "[DEBUG]") || !strings.Contains(first, "spiffe://example.org/a") {
		t.Errorf("first SVID line: %q", first)
	}
	if push := logLine(logs, "Pushed a change on an X509-SVID stream"); !strings.Contains(push, "spiffe://example.org/b") {
		t.Errorf("push line: %q", push)
	}
	if strings.Contains(logs, "PRIVATE KEY") {
		t.Error("the log carries key material")
	}
}

func logLine(logs, msg string) string {
	for line := range strings.Lines(logs) {
		if strings.Contains(line, msg) {
			return line
		}
	}
	return ""
}

// SDS calls are recorded under their own service, and an SDS denial is
// logged like the Workload API's.
func TestMetricsAndDenialsOfSDS(t *testing.T) {
	m := telemetry.New()
	e := newTestEnv(t, envOptions{entries: []*agent.Entry{newEntry("/other", 1, otherSelector())}, noJWTKey: true, metrics: m})
	client := secretv3.NewSecretDiscoveryServiceClient(testkit.Dial(t, e.socket))
	_, err := client.FetchSecrets(t.Context(), &discoveryv3.DiscoveryRequest{TypeUrl: secretType, ResourceNames: []string{"default"}})
	if status.Code(err) != codes.PermissionDenied {
		t.Fatalf("SDS for a caller without an entry: %v", err)
	}
	if _, err := client.FetchSecrets(t.Context(), &discoveryv3.DiscoveryRequest{TypeUrl: secretType, ResourceNames: []string{"ROOTCA"}}); err != nil {
		t.Fatalf("the trust bundle, which needs no entry: %v", err)
	}
	f := metrictest.Gather(t, m.Registry())
	for code, want := range map[string]float64{"PermissionDenied": 1, "OK": 1} {
		labels := map[string]string{"service": "envoy.service.secret.v3.SecretDiscoveryService", "method": "FetchSecrets", "code": code}
		if v, _ := f.Value(telemetry.RPCHandled.Name, labels); v != want {
			t.Errorf("%v: %v, want %v; series: %s", labels, v, want, f.Labels(telemetry.RPCHandled.Name))
		}
	}
	line := logLine(e.logs.String(), "No registration entry matches the caller's selectors")
	if !strings.Contains(line, "method=/envoy.service.secret.v3.SecretDiscoveryService/FetchSecrets") || !strings.Contains(line, mySelector().String()) {
		t.Errorf("the SDS denial line: %q", line)
	}
}
