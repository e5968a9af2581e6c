package filedelivery

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testkit"
	"golang.org/x/sys/unix"
)

// rotations is how many X.509 rotations the daemon test watches readers
// across; with a 4s TTL the agent renews about every 2s.
const rotations = 3

// TestDaemon runs `lanyard helper` on a real agent with short-lived SVIDs
// and checks, across several rotations: readers in tight loops never see a
// partial file or a key that does not match (credential folder and the
// classic files); the JWT file always validates against the JWT bundle
// file; cmd gets one renew_signal per update, each after the files are in
// place; the process in pid_file_name (re-read at every update) is
// signalled; the health listener answers; and SIGTERM stops the helper
// (exit 0) and its child.
func TestDaemon(t *testing.T) {
	socket := startAgent(t)
	dir := testkit.ShortDir(t, "fdd-")
	certs, creds := filepath.Join(dir, "certs"), filepath.Join(dir, "creds")
	for _, d := range []string{certs, creds} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	certPath, keyPath := filepath.Join(certs, "svid.pem"), filepath.Join(certs, "svid_key.pem")
	childLog, pidLog := filepath.Join(dir, "child.log"), filepath.Join(dir, "pid.log")
	pidFile := filepath.Join(dir, "app.pid")
	port := freePort(t)
	cfg := writeHelperConfig(t, dir, fmt.Sprintf(`agent_address = %q
cmd = %q
cmd_args = "-test.run=^$ \"-test.v=false\""
cert_dir = %q
renew_signal = "SIGUSR1"
pid_file_name = %q
svid_file_name = "svid.pem"
svid_key_file_name = "svid_key.pem"
svid_bundle_file_name = "svid_bundle.pem"
jwt_svids = [{jwt_audience = "db", jwt_svid_file_name = "jwt.token"}]
jwt_bundle_file_name = "bundle.json"
credential_folder = %q
health_checks {
  listener_enabled = true
  bind_port = %d
}
`, socket, os.Args[0], certs, pidFile, creds, port))

	// The process in pid_file_name, started before the helper.
	startPIDProcess(t, pidFile, pidLog, certPath, keyPath)

	helper := exec.Command(lanyardBin, "helper", "-config", cfg)
	helper.Env = append(os.Environ(), childLogEnv+"="+childLog,
		"FILEDELIVERY_TEST_CHILD_CERT="+certPath, "FILEDELIVERY_TEST_CHILD_KEY="+keyPath)
	logs := &testkit.Buffer{}
	helper.Stdout, helper.Stderr = logs, logs
	helper.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := helper.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- helper.Wait() }()
	stopped := false
	t.Cleanup(func() {
		if !stopped {
			_ = helper.Process.Kill()
			<-exited
		}
		if t.Failed() {
			t.Logf("helper logs:\n%s", logs.String())
		}
	})

	cb := filepath.Join(creds, CredentialBundleName)
	testkit.WaitFor(t, 20*time.Second, "the child to start", func() bool {
		data, _ := os.ReadFile(childLog)
		return bytes.HasPrefix(data, []byte("start "))
	})
	ready := fmt.Sprintf("http://127.0.0.1:%d/ready", port)
	for _, path := range []string{ready, fmt.Sprintf("http://127.0.0.1:%d/live", port)} {
		resp, err := http.Get(path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("%s: %s", path, resp.Status)
		}
	}

	// Readers in tight loops until the credential bundle has rotated
	// `rotations` times.
	var stop atomic.Bool
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	report := func(err error) {
		select {
		case errs <- err:
		default:
		}
	}
	reader := func(name string, read func() error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			n := 0
			for !stop.Load() {
				if err := read(); err != nil {
					report(fmt.Errorf("%s reader, read %d: %w", name, n, err))
					return
				}
				n++
			}
		}()
	}
	reader("credential folder", func() error {
		data, err := os.ReadFile(cb)
		if err != nil {
			return err
		}
		_, _, err = parseCredentialBundle(data)
		return err
	})
	reader("trust bundle", func() error {
		data, err := os.ReadFile(filepath.Join(creds, "example.org"+TrustBundleNameSuffix))
		if err != nil {
			return err
		}
		_, err = parseCerts(data)
		return err
	})
	reader("classic files", func() error { return readClassicPair(certPath, keyPath) })
	var tokens sync.Map
	reader("JWT", func() error {
		svid, err := validateJWTFiles(filepath.Join(certs, "jwt.token"), filepath.Join(certs, "bundle.json"), "db")
		if err == nil {
			tokens.Store(svid.Marshal(), true)
		}
		return err
	})

	seen := map[string]bool{}
	deadline := time.Now().Add(time.Duration(rotations) * 10 * time.Second)
	for len(seen) <= rotations && time.Now().Before(deadline) {
		if data, err := os.ReadFile(cb); err == nil {
			if _, chain, err := parseCredentialBundle(data); err == nil {
				seen[chain[0].SerialNumber.String()] = true
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	stop.Store(true)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if len(seen) <= rotations {
		t.Fatalf("saw %d certificates in the credential bundle, want %d rotations", len(seen), rotations)
	}
	nTokens := 0
	tokens.Range(func(any, any) bool { nTokens++; return true })
	if nTokens < 2 {
		t.Errorf("saw %d JWT-SVIDs, want a renewal", nTokens)
	}

	// pid_file_name is re-read at every update: a restarted process gets
	// the next signal.
	startPIDProcess(t, pidFile, pidLog+".2", certPath, keyPath)
	testkit.WaitFor(t, 20*time.Second, "the restarted pid_file_name process to be signalled", func() bool {
		data, _ := os.ReadFile(pidLog + ".2")
		return bytes.Contains(data, []byte("usr1 "))
	})

	// SIGTERM: exit 0, the child stopped too.
	if err := helper.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-exited:
		stopped = true
		if err != nil {
			t.Fatalf("helper exited with %v after SIGTERM, want 0", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the helper did not exit within 20s of SIGTERM")
	}
	lines := readLines(t, childLog)
	if len(lines) == 0 || lines[len(lines)-1] != "term" {
		t.Fatalf("the child did not get SIGTERM:\n%s", strings.Join(lines, "\n"))
	}
	childPID, _ := strconv.Atoi(strings.Fields(lines[0])[1])
	if err := unix.Kill(childPID, 0); !errors.Is(err, unix.ESRCH) {
		t.Fatalf("the child %d is still there after the helper exited: %v", childPID, err)
	}
	checkSignalLog(t, lines[:len(lines)-1], strings.Count(logs.String(), "X.509-SVID written"))
	pidLines := readLines(t, pidLog)
	if len(pidLines) < 2 {
		t.Fatalf("the pid_file_name process got no signal:\n%s", strings.Join(pidLines, "\n"))
	}
	for _, l := range pidLines[1:] {
		if !strings.HasSuffix(l, " ok") {
			t.Errorf("the pid_file_name process saw %q", l)
		}
	}
}

// checkSignalLog: the child started once, then got one SIGUSR1 per later
// X.509 update, each time with a new certificate whose key was in place.
func checkSignalLog(t *testing.T, lines []string, updates int) {
	t.Helper()
	if !strings.HasPrefix(lines[0], "start ") || !strings.HasSuffix(lines[0], " ok") {
		t.Fatalf("child log starts with %q", lines[0])
	}
	prev := strings.Fields(lines[0])[2]
	for _, l := range lines[1:] {
		f := strings.Fields(l)
		if len(f) != 3 || f[0] != "usr1" || f[2] != "ok" {
			t.Fatalf("child log line %q", l)
		}
		if f[1] == prev {
			t.Errorf("a signal with no new certificate (serial %s): one signal per update", f[1])
		}
		prev = f[1]
	}
	// The last update may have been written as SIGTERM arrived, before
	// its signal.
	if got := len(lines); got != updates && got != updates-1 {
		t.Errorf("the child got %d start and signals for %d updates", got, updates)
	}
	if len(lines) < rotations+1 {
		t.Errorf("the child got %d signals, want one per rotation", len(lines)-1)
	}
}

// readClassicPair reads the certificate, then the key. The helper writes
// the key first, so a key that does not match is a newer one whose
// certificate is on its way; a key older than the certificate would never
// be matched by a later certificate.
func readClassicPair(certPath, keyPath string) error {
	leaf, key, err := readPair(certPath, keyPath)
	if err != nil {
		return err
	}
	if keyMatches(leaf, key) {
		return nil
	}
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		data, err := os.ReadFile(certPath)
		if err != nil {
			return err
		}
		certs, err := parseCerts(data)
		if err != nil {
			return err
		}
		if keyMatches(certs[0], key) {
			return nil
		}
		time.Sleep(5 * time.Millisecond)
	}
	return fmt.Errorf("the key beside certificate %s belongs to no certificate that followed", leaf.SerialNumber)
}

// startPIDProcess starts the child role and writes its pid into pidFile.
func startPIDProcess(t *testing.T, pidFile, log, certPath, keyPath string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childLogEnv+"="+log,
		"FILEDELIVERY_TEST_CHILD_CERT="+certPath, "FILEDELIVERY_TEST_CHILD_KEY="+keyPath)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	t.Cleanup(func() { _ = cmd.Process.Kill(); <-done })
	// It has its handler once it logged its start.
	testkit.WaitFor(t, 10*time.Second, "the pid_file_name process to start", func() bool {
		data, _ := os.ReadFile(log)
		return bytes.HasPrefix(data, []byte("start "))
	})
	if err := os.WriteFile(pidFile, []byte(strconv.Itoa(cmd.Process.Pid)+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	return cmd
}

func readLines(t *testing.T, path string) []string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return strings.Split(strings.TrimSpace(string(data)), "\n")
}

func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}
