// Package e2e runs the real lanyard binary and talks to it over its real
// Unix socket with go-spiffe's Workload API client.
package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
)

// lanyardBin is the binary under test, built once by TestMain.
var lanyardBin string

func TestMain(m *testing.M) {
	os.Exit(runTests(m))
}

func runTests(m *testing.M) int {
	dir, err := os.MkdirTemp("", "lanyard-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	// Other users run the binary too (the no-entry test), so open it up.
	if err := os.Chmod(dir, 0o755); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
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

// syncBuffer collects a process's output for assertions.
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

// agentProc is a running lanyard agent.
type agentProc struct {
	t       *testing.T
	dir     string
	config  string
	socket  string
	dataDir string
	cmd     *exec.Cmd
	logs    *syncBuffer
	exited  chan struct{}
	exitErr error
}

// newAgentDir makes a short-pathed directory (Unix socket paths are limited
// to 107 bytes) that other users can traverse.
func newAgentDir(t *testing.T) string {
	dir, err := os.MkdirTemp("", "ly-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// expandConfig fills the placeholders @DATA@, @SOCKET@ and @UID@.
func expandConfig(body, dataDir, socket string) string {
	return strings.NewReplacer("@DATA@", dataDir, "@SOCKET@", socket, "@UID@", strconv.Itoa(os.Getuid())).Replace(body)
}

// startAgent writes config (with placeholders) into a new directory and
// runs the agent on it until it serves.
func startAgent(t *testing.T, config string) *agentProc {
	dir := newAgentDir(t)
	return startAgentIn(t, dir, config)
}

func startAgentIn(t *testing.T, dir, config string) *agentProc {
	t.Helper()
	a := &agentProc{
		t:       t,
		dir:     dir,
		config:  filepath.Join(dir, "agent.conf"),
		socket:  filepath.Join(dir, "public", "api.sock"),
		dataDir: filepath.Join(dir, "data"),
	}
	a.writeConfig(config)
	if err := a.start(); err != nil {
		t.Fatal(err)
	}
	return a
}

func (a *agentProc) writeConfig(config string) {
	a.t.Helper()
	if err := os.WriteFile(a.config, []byte(expandConfig(config, a.dataDir, a.socket)), 0o644); err != nil {
		a.t.Fatal(err)
	}
}

func (a *agentProc) start() error {
	a.logs = &syncBuffer{}
	a.exited = make(chan struct{})
	a.cmd = exec.Command(lanyardBin, "run", "-config", a.config)
	a.cmd.Stdout, a.cmd.Stderr = a.logs, a.logs
	a.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := a.cmd.Start(); err != nil {
		return err
	}
	go func() {
		a.exitErr = a.cmd.Wait()
		close(a.exited)
	}()
	a.t.Cleanup(func() {
		a.stop()
		if a.t.Failed() {
			a.t.Logf("agent logs:\n%s", a.logs.String())
		}
	})
	return a.waitHealthy()
}

// waitHealthy polls the gRPC health service until the agent serves.
func (a *agentProc) waitHealthy() error {
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-a.exited:
			return fmt.Errorf("the agent exited before serving: %v\n%s", a.exitErr, a.logs.String())
		default:
		}
		if a.healthy() {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("the agent did not become healthy within 30s:\n%s", a.logs.String())
}

func (a *agentProc) healthy() bool {
	conn, err := grpc.NewClient("unix://"+a.socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
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
func (a *agentProc) stop() {
	select {
	case <-a.exited:
		return
	default:
	}
	_ = a.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-a.exited:
		if a.exitErr != nil {
			a.t.Errorf("the agent exited with %v after SIGTERM, want status 0", a.exitErr)
		}
	case <-time.After(15 * time.Second):
		_ = a.cmd.Process.Kill()
		<-a.exited
		a.t.Errorf("the agent did not exit within 15s of SIGTERM")
	}
}

// reload rewrites the config and sends SIGHUP, then waits for the agent to
// log the outcome.
func (a *agentProc) reload(config, wantLog string) {
	a.t.Helper()
	before := strings.Count(a.logs.String(), wantLog)
	a.writeConfig(config)
	if err := a.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		a.t.Fatal(err)
	}
	waitFor(a.t, 10*time.Second, "the agent to log "+strconv.Quote(wantLog), func() bool {
		return strings.Count(a.logs.String(), wantLog) > before
	})
}

func (a *agentProc) client(t *testing.T) *workloadapi.Client {
	t.Helper()
	c, err := workloadapi.New(context.Background(), workloadapi.WithAddr("unix://"+a.socket))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// rawConn is a plain gRPC connection, for calls the go-spiffe client would
// not make (no security header, unimplemented methods).
func (a *agentProc) rawConn(t *testing.T) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+a.socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func withHeader(ctx context.Context) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "workload.spiffe.io", "true")
}

func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// runCLI runs the lanyard binary and returns its combined output and exit code.
func runCLI(t *testing.T, args ...string) (string, int) {
	t.Helper()
	cmd := exec.Command(lanyardBin, args...)
	out, err := cmd.CombinedOutput()
	var exit *exec.ExitError
	switch {
	case err == nil:
		return string(out), 0
	case errors.As(err, &exit):
		return string(out), exit.ExitCode()
	default:
		t.Fatalf("running lanyard %v: %v", args, err)
		return "", -1
	}
}
