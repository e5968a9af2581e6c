package files

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testkit"
)

// helperConfig is a spiffe-helper config file, written as spiffe-helper's
// users write it.
type helperConfig struct {
	socket, certDir           string
	cmd, cmdArgs              string
	pidFile, renewSignal      string
	svid, svidKey, svidBundle string
	// extra is more HCL: jwt_svids, credential_folder.
	extra string
}

func (c helperConfig) hcl() string {
	var b strings.Builder
	line := func(key, value string) {
		if value != "" {
			fmt.Fprintf(&b, "%s = %q\n", key, value)
		}
	}
	line("agent_address", c.socket)
	line("cmd", c.cmd)
	line("cmd_args", c.cmdArgs)
	line("cert_dir", c.certDir)
	line("renew_signal", c.renewSignal)
	line("pid_file_name", c.pidFile)
	line("svid_file_name", c.svid)
	line("svid_key_file_name", c.svidKey)
	line("svid_bundle_file_name", c.svidBundle)
	b.WriteString(c.extra)
	return b.String()
}

// waitFile waits until path exists, as the helper's first write.
func waitFile(t *testing.T, path string) {
	t.Helper()
	testkit.WaitFor(t, 30*time.Second, path, func() bool {
		_, err := os.Stat(path)
		return err == nil
	})
}

// signals are the renew_signal values the tests use.
var signals = map[string]syscall.Signal{"SIGHUP": syscall.SIGHUP, "SIGUSR2": syscall.SIGUSR2}

// feedWithAPIFetch stands in for `lanyard helper` until it exists on this
// branch: it polls `lanyard api fetch x509 -write`, and when the SVID
// changes moves the files into place and signals the pid file's process
// or (re)starts cmd and signals it. Stopped on cleanup.
func feedWithAPIFetch(t *testing.T, c helperConfig) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	t.Cleanup(func() {
		cancel()
		<-done
	})
	stage := filepath.Join(c.certDir, ".stage")
	var child *app
	go func() {
		defer close(done)
		var last []byte
		for ctx.Err() == nil {
			out, err := exec.CommandContext(ctx, lanyardBin, "api", "fetch", "x509", "-socketPath", c.socket, "-write", stage).CombinedOutput()
			cert, _ := os.ReadFile(filepath.Join(stage, "svid.0.pem"))
			if err == nil && string(cert) != string(last) {
				last = cert
				for from, to := range map[string]string{"svid.0.key": c.svidKey, "bundle.0.pem": c.svidBundle, "svid.0.pem": c.svid} {
					if err := os.Rename(filepath.Join(stage, from), filepath.Join(c.certDir, to)); err != nil {
						t.Errorf("stand-in helper: %v", err)
						return
					}
				}
				sig := signals[c.renewSignal]
				if c.pidFile != "" {
					if pid, err := readPID(c.pidFile); err == nil {
						_ = syscall.Kill(pid, sig)
					}
				}
				if c.cmd != "" {
					if child == nil {
						child = startApp(t, c.cmd, c.cmd, strings.Fields(c.cmdArgs)...)
					} else {
						_ = child.cmd.Process.Signal(sig)
					}
				}
			} else if err != nil && ctx.Err() == nil {
				t.Logf("stand-in helper: api fetch: %v\n%s", err, out)
			}
			select {
			case <-ctx.Done():
			case <-time.After(200 * time.Millisecond):
			}
		}
	}()
}

// runHelper runs `lanyard helper` on c until the test ends, when it must
// stop (and stop its cmd) and exit 0 on SIGTERM.
func runHelper(t *testing.T, c helperConfig) *testkit.Process {
	t.Helper()
	path := filepath.Join(t.TempDir(), "helper.conf")
	if err := os.WriteFile(path, []byte(c.hcl()), 0o600); err != nil {
		t.Fatal(err)
	}
	p, err := testkit.Start(t, lanyardBin, "helper", "-config", path)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// haveHelper reports whether this branch's lanyard has `lanyard helper`.
func haveHelper(t *testing.T) bool {
	out, _ := testkit.RunCLI(t, lanyardBin, "helper", "-h")
	return !strings.Contains(out, `unknown command "helper"`)
}

// requireHelper skips until this branch has `lanyard helper`.
func requireHelper(t *testing.T) {
	t.Helper()
	if !haveHelper(t) {
		t.Skip("lanyard helper is not on this branch yet")
	}
}

// feed feeds an app with c: with `lanyard helper` once this branch has
// it, else with the stand-in.
func feed(t *testing.T, c helperConfig) {
	t.Helper()
	if haveHelper(t) {
		runHelper(t, c)
		return
	}
	feedWithAPIFetch(t, c)
}
