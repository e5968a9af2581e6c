package files

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testkit"
)

var (
	installOnce sync.Once
	installErr  error
)

// requireApp returns the path of an app's command, installing nginx-light
// and haproxy from Debian once (scripts/install-debian.sh) when one is
// missing. Without root the test skips, except under CI, where it fails.
func requireApp(t *testing.T, command string) string {
	t.Helper()
	testkit.RequireRoot(t, "installs nginx and HAProxy from Debian and runs them")
	installOnce.Do(func() {
		script, err := testkit.RepoFile("scripts/install-debian.sh")
		if err != nil {
			installErr = err
			return
		}
		out, err := exec.Command("sh", script, "nginx-light:nginx", "haproxy:haproxy").CombinedOutput()
		if err != nil {
			installErr = fmt.Errorf("%s: %v\n%s", script, err, out)
		}
	})
	if installErr != nil {
		t.Fatal(installErr)
	}
	if p, err := exec.LookPath(command); err == nil {
		return p
	}
	// Debian puts both in /usr/sbin, which a non-login PATH may lack.
	p := filepath.Join("/usr/sbin", command)
	if _, err := os.Stat(p); err != nil {
		t.Fatalf("%s is not installed after scripts/install-debian.sh: %v", command, err)
	}
	return p
}

// app is a daemon the test started: stopped with SIGTERM on cleanup, its
// output shown if the test failed.
type app struct {
	name   string
	cmd    *exec.Cmd
	out    *testkit.Buffer
	exited chan struct{}
}

func startApp(t *testing.T, name, bin string, args ...string) *app {
	t.Helper()
	a := &app{name: name, cmd: exec.Command(bin, args...), out: &testkit.Buffer{}, exited: make(chan struct{})}
	a.cmd.Stdout, a.cmd.Stderr = a.out, a.out
	a.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := a.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		_ = a.cmd.Wait()
		close(a.exited)
	}()
	t.Cleanup(func() {
		stopProcess(t, name, a.cmd.Process, a.exited)
		if t.Failed() {
			t.Logf("%s output:\n%s", name, a.out.String())
		}
	})
	return a
}

// stopProcess sends SIGTERM and waits a bounded time before SIGKILL.
func stopProcess(t *testing.T, name string, p *os.Process, exited <-chan struct{}) {
	select {
	case <-exited:
		return
	default:
	}
	_ = p.Signal(syscall.SIGTERM)
	select {
	case <-exited:
	case <-time.After(15 * time.Second):
		_ = p.Kill()
		<-exited
		t.Errorf("%s did not exit within 15s of SIGTERM", name)
	}
}

// waitListening waits until something accepts TCP connections on port.
func waitListening(t *testing.T, port int, what string, exited <-chan struct{}) {
	t.Helper()
	testkit.WaitFor(t, 20*time.Second, what+" to listen", func() bool {
		select {
		case <-exited:
			t.Fatalf("%s exited before listening", what)
		default:
		}
		c, err := net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(port), time.Second)
		if err != nil {
			return false
		}
		c.Close()
		return true
	})
}

// requireStopped fails the test if the process in pidFile still runs
// (the helper must stop its cmd when it stops), and kills it.
func requireStopped(t *testing.T, name, pidFile string) {
	pid, err := readPID(pidFile)
	if err != nil {
		t.Errorf("%s's pid file: %v", name, err)
		return
	}
	gone := func() bool { return syscall.Kill(pid, 0) == syscall.ESRCH }
	deadline := time.Now().Add(10 * time.Second)
	for !gone() && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if !gone() {
		t.Errorf("%s (pid %d) still runs after the helper stopped", name, pid)
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
}

// readPID reads a daemon's pid file.
func readPID(path string) (int, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	pid, err := strconv.Atoi(string(bytes.TrimSpace(b)))
	if err != nil || pid <= 0 {
		return 0, fmt.Errorf("pid file %s: %q is not a pid", path, b)
	}
	return pid, nil
}

// nginxConf serves "ok" over TLS with client certificates required and
// verified against the bundle file; every path nginx writes is under dir.
const nginxConf = `
pid %[1]s/nginx.pid;
error_log %[1]s/error.log info;
worker_processes 1;
events { worker_connections 256; }
http {
    access_log off;
    client_body_temp_path %[1]s/body;
    proxy_temp_path %[1]s/proxy;
    fastcgi_temp_path %[1]s/fastcgi;
    uwsgi_temp_path %[1]s/uwsgi;
    scgi_temp_path %[1]s/scgi;
    server {
        listen 127.0.0.1:%[2]d ssl;
        ssl_certificate %[3]s/svid.pem;
        ssl_certificate_key %[3]s/svid_key.pem;
        ssl_client_certificate %[3]s/svid_bundle.pem;
        ssl_verify_client on;
        ssl_verify_depth 3;
        location / { return 200 "ok\n"; }
    }
}
`

// nginx is an nginx master in the foreground (daemon off) with its own
// prefix, config, logs and pid file under dir.
type nginx struct {
	*app
	dir, pidFile string
	port         int
}

// newNginx prepares nginx's directory; its pid file is known before it
// starts, for the helper's pid_file_name.
func newNginx(t *testing.T) *nginx {
	n := &nginx{dir: t.TempDir()}
	n.pidFile = filepath.Join(n.dir, "nginx.pid")
	return n
}

// start runs nginx on a free port with the certificates in certDir.
func (n *nginx) start(t *testing.T, bin, certDir string) {
	t.Helper()
	n.port = testkit.FreePort(t)
	conf := filepath.Join(n.dir, "nginx.conf")
	if err := os.WriteFile(conf, []byte(fmt.Sprintf(nginxConf, n.dir, n.port, certDir)), 0o600); err != nil {
		t.Fatal(err)
	}
	n.app = startApp(t, "nginx", bin, "-p", n.dir, "-c", conf, "-e", filepath.Join(n.dir, "error.log"), "-g", "daemon off;")
	waitListening(t, n.port, "nginx", n.exited)
	testkit.WaitFor(t, 10*time.Second, "nginx's pid file", func() bool {
		pid, err := readPID(n.pidFile)
		return err == nil && pid == n.cmd.Process.Pid
	})
}

// errorLog is nginx's error log, for failure messages.
func (n *nginx) errorLog() string {
	b, err := os.ReadFile(filepath.Join(n.dir, "error.log"))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err.Error()
	}
	return strings.TrimSpace(string(b))
}

// haproxyConf terminates TLS with the SVID (the key in <crt>.key, which
// HAProxy loads when the crt file has none), requires and verifies client
// certificates against the bundle file, and answers "ok". The admin socket
// exposes the listeners so a reload hands them to the new worker instead
// of closing them.
const haproxyConf = `
global
    maxconn 256
    stats socket %[1]s/admin.sock mode 600 level admin expose-fd listeners
defaults
    mode http
    timeout connect 5s
    timeout client 10s
    timeout server 10s
frontend tls
    bind 127.0.0.1:%[2]d ssl crt %[3]s/svid.pem ca-file %[3]s/svid_bundle.pem verify required
    http-request return status 200 content-type text/plain string ok
`

// writeHAProxyConf writes the config into a new directory and returns its
// path and the port it listens on.
func writeHAProxyConf(t *testing.T, certDir string) (conf string, port int) {
	t.Helper()
	dir := testkit.ShortDir(t, "haproxy-")
	port = testkit.FreePort(t)
	conf = filepath.Join(dir, "haproxy.cfg")
	if err := os.WriteFile(conf, []byte(fmt.Sprintf(haproxyConf, dir, port, certDir)), 0o600); err != nil {
		t.Fatal(err)
	}
	return conf, port
}
