package testkit

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// BuildLanyard compiles cmd/lanyard into a new directory that every user
// may read (tests run clients under other uids), with the race detector
// when the tests have it. cleanup removes the directory. End-to-end suites
// call it once, from TestMain.
func BuildLanyard() (path string, cleanup func(), err error) {
	dir, err := os.MkdirTemp("", "lanyard-bin-")
	if err != nil {
		return "", nil, err
	}
	cleanup = func() { os.RemoveAll(dir) }
	if err := os.Chmod(dir, 0o755); err != nil {
		cleanup()
		return "", nil, err
	}
	path = filepath.Join(dir, "lanyard")
	args := []string{"build", "-o", path}
	if RaceEnabled {
		args = append(args, "-race")
	}
	args = append(args, "github.com/lanyard-dev/lanyard/cmd/lanyard")
	build := exec.Command("go", args...)
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		cleanup()
		return "", nil, fmt.Errorf("building lanyard: %w", err)
	}
	return path, cleanup, nil
}

// Process is a running lanyard.
type Process struct {
	t       testing.TB
	Cmd     *exec.Cmd
	Logs    *Buffer
	Exited  chan struct{} // closed when it exits
	ExitErr error         // valid once Exited is closed
}

// Start runs the binary with args. It dies with the test binary, and on
// cleanup is stopped with SIGTERM and must exit 0; its logs are shown if
// the test failed.
func Start(t testing.TB, bin string, args ...string) (*Process, error) {
	return StartWith(t, &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}, bin, args...)
}

// StartWith is Start with the process's attributes (its credentials, say);
// attr should ask for SIGKILL as the parent-death signal, as Start does.
func StartWith(t testing.TB, attr *syscall.SysProcAttr, bin string, args ...string) (*Process, error) {
	p := &Process{t: t, Logs: &Buffer{}, Exited: make(chan struct{})}
	p.Cmd = exec.Command(bin, args...)
	p.Cmd.Stdout, p.Cmd.Stderr = p.Logs, p.Logs
	p.Cmd.SysProcAttr = attr
	if err := p.Cmd.Start(); err != nil {
		return nil, err
	}
	go func() {
		p.ExitErr = p.Cmd.Wait()
		close(p.Exited)
	}()
	t.Cleanup(func() {
		p.Stop()
		if t.Failed() {
			t.Logf("lanyard logs:\n%s", p.Logs.String())
		}
	})
	return p, nil
}

// WaitServing polls the gRPC health service on socket until it reports
// SERVING, the process exits, or bound passes.
func (p *Process) WaitServing(socket string, bound time.Duration) error {
	deadline := time.Now().Add(bound)
	for time.Now().Before(deadline) {
		select {
		case <-p.Exited:
			return fmt.Errorf("lanyard exited before serving: %v\n%s", p.ExitErr, p.Logs.String())
		default:
		}
		if Serving(socket) {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("lanyard did not serve within %s:\n%s", bound, p.Logs.String())
}

// Stop sends SIGTERM and requires a clean exit within a bound.
func (p *Process) Stop() {
	select {
	case <-p.Exited:
		return
	default:
	}
	_ = p.Cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.Exited:
		if p.ExitErr != nil {
			p.t.Errorf("lanyard exited with %v after SIGTERM, want status 0", p.ExitErr)
		}
	case <-time.After(15 * time.Second):
		_ = p.Cmd.Process.Kill()
		<-p.Exited
		p.t.Errorf("lanyard did not exit within 15s of SIGTERM")
	}
}

// Serving reports whether the agent on socket answers SERVING.
func Serving(socket string) bool {
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

// Dial is a plain gRPC connection to the Unix socket, closed when the test
// ends: for calls the go-spiffe client would not make (no security
// header, unimplemented methods).
func Dial(t testing.TB, socket string) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// RunCLI runs bin with args and returns its combined output and exit code;
// it fails the test only when bin cannot be run at all.
func RunCLI(t testing.TB, bin string, args ...string) (string, int) {
	t.Helper()
	out, err := exec.Command(bin, args...).CombinedOutput()
	var exit *exec.ExitError
	switch {
	case err == nil:
		return string(out), 0
	case errors.As(err, &exit):
		return string(out), exit.ExitCode()
	default:
		t.Fatalf("running %s %v: %v", bin, args, err)
		return "", -1
	}
}

// RunWithLanyard is a TestMain's body for a suite that runs the binary:
// it builds lanyard, hands its path to setup, runs the tests and removes
// the binary. It returns the exit code.
func RunWithLanyard(m *testing.M, setup func(bin string) error) int {
	bin, cleanup, err := BuildLanyard()
	if err == nil {
		defer cleanup()
		err = setup(bin)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return m.Run()
}
