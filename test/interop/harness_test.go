// Package interop runs the lanyard binary as the node agent of a real
// spire-server (built by test/spire) and checks, with go-spiffe's client
// and with spire-agent's CLI, that workloads cannot tell it from
// spire-agent.
package interop

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/test/spire/spiretest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// lanyardBin is the binary under test, built once by TestMain.
var lanyardBin string

func TestMain(m *testing.M) {
	os.Exit(runTests(m))
}

func runTests(m *testing.M) int {
	if os.Getenv(spiretest.SkipEnv) == "1" {
		// Every test here needs SPIRE; they skip themselves.
		return m.Run()
	}
	dir, err := os.MkdirTemp("", "lanyard-interop-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	lanyardBin = filepath.Join(dir, "lanyard")
	args := []string{"build", "-o", lanyardBin}
	if raceEnabled {
		args = append(args, "-race")
	}
	args = append(args, "github.com/lanyard-dev/lanyard/cmd/lanyard")
	build := exec.Command("go", args...)
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "building lanyard:", err)
		return 1
	}
	return m.Run()
}

// syncBuffer collects a process's output.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// node is a lanyard agent's files: its config, data and socket.
type node struct {
	t      *testing.T
	dir    string
	config string
	socket string
	data   string
	bundle string
}

// agentConf is a spire-agent config as SPIRE's docs write it; Lanyard must
// run it unchanged. %[1]s is the node's dir, %[2]s the server's port,
// %[3]s the socket, %[4]s extra agent keys, %[5]s the key manager.
const agentConf = `agent {
    data_dir = "%[1]s/data"
    log_level = "DEBUG"
    server_address = "127.0.0.1"
    server_port = "%[2]s"
    socket_path = "%[3]s"
    trust_bundle_path = "%[1]s/bundle.pem"
    trust_domain = "example.org"
%[4]s}

plugins {
    NodeAttestor "join_token" {
        plugin_data {}
    }
    KeyManager %[5]s
    WorkloadAttestor "unix" {
        plugin_data {}
    }
}
`

const (
	diskKeys   = `"disk" { plugin_data { directory = "./keys" } }`
	memoryKeys = `"memory" { plugin_data {} }`
)

// newNode writes an agent.conf for server s. extra goes into the agent
// block; keys is the KeyManager block.
func newNode(t *testing.T, s *spiretest.Server, extra, keys string) *node {
	t.Helper()
	// Unix socket paths are limited to 107 bytes; t.TempDir() can exceed it.
	dir, err := os.MkdirTemp("", "lyi-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	n := &node{t: t, dir: dir, config: filepath.Join(dir, "agent.conf"), socket: filepath.Join(dir, "api.sock"),
		data: filepath.Join(dir, "data"), bundle: filepath.Join(dir, "bundle.pem")}
	if err := os.WriteFile(n.bundle, s.BundlePEM(t), 0o600); err != nil {
		t.Fatal(err)
	}
	_, port, err := net.SplitHostPort(s.Addr)
	if err != nil {
		t.Fatal(err)
	}
	keys = strings.ReplaceAll(keys, "./keys", filepath.Join(dir, "keys"))
	body := fmt.Sprintf(agentConf, dir, port, n.socket, extra, keys)
	if err := os.WriteFile(n.config, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return n
}

// lanyard is a running lanyard process.
type lanyard struct {
	t       *testing.T
	cmd     *exec.Cmd
	logs    *syncBuffer
	exited  chan struct{}
	exitErr error
}

// start runs `lanyard run -config <n.config> args...` and waits until it
// serves, failing the test if it does not within the bound.
func (n *node) start(args ...string) *lanyard {
	n.t.Helper()
	l, err := n.run(args...)
	if err != nil {
		n.t.Fatal(err)
	}
	if err := l.waitServing(n.socket, 60*time.Second); err != nil {
		n.t.Fatal(err)
	}
	return l
}

// run starts lanyard without waiting for it.
func (n *node) run(args ...string) (*lanyard, error) {
	l := &lanyard{t: n.t, logs: &syncBuffer{}, exited: make(chan struct{})}
	l.cmd = exec.Command(lanyardBin, append([]string{"run", "-config", n.config}, args...)...)
	l.cmd.Stdout, l.cmd.Stderr = l.logs, l.logs
	l.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := l.cmd.Start(); err != nil {
		return nil, err
	}
	go func() {
		l.exitErr = l.cmd.Wait()
		close(l.exited)
	}()
	n.t.Cleanup(func() {
		l.stop()
		if n.t.Failed() {
			n.t.Logf("lanyard logs:\n%s", l.logs.String())
		}
	})
	return l, nil
}

func (l *lanyard) waitServing(socket string, bound time.Duration) error {
	deadline := time.Now().Add(bound)
	for time.Now().Before(deadline) {
		select {
		case <-l.exited:
			return fmt.Errorf("lanyard exited before serving: %v\n%s", l.exitErr, l.logs.String())
		default:
		}
		if serving(socket) {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("lanyard did not serve within %s:\n%s", bound, l.logs.String())
}

func serving(socket string) bool {
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return false
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
	return err == nil && resp.Status == healthpb.HealthCheckResponse_SERVING
}

// stop sends SIGTERM and requires a clean exit within a bound.
func (l *lanyard) stop() {
	select {
	case <-l.exited:
		return
	default:
	}
	_ = l.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-l.exited:
		if l.exitErr != nil {
			l.t.Errorf("lanyard exited with %v after SIGTERM, want status 0", l.exitErr)
		}
	case <-time.After(15 * time.Second):
		_ = l.cmd.Process.Kill()
		<-l.exited
		l.t.Errorf("lanyard did not exit within 15s of SIGTERM")
	}
}

func waitFor(t *testing.T, bound time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(bound)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", bound, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func testContext(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}
