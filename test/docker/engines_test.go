package docker_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testkit"
)

// Bounds of the waits; generous because the machine has 2 shared cores.
// dockerd is ready in 0.2-2.6 s, podman's service in about 0.3 s, and
// podman's service takes a few seconds to stop.
const (
	startTimeout = 60 * time.Second
	stopTimeout  = 30 * time.Second
	toolTimeout  = 2 * time.Minute
	pollEvery    = 100 * time.Millisecond
)

// engine is a container engine the test started, with its own data root,
// state and API socket, and the CLI that drives it.
type engine struct {
	name   string // "docker" or "podman"
	dir    string // everything of the engine is under it
	socket string // the Engine API's unix socket
	cli    []string
	env    []string
	t      *testing.T
	// service is the API daemon (dockerd, podman system service).
	service *daemon
	// seen counts, by container, the output lines a wait has looked at.
	seen map[string]int
}

// daemon is a process the test started, its output in a log file.
type daemon struct {
	name string
	log  string
	cmd  *exec.Cmd
	done chan struct{}
}

// startDaemon starts a daemon that dies with the test binary (Pdeathsig)
// and is stopped when the test ends, even when it fails.
func startDaemon(t *testing.T, dir, name string, env []string, args ...string) *daemon {
	t.Helper()
	logPath := filepath.Join(dir, name+".log")
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logFile.Close()
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Stdout, cmd.Stderr, cmd.Dir = logFile, logFile, dir
	cmd.Env = append(os.Environ(), env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", name, err)
	}
	d := &daemon{name: name, log: logPath, cmd: cmd, done: make(chan struct{})}
	go func() {
		_ = cmd.Wait()
		close(d.done)
	}()
	t.Cleanup(d.stop)
	return d
}

// stop ends the daemon with SIGTERM, then SIGKILL if it does not exit in
// time.
func (d *daemon) stop() {
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.done:
		return
	case <-time.After(stopTimeout):
	}
	_ = d.cmd.Process.Kill()
	<-d.done
}

func (d *daemon) exited() bool {
	select {
	case <-d.done:
		return true
	default:
		return false
	}
}

// waitSocket waits until the daemon answers GET /_ping on socket.
func (d *daemon) waitSocket(t *testing.T, socket string) {
	t.Helper()
	deadline := time.Now().Add(startTimeout)
	for {
		if d.exited() {
			t.Fatalf("%s exited while starting:\n%s", d.name, tail(d.log))
		}
		if pingUnix(socket) == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not serve %s within %s:\n%s", d.name, socket, startTimeout, tail(d.log))
		}
		time.Sleep(pollEvery)
	}
}

// tail is the end of a log file, for failure messages.
func tail(path string) string {
	data, _ := os.ReadFile(path)
	if len(data) > 4096 {
		data = data[len(data)-4096:]
	}
	return string(data)
}

// startDocker runs containerd and dockerd from Debian with their own
// roots and sockets. dockerd gets a containerd of its own: otherwise it
// adopts any containerd at /run/containerd/containerd.sock (the k8s
// tests' may run meanwhile).
func startDocker(t *testing.T) *engine {
	t.Helper()
	dir := testkit.ShortDir(t, "ldk")
	ctrdSock := filepath.Join(dir, "containerd.sock")
	config := fmt.Sprintf(`version = 2
root = %q
state = %q
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = %q
[ttrpc]
  address = %q
`, filepath.Join(dir, "containerd-root"), filepath.Join(dir, "containerd-state"), ctrdSock, ctrdSock+".ttrpc")
	writeFile(t, filepath.Join(dir, "containerd.toml"), config)
	e := &engine{name: "docker", dir: dir, socket: filepath.Join(dir, "docker.sock"), t: t, seen: map[string]int{}}
	e.cli = []string{"docker", "-H", "unix://" + e.socket}
	// Cleanups run last-in first-out: the leftovers check after all.
	t.Cleanup(func() { checkNothingLeft(t, dir) })
	// What dockerd and runc make outside their roots.
	removeIfNew(t, "/run/docker", "/run/docker/plugins", "/run/containerd", "/run/containerd/s")
	removeIfNew(t, cgroupDirs("docker")...)
	ctrd := startDaemon(t, dir, "containerd", nil, "containerd", "--config", filepath.Join(dir, "containerd.toml"))
	testkit.WaitFor(t, startTimeout, "containerd's socket", func() bool {
		_, err := os.Stat(ctrdSock)
		return err == nil || ctrd.exited()
	})
	if ctrd.exited() {
		t.Fatalf("containerd exited while starting:\n%s", tail(ctrd.log))
	}
	e.service = startDaemon(t, dir, "dockerd", nil, "dockerd",
		"--containerd", ctrdSock,
		"--data-root", filepath.Join(dir, "data"),
		"--exec-root", filepath.Join(dir, "exec"),
		"--pidfile", filepath.Join(dir, "dockerd.pid"),
		"--iptables=false", "--ip-masq=false", "--bridge=none",
		"-H", "unix://"+e.socket)
	e.service.waitSocket(t, e.socket)
	// Before the daemons stop: their containers go first.
	t.Cleanup(e.removeContainers)
	return e
}

// startPodman runs Podman's Docker-compatible API service with its own
// storage, run root and temp dir (the settings this machine needs are in
// shared/REAL-COMPONENTS.md).
func startPodman(t *testing.T) *engine {
	t.Helper()
	dir := testkit.ShortDir(t, "lpm")
	conf := fmt.Sprintf(`[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = %q
lock_type = "file"
[containers]
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]
`, filepath.Join(dir, "tmp"))
	writeFile(t, filepath.Join(dir, "containers.conf"), conf)
	e := &engine{name: "podman", dir: dir, socket: filepath.Join(dir, "podman.sock"), t: t, seen: map[string]int{}}
	e.env = []string{"CONTAINERS_CONF=" + filepath.Join(dir, "containers.conf")}
	e.cli = []string{"podman", "--root", filepath.Join(dir, "root"), "--runroot", filepath.Join(dir, "runroot"), "--storage-driver", "overlay"}
	t.Cleanup(func() { checkNothingLeft(t, dir) })
	// What podman makes outside its roots: its image copies' cache (in
	// Debian's 4.3 not under --root) and its cgroups.
	removeIfNew(t, "/var/lib/containers", "/var/lib/containers/cache", "/var/lib/containers/cache/blob-info-cache-v1.boltdb")
	removeIfNew(t, cgroupDirs("libpod_parent")...)
	removeIfNew(t, cgroupDirs("libpod_parent/conmon")...)
	// containers/storage's overlay driver makes its dir a bind mount of
	// its own and leaves it for the next podman command; two commands at
	// once may each mount it, so unmount until it is no mount point.
	t.Cleanup(func() {
		overlay := filepath.Join(dir, "root", "overlay")
		for range 8 {
			err := syscall.Unmount(overlay, 0)
			if errors.Is(err, syscall.EINVAL) || errors.Is(err, syscall.ENOENT) {
				return
			}
			if err != nil {
				t.Errorf("unmounting %s: %v", overlay, err)
				return
			}
		}
		t.Errorf("%s is still a mount point after 8 unmounts", overlay)
	})
	e.startService()
	t.Cleanup(e.removeContainers)
	return e
}

// startService (re)starts podman system service.
func (e *engine) startService() {
	e.t.Helper()
	args := append(append([]string{}, e.cli...), "system", "service", "--time=0", "unix://"+e.socket)
	e.service = startDaemon(e.t, e.dir, "podman-service", e.env, args...)
	e.service.waitSocket(e.t, e.socket)
}

// stopService stops the API daemon; Podman's containers keep running
// under their conmon.
func (e *engine) stopService() {
	e.service.stop()
	os.Remove(e.socket)
}

// run runs the engine's CLI and returns its output.
func (e *engine) run(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), toolTimeout)
	defer cancel()
	argv := append(append([]string{}, e.cli...), args...)
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), e.env...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return string(out), fmt.Errorf("%s: %w\n%s", strings.Join(argv, " "), err, stderr.String())
	}
	return string(out), nil
}

func (e *engine) mustRun(args ...string) string {
	e.t.Helper()
	out, err := e.run(args...)
	if err != nil {
		e.t.Fatal(err)
	}
	return strings.TrimSpace(out)
}

// removeContainers removes every container of the engine, running or not.
func (e *engine) removeContainers() {
	var err error
	if e.name == "podman" {
		_, err = e.run("rm", "--force", "--all", "--time", "0")
	} else {
		var ids string
		if ids, err = e.run("ps", "--all", "--quiet"); err == nil && strings.TrimSpace(ids) != "" {
			_, err = e.run(append([]string{"rm", "--force"}, strings.Fields(ids)...)...)
		}
	}
	if err != nil {
		e.t.Errorf("removing the %s containers: %v", e.name, err)
	}
}

// logLines is the container's output so far.
func (e *engine) logLines(id string) []string {
	out, err := e.run("logs", id)
	if err != nil {
		e.t.Logf("%s logs %s: %v", e.name, id, err)
		return nil
	}
	return strings.Split(strings.TrimSpace(out), "\n")
}

// waitLine waits for a line of the container's output, after the line
// the last wait matched, for which match holds, and returns it.
func (e *engine) waitLine(id, what string, match func(string) bool) string {
	e.t.Helper()
	deadline := time.Now().Add(startTimeout)
	for {
		lines := e.logLines(id)
		for i := e.seen[id]; i < len(lines); i++ {
			if match(lines[i]) {
				e.seen[id] = i + 1
				e.t.Logf("%s container %.12s: %s", e.name, id, lines[i])
				return lines[i]
			}
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("%s container %.12s: no %s within %s; its last lines:\n%s", e.name, id, what, startTimeout, strings.Join(lines[max(0, len(lines)-5):], "\n"))
		}
		time.Sleep(pollEvery)
	}
}

func writeFile(t *testing.T, path, data string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
}

// checkNothingLeft fails the test when a process or a mount of the
// engine's dir outlives it.
func checkNothingLeft(t *testing.T, dir string) {
	var left []string
	entries, _ := os.ReadDir("/proc")
	for _, ent := range entries {
		cmdline, err := os.ReadFile(filepath.Join("/proc", ent.Name(), "cmdline"))
		if err == nil && bytes.Contains(cmdline, []byte(dir)) {
			left = append(left, "process "+ent.Name()+": "+string(bytes.ReplaceAll(cmdline, []byte{0}, []byte{' '})))
		}
	}
	mounts, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Error(err)
	}
	for line := range strings.Lines(string(mounts)) {
		if strings.Contains(line, dir) {
			left = append(left, "mount: "+strings.TrimSpace(line))
			if f := strings.Fields(line); len(f) > 4 {
				_ = syscall.Unmount(f[4], syscall.MNT_DETACH)
			}
		}
	}
	if len(left) > 0 {
		t.Errorf("left behind by the engine in %s:\n%s", dir, strings.Join(left, "\n"))
	}
}

// removeIfNew removes, when the test ends, those of paths that do not
// exist now: files, and directories once empty (a cgroup directory once no
// process is in it). Give parents before their children.
func removeIfNew(t *testing.T, paths ...string) {
	var fresh []string
	for _, p := range paths {
		if _, err := os.Lstat(p); errors.Is(err, os.ErrNotExist) {
			fresh = append(fresh, p)
		}
	}
	t.Cleanup(func() {
		for _, p := range slices.Backward(fresh) {
			removeWhenFree(t, p)
		}
	})
}

// removeWhenFree removes a file or an empty directory. A cgroup dir stays
// busy until its exited processes are reaped (conmon's by PID 1, a moment
// after they exit), so a busy one is tried again for a while.
func removeWhenFree(t *testing.T, path string) {
	deadline := time.Now().Add(stopTimeout)
	err := os.Remove(path)
	for errors.Is(err, syscall.EBUSY) && time.Now().Before(deadline) {
		time.Sleep(pollEvery)
		err = os.Remove(path)
	}
	switch {
	case errors.Is(err, syscall.ENOTEMPTY):
		// A shared dir (/run/containerd/s) another daemon uses now, such
		// as the k8s tests' containerd: theirs to remove.
		t.Logf("%s is in use by others: left", path)
	case err != nil && !errors.Is(err, os.ErrNotExist):
		t.Errorf("left behind: %v", err)
	}
}

// cgroupDirs is the cgroup directory rel in every mounted hierarchy.
func cgroupDirs(rel string) []string {
	hierarchies, _ := filepath.Glob("/sys/fs/cgroup/*")
	dirs := make([]string, 0, len(hierarchies))
	for _, h := range hierarchies {
		dirs = append(dirs, filepath.Join(h, rel))
	}
	return dirs
}

// pingUnix sends GET /_ping to an Engine API socket.
func pingUnix(socket string) error {
	c := http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
	}}
	resp, err := c.Get("http://engine/_ping")
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 64))
	if resp.StatusCode != http.StatusOK || string(body) != "OK" {
		return fmt.Errorf("ping answered %s %q", resp.Status, body)
	}
	return nil
}
