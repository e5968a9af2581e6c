// Package spiretest runs the real SPIRE (spire-server, spire-agent) as a test
// peer. The binaries come from test/spire/build.sh, which builds them from a
// separate Go module, so this package never imports SPIRE.
//
// Set LANYARD_SKIP_INTEROP=1 to skip tests that need SPIRE; otherwise a
// failure to build or start SPIRE fails the test.
package spiretest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/lanyard-dev/lanyard/internal/testkit"
)

// SkipEnv names the environment variable that, set to "1", skips SPIRE
// interop tests.
const SkipEnv = "LANYARD_SKIP_INTEROP"

const (
	// Bounds for waiting on SPIRE processes; generous because CI machines
	// with 2 cores running tests in parallel are slow.
	startTimeout = 60 * time.Second
	cliTimeout   = 30 * time.Second
	killTimeout  = 10 * time.Second
	pollEvery    = 100 * time.Millisecond
	logTailBytes = 16 << 10
)

var (
	binOnce sync.Once
	binDir  string
	binErr  error
)

// Binaries returns the dir holding spire-server and spire-agent, building
// them via build.sh if needed. The build runs once per test binary and is
// serialized across test binaries with a file lock, so parallel packages do
// not build twice. It skips the test only if LANYARD_SKIP_INTEROP=1.
func Binaries(t testing.TB) string {
	t.Helper()
	if os.Getenv(SkipEnv) == "1" {
		t.Skipf("%s=1: skipping test that needs the real SPIRE", SkipEnv)
	}
	binOnce.Do(func() { binDir, binErr = buildBinaries() })
	if binErr != nil {
		t.Fatalf("building the real SPIRE test peer: %v\n(set %s=1 to skip interop tests)", binErr, SkipEnv)
	}
	return binDir
}

func buildBinaries() (string, error) {
	script, err := testkit.RepoFile("test/spire/build.sh")
	if err != nil {
		return "", err
	}
	lockPath := filepath.Join(os.TempDir(), "lanyard-spire-build.lock")
	lock, err := os.OpenFile(lockPath, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return "", fmt.Errorf("opening build lock %s: %w", lockPath, err)
	}
	defer lock.Close()
	// Blocks while another test binary builds; go test's -timeout bounds it.
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		return "", fmt.Errorf("locking %s: %w", lockPath, err)
	}
	// Closing the file (deferred above) releases the lock.
	return testkit.RunBuildScript(script, "spire-server", "spire-agent")
}

type process struct {
	cmd  *exec.Cmd
	done chan struct{}
	err  error // set before done closes
}

func startProcess(bin, logPath string, args ...string) (*process, error) {
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	defer logFile.Close() // the child holds its own copy
	cmd := exec.Command(bin, args...)
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &process{cmd: cmd, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

func (p *process) kill() error {
	_ = p.cmd.Process.Kill() // fails only if it already exited
	select {
	case <-p.done:
		return nil
	case <-time.After(killTimeout):
		// SIGKILL cannot be ignored; only a process stuck in the kernel
		// gets here.
		return fmt.Errorf("pid %d did not exit %s after SIGKILL", p.cmd.Process.Pid, killTimeout)
	}
}

// waitHealthy polls check until it succeeds, the process exits, or
// startTimeout passes.
func waitHealthy(p *process, check func(context.Context) error) error {
	deadline := time.Now().Add(startTimeout)
	var last error
	for time.Now().Before(deadline) {
		select {
		case <-p.done:
			return fmt.Errorf("process exited: %v", p.err)
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		last = check(ctx)
		cancel()
		if last == nil {
			return nil
		}
		time.Sleep(pollEvery)
	}
	return fmt.Errorf("not healthy after %s: %v", startTimeout, last)
}

func runCLI(ctx context.Context, bin string, args ...string) (string, error) {
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("%w\nstdout:\n%s\nstderr:\n%s", err, stdout.String(), stderr.String())
	}
	return stdout.String(), nil
}

func decodeJSON(t testing.TB, out string, v any) {
	t.Helper()
	if err := json.Unmarshal([]byte(out), v); err != nil {
		t.Fatalf("parsing spire-server JSON output: %v\n%s", err, out)
	}
}

func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("finding a free port: %v", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func logTail(t testing.TB, name, path string) {
	t.Helper()
	t.Logf("%s log (%s), last part:\n%s", name, path, readTail(path))
}

func readTail(path string) string {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Sprintf("(cannot read log: %v)", err)
	}
	defer f.Close()
	if st, err := f.Stat(); err == nil && st.Size() > logTailBytes {
		if _, err := f.Seek(-logTailBytes, io.SeekEnd); err != nil {
			return fmt.Sprintf("(cannot read log: %v)", err)
		}
	}
	b, err := io.ReadAll(f)
	if err != nil && !errors.Is(err, io.EOF) {
		return fmt.Sprintf("(cannot read log: %v)", err)
	}
	return string(b)
}
