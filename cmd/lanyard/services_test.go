package main

import (
	"context"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/conf"
	"github.com/lanyard-dev/lanyard/internal/testkit"
)

// An HTTP listener serves until stopped, then closes its port.
func TestHTTPServiceServesUntilStopped(t *testing.T) {
	mux := http.NewServeMux()
	mux.HandleFunc("/live", func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok") })
	svc, err := newHTTPService("health-checks", "127.0.0.1:0", mux, hclog.NewNullLogger(), "Serving")
	if err != nil {
		t.Fatal(err)
	}
	if svc.Name() != "health-checks" {
		t.Errorf("named %q", svc.Name())
	}
	addr := svc.listener.Addr().String()
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- svc.Run(ctx) }()
	resp, err := http.Get("http://" + addr + "/live")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(body) != "ok" {
		t.Fatalf("GET /live = %q", body)
	}
	cancel()
	if err := testkit.Receive(t, done, 5*time.Second, "Run to return"); err != nil {
		t.Fatalf("Run after its context ended = %v, want nil", err)
	}
	if c, err := net.Dial("tcp", addr); err == nil {
		c.Close()
		t.Fatal("the port still accepts connections")
	}
}

// A busy port fails the start, naming the listener and the address; the
// listeners already bound are released.
func TestABusyPortFailsTheStart(t *testing.T) {
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	port := busy.Addr().(*net.TCPAddr).Port
	cfg := &conf.Config{
		HealthChecks: conf.HealthChecks{ListenerEnabled: true, BindAddress: "127.0.0.1", BindPort: freeTCPPort(t), LivePath: "/live", ReadyPath: "/ready"},
		Agent:        conf.Agent{ProfilingPort: port},
	}
	_, err = listenerServices(cfg, nil, hclog.NewNullLogger())
	if err == nil || !strings.Contains(err.Error(), "profiling listener") || !strings.Contains(err.Error(), strconv.Itoa(port)) {
		t.Fatalf("listeners on a busy port: %v, want the profiling listener's error", err)
	}
	// The health listener bound before it was released.
	l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(cfg.HealthChecks.BindPort)))
	if err != nil {
		t.Fatalf("the health-checks port was not released: %v", err)
	}
	l.Close()
}

func freeTCPPort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}
