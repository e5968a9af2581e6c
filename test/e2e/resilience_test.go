package e2e

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// breakCA makes the local CA's state unusable, as a failed disk or an
// operator's mistake would, and returns a function that restores it. Both
// swap the file by rename, as any real writer of it does.
func breakCA(t *testing.T, dataDir string) (restore func()) {
	t.Helper()
	path := filepath.Join(dataDir, "local_ca.json")
	good, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	swap := func(data []byte) {
		tmp := path + ".test-swap"
		if err := os.WriteFile(tmp, data, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, path); err != nil {
			t.Fatal(err)
		}
	}
	swap([]byte("this is not a CA"))
	return func() { swap(good) }
}

// waitPersisted waits until the agent has saved an X509-SVID to its cache file.
func waitPersisted(t *testing.T, a *agentProc) {
	waitFor(t, 10*time.Second, "the cache to be saved with an SVID", func() bool {
		data, err := os.ReadFile(filepath.Join(a.dataDir, "cache.json"))
		return err == nil && strings.Contains(string(data), `"x509_svids":[{`)
	})
}

func TestRestartWhileUpstreamDownServesSavedSVIDs(t *testing.T) {
	dir := newAgentDir(t)
	a := startAgentIn(t, dir, baseConfig)
	before, err := a.client(t).FetchX509SVID(testContext(t))
	if err != nil {
		t.Fatal(err)
	}
	waitPersisted(t, a)
	if err := a.Cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	<-a.Exited

	restore := breakCA(t, a.dataDir)
	b := startAgentIn(t, dir, baseConfig)
	after, err := b.client(t).FetchX509SVID(testContext(t))
	if err != nil {
		t.Fatalf("no SVID from the saved cache while the CA is down: %v", err)
	}
	if !after.Certificates[0].Equal(before.Certificates[0]) {
		t.Fatal("the restarted agent served a different SVID; want the saved one")
	}
	waitFor(t, 10*time.Second, "the agent to log the CA outage", func() bool {
		return strings.Contains(b.Logs.String(), "local CA")
	})
	if info, err := os.Stat(filepath.Join(a.dataDir, "cache.json")); err != nil || info.Mode().Perm() != 0o600 {
		t.Fatalf("cache.json: %v, mode %v; want 0600", err, info.Mode())
	}

	// Once the CA is back, signing works again: a JWT-SVID needs it.
	restore()
	waitFor(t, 40*time.Second, "a JWT-SVID once the CA is back", func() bool {
		_, err := b.client(t).FetchJWTSVIDs(testContext(t), jwtParams("db"))
		return err == nil
	})
}

// freePort returns a loopback port that was free a moment ago.
func freePort(t *testing.T) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func httpGet(t *testing.T, url string) (int, string) {
	resp, err := http.Get(url)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

func TestUpstreamOutageMidRunKeepsServing(t *testing.T) {
	healthPort, metricsPort := freePort(t), freePort(t)
	cfg := strings.Replace(baseConfig, `x509_svid_ttl = "1h"`, `x509_svid_ttl = "8s"`, 1) + fmt.Sprintf(`
health_checks {
  listener_enabled = true
  bind_address     = "127.0.0.1"
  bind_port        = %d
}
telemetry {
  Prometheus {
    host = "127.0.0.1"
    port = %d
  }
}
`, healthPort, metricsPort)
	a := startAgent(t, cfg)
	ready := fmt.Sprintf("http://127.0.0.1:%d/ready", healthPort)
	metrics := fmt.Sprintf("http://127.0.0.1:%d/metrics", metricsPort)
	if code, body := httpGet(t, ready); code != http.StatusOK {
		t.Fatalf("/ready before the outage: %d %s", code, body)
	}
	w := watch(t, a.client(t))
	waitFor(t, 10*time.Second, "the first X.509 context", func() bool { return len(w.snapshot()) >= 1 })
	first := w.snapshot()[0].DefaultSVID().Certificates[0]

	restore := breakCA(t, a.dataDir)
	// While the SVID is valid, every fetch succeeds, on new connections too.
	ctx := testContext(t)
	for i := 0; time.Now().Before(first.NotAfter.Add(-2 * time.Second)); i++ {
		svid, err := a.client(t).FetchX509SVID(ctx)
		if err != nil {
			t.Fatalf("fetch %d during the CA outage failed: %v", i, err)
		}
		if svid.ID != userID {
			t.Fatalf("fetch %d: %s", i, svid.ID)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if !strings.Contains(a.Logs.String(), "Could not sign") {
		t.Fatalf("renewals during the outage were not attempted and logged:\n%s", a.Logs.String())
	}
	// Readiness says degraded, and why; the metrics say how long is left.
	code, body := httpGet(t, ready)
	if code != http.StatusServiceUnavailable || !strings.Contains(body, `"degraded":true`) || !strings.Contains(body, "first_svid_expires_in_seconds") {
		t.Fatalf("/ready during the outage: %d %s", code, body)
	}
	if _, m := httpGet(t, metrics); !strings.Contains(m, "lanyard_upstream_up 0") || !strings.Contains(m, "lanyard_x509_svid_first_expiry_seconds") {
		t.Fatalf("metrics during the outage:\n%s", m)
	}
	restore()
	waitFor(t, 40*time.Second, "rotation to resume after the CA is back", func() bool {
		ups := w.snapshot()
		last := ups[len(ups)-1].DefaultSVID().Certificates[0]
		return !last.Equal(first) && time.Now().Before(last.NotAfter)
	})
	if len(w.errs) > 0 {
		t.Fatalf("the watcher saw errors: %v", w.errs)
	}
	waitFor(t, 10*time.Second, "readiness to recover", func() bool {
		code, _ := httpGet(t, ready)
		return code == http.StatusOK
	})
	if _, m := httpGet(t, metrics); !strings.Contains(m, "lanyard_upstream_up 1") {
		t.Fatalf("metrics after the outage:\n%s", m)
	}
}

// TestProfilingEndpoint: spire-agent's profiling_enabled and profiling_port
// serve net/http/pprof on localhost.
func TestProfilingEndpoint(t *testing.T) {
	port := freePort(t)
	cfg := strings.Replace(baseConfig, "agent {", fmt.Sprintf("agent {\n  profiling_enabled = true\n  profiling_port = %d", port), 1)
	a := startAgent(t, cfg)
	url := fmt.Sprintf("http://localhost:%d/debug/pprof/heap?debug=1", port)
	var code int
	var body string
	waitFor(t, 10*time.Second, "the pprof endpoint", func() bool {
		code, body = httpGet(t, url)
		return code == http.StatusOK
	})
	if !strings.Contains(body, "heap profile") {
		t.Fatalf("GET %s: %d\n%.300s", url, code, body)
	}
	if !strings.Contains(a.Logs.String(), "Serving pprof profiles") {
		t.Fatalf("the pprof listener was not logged:\n%s", a.Logs.String())
	}
	// The listener is not moved on SIGHUP: a new port is refused, not ignored.
	a.reload(strings.Replace(cfg, fmt.Sprintf("profiling_port = %d", port), fmt.Sprintf("profiling_port = %d", port+1), 1), "Reload failed")
	if !strings.Contains(a.Logs.String(), "profiling_port (or profiling_enabled) changed: that needs a restart") {
		t.Fatalf("a changed profiling_port was not refused on reload:\n%s", a.Logs.String())
	}
}
