package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/lanyard-dev/lanyard/telemetry"
	"github.com/lanyard-dev/lanyard/telemetry/metrictest"
	debugv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/agent/debug/v1"
)

// workloadAPIMetricsWired says that `lanyard run` hands the agent's
// metrics to the Workload API (workloadapi.Config.Metrics in
// cmd/lanyard/run.go); until then its call, stream and connection series
// are not checked here (see workloadapi/metrics_test.go for them).
const workloadAPIMetricsWired = true

// The real agent's /metrics, scraped after real Workload API calls, has
// the series of the calls, the attestations, the SVIDs and their renewal,
// the embedded CA and the saved cache, with bounded labels.
func TestMetricsAfterRealCalls(t *testing.T) {
	port := freePort(t)
	dir := newAgentDir(t)
	admin := filepath.Join(dir, "private", "admin.sock")
	cfg := strings.Replace(baseConfig, `x509_svid_ttl = "1h"`, `x509_svid_ttl = "4s"`, 1)
	cfg = strings.Replace(cfg, `socket_path  = "@SOCKET@"`, `socket_path  = "@SOCKET@"
  admin_socket_path = "`+admin+`"`, 1) + fmt.Sprintf(`
telemetry {
  Prometheus {
    host = "127.0.0.1"
    port = %d
  }
}
`, port)
	a := startAgentIn(t, dir, cfg)
	url := fmt.Sprintf("http://127.0.0.1:%d/metrics", port)
	ctx := testContext(t)
	c := a.client(t)
	if _, err := c.FetchX509SVID(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := c.FetchJWTSVID(ctx, jwtParams("metrics")); err != nil {
		t.Fatal(err)
	}
	// The admin socket's Debug API, as an operator's grpcurl calls it.
	if _, err := debugv1.NewDebugClient(testkit.Dial(t, admin)).GetInfo(ctx, &debugv1.GetInfoRequest{}); err != nil {
		t.Fatal(err)
	}
	denied := os.Getuid() == 0
	if denied {
		// uid 65534 (nobody) has no entry.
		cmd := exec.Command(lanyardBin, "api", "fetch", "x509", "-socketPath", a.socket, "-timeout", "3s")
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
		if out, err := cmd.CombinedOutput(); err == nil {
			t.Fatalf("a caller without an entry got an SVID:\n%s", out)
		}
	}
	td := map[string]string{"trust_domain": "example.org"}
	// The SVID fetched is renewed at about half of its 4 s.
	var f metrictest.Families
	waitFor(t, 20*time.Second, "a renewal and a saved cache", func() bool {
		f = metrictest.Scrape(t, url)
		renewed, _ := f.Value(telemetry.SVIDRenewals.Name, td)
		_, saved := f.Value(telemetry.CacheLastSave.Name, nil)
		return renewed >= 1 && saved
	})
	// The renewed SVID counts in the earliest expiry once a workload has
	// it: only those are renewed.
	if _, err := c.FetchX509SVID(ctx); err != nil {
		t.Fatal(err)
	}
	f = metrictest.Scrape(t, url)

	type want struct {
		def    telemetry.Def
		labels map[string]string
		check  func(float64) bool
		what   string
	}
	positive := func(v float64) bool { return v > 0 }
	now := float64(time.Now().Unix())
	wants := []want{
		{telemetry.Ready, nil, func(v float64) bool { return v == 1 }, "1"},
		{telemetry.UpstreamUp, nil, func(v float64) bool { return v == 1 }, "1"},
		{telemetry.UpstreamDown, nil, func(v float64) bool { return v == 0 }, "0"},
		{telemetry.FirstExpiry, nil, positive, "> 0"},
		{telemetry.Entries, nil, func(v float64) bool { return v == 1 }, "1"},
		{telemetry.X509SVIDsTotal, nil, positive, "> 0"},
		{telemetry.SVIDs, td, positive, "> 0"},
		{telemetry.SVIDEarliestExpiry, td, func(v float64) bool { return v > 0 && v <= 5 }, "in (0, 5] s"},
		{telemetry.SVIDShortestTTL, td, func(v float64) bool { return v >= 4 && v < 60 }, "4 s and the backdating"},
		{telemetry.SVIDRenewalFailure, td, nil, "absent"},
		{telemetry.AttestorDuration, map[string]string{"attestor": "unix"}, func(v float64) bool { return v >= 2 }, ">= 2 answers"},
		{telemetry.AttestationDuration, nil, func(v float64) bool { return v >= 2 }, ">= 2 attestations"},
		{telemetry.CacheLastSave, nil, func(v float64) bool { return v > now-60 && v <= now+1 }, "within the last minute"},
		{telemetry.LocalCAExpiry, nil, func(v float64) bool { return v > now }, "in the future"},
		{telemetry.LocalCARotations, nil, func(v float64) bool { return v == 0 }, "0"},
		{telemetry.UpstreamSyncAge, nil, func(v float64) bool { return v >= 0 && v < 60 }, "under a minute"},
	}
	if workloadAPIMetricsWired {
		const svc = "SpiffeWorkloadAPI"
		wants = append(wants,
			want{telemetry.RPCHandled, map[string]string{"service": svc, "method": "FetchX509SVID", "code": "OK"}, positive, "> 0"},
			want{telemetry.RPCHandled, map[string]string{"service": svc, "method": "FetchJWTSVID", "code": "OK"}, positive, "> 0"},
			want{telemetry.RPCDuration, map[string]string{"service": svc, "method": "FetchJWTSVID"}, positive, "> 0"},
			want{telemetry.RPCFirstResponse, map[string]string{"service": svc, "method": "FetchX509SVID"}, positive, "> 0"},
			want{telemetry.ConnectionsTotal, map[string]string{"socket": "workload", "uid_class": telemetry.UIDClass(uint32(os.Getuid()))}, positive, "> 0"},
			want{telemetry.RPCHandled, map[string]string{"service": "spire.agent.debug.v1.Debug", "method": "GetInfo", "code": "OK"}, positive, "> 0"},
			want{telemetry.ConnectionsTotal, map[string]string{"socket": "admin", "uid_class": telemetry.UIDClass(uint32(os.Getuid()))}, positive, "> 0"},
		)
		if denied {
			wants = append(wants, want{telemetry.RPCHandled, map[string]string{"service": svc, "method": "FetchX509SVID", "code": "PermissionDenied"}, positive, "> 0"},
				want{telemetry.ConnectionsTotal, map[string]string{"socket": "workload", "uid_class": telemetry.UIDUser}, positive, "> 0"})
		}
	}
	for _, w := range wants {
		v, ok := f.Value(w.def.Name, w.labels)
		switch {
		case w.check == nil && ok:
			t.Errorf("%s%v = %v, want %s", w.def.Name, w.labels, v, w.what)
		case w.check != nil && (!ok || !w.check(v)):
			t.Errorf("%s%v = %v (present: %v), want %s; series: %s", w.def.Name, w.labels, v, ok, w.what, f.Labels(w.def.Name))
		}
	}

	// Every lanyard_ series is defined, and none is labelled by a
	// workload's identity.
	defined := map[string]bool{}
	for _, d := range telemetry.Defs() {
		defined[d.Name] = true
	}
	for name, mf := range f {
		if !strings.HasPrefix(name, "lanyard_") {
			continue
		}
		if !defined[name] {
			t.Errorf("%s is served but not in telemetry.Defs", name)
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if strings.Contains(l.GetValue(), "spiffe://") || l.GetName() == "pid" || l.GetName() == "uid" {
					t.Errorf("%s has the unbounded label %s=%q", name, l.GetName(), l.GetValue())
				}
			}
		}
	}

	if denied {
		waitFor(t, 10*time.Second, "the denial to be logged", func() bool {
			return strings.Contains(a.Logs.String(), "No registration entry matches the caller's selectors")
		})
		line := ""
		for l := range strings.Lines(a.Logs.String()) {
			if strings.Contains(l, "No registration entry matches the caller's selectors") {
				line = l
			}
		}
		if !strings.Contains(line, "unix:uid:65534") || !strings.Contains(line, "[INFO]") {
			t.Errorf("the denial line does not name the caller's selectors at INFO: %s", line)
		}
	}
}
