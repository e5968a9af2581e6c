package systemd_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Bounds of the container's waits, generous for 2 shared cores: systemd is
// "running" in about half a second and halts in about 1.5 s.
const (
	bootTimeout = 60 * time.Second
	haltTimeout = 30 * time.Second
	pollEvery   = 50 * time.Millisecond
	// cgroupPrefix and the test process's PID name each container's
	// cgroups and bind dir; a run removes what a killed one left.
	cgroupPrefix = "lanyard-nspawn-"
)

// container is a Debian root booted with systemd-nspawn, systemd as its
// PID 1, in cgroups of its own (nspawn would share the launching process's
// otherwise), driven with nsenter: machinectl needs systemd-machined,
// which a host without systemd lacks.
type container struct {
	t        testing.TB
	name     string
	cgroups  []string // one dir per cgroup hierarchy
	nspawn   *exec.Cmd
	exited   chan struct{}
	pid1     int
	logPath  string
	halted   bool
	inBind   string // the host dir bound at /inside
	nspawnEr error  // nspawn's exit, set before exited closes
}

// cgroupRoots are where the container's cgroups go: the named systemd
// hierarchy and the unified one of a hybrid host, or the root of a pure
// cgroup v2 host.
func cgroupRoots() ([]string, error) {
	var roots []string
	for _, dir := range []string{"/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified"} {
		if _, err := os.Stat(filepath.Join(dir, "cgroup.procs")); err == nil {
			roots = append(roots, dir)
		}
	}
	if len(roots) > 0 {
		return roots, nil
	}
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err == nil {
		return []string{"/sys/fs/cgroup"}, nil
	}
	return nil, errors.New("no systemd or unified cgroup hierarchy under /sys/fs/cgroup")
}

// bootContainer boots root (never written: --volatile=overlay) with bind
// at /inside, waits until systemd is running, and stops and removes
// everything when t ends, even when it fails.
func bootContainer(t testing.TB, root, bind string) *container {
	t.Helper()
	roots, err := cgroupRoots()
	if err != nil {
		t.Fatal(err)
	}
	if err := sweepCgroups(roots); err != nil {
		t.Fatalf("removing the cgroups of an earlier run: %v", err)
	}
	c := &container{t: t, name: fmt.Sprintf("%s%d", cgroupPrefix, os.Getpid()), exited: make(chan struct{}), inBind: bind}
	c.logPath = filepath.Join(bind, "nspawn.log")
	t.Cleanup(c.stop)
	for _, r := range roots {
		dir := filepath.Join(r, c.name)
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		c.cgroups = append(c.cgroups, dir)
	}
	// The shell joins the cgroups, then becomes nspawn: everything nspawn
	// starts is in them from its first instruction.
	var join strings.Builder
	for i := range c.cgroups {
		fmt.Fprintf(&join, `echo $$ > "$%d/cgroup.procs" && `, i+1)
	}
	script := join.String() + `exec systemd-nspawn --register=no --keep-unit --quiet --boot --volatile=overlay` +
		` --directory="$ROOT" --machine="$NAME" --console=passive --bind="$BIND":/inside`
	logFile, err := os.Create(c.logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logFile.Close()
	c.nspawn = exec.Command("sh", append([]string{"-c", script, "sh"}, c.cgroups...)...)
	c.nspawn.Env = append(os.Environ(), "ROOT="+root, "NAME="+c.name, "BIND="+bind)
	c.nspawn.Stdout, c.nspawn.Stderr = logFile, logFile
	// A killed test halts the container too: SIGTERM is nspawn's halt.
	c.nspawn.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	if err := c.nspawn.Start(); err != nil {
		t.Fatalf("starting systemd-nspawn: %v", err)
	}
	go func() {
		c.nspawnEr = c.nspawn.Wait()
		close(c.exited)
	}()
	begin := time.Now()
	c.waitPID1()
	state := c.waitBooted(begin.Add(bootTimeout))
	if state != "running" {
		failed, _ := c.run("systemctl", "--failed", "--no-legend")
		t.Logf("container %s booted %s; failed units:\n%s", c.name, state, failed)
	}
	t.Logf("container %s: systemd %s after %s (PID 1 is host PID %d)", c.name, state, time.Since(begin).Round(10*time.Millisecond), c.pid1)
	return c
}

// waitBooted waits until systemd has booted and returns its state:
// "running", or "degraded" when a unit failed (reported, not fatal: the
// test's units are what count). Until PID 1 listens on its private bus,
// systemctl fails to connect; is-system-running --wait then waits for the
// boot to end.
func (c *container) waitBooted(deadline time.Time) string {
	c.t.Helper()
	for {
		out, _ := c.runBounded(time.Until(deadline), "systemctl", "is-system-running", "--wait")
		state := strings.TrimSpace(out)
		switch state {
		case "running", "degraded", "maintenance", "stopping":
			return state
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("systemd in container %s did not finish booting: %q; nspawn's output:\n%s", c.name, state, c.log())
		}
		time.Sleep(pollEvery)
	}
}

// waitPID1 finds the container's PID 1: nspawn's one child.
func (c *container) waitPID1() {
	c.t.Helper()
	deadline := time.Now().Add(bootTimeout)
	children := fmt.Sprintf("/proc/%d/task/%d/children", c.nspawn.Process.Pid, c.nspawn.Process.Pid)
	for {
		select {
		case <-c.exited:
			c.t.Fatalf("systemd-nspawn exited: %v; its output:\n%s", c.nspawnEr, c.log())
		default:
		}
		data, _ := os.ReadFile(children)
		if f := strings.Fields(string(data)); len(f) == 1 {
			pid, err := strconv.Atoi(f[0])
			if err == nil && c.isSystemd(pid) {
				c.pid1 = pid
				return
			}
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("systemd-nspawn started no systemd after %s; its output:\n%s", bootTimeout, c.log())
		}
		time.Sleep(pollEvery)
	}
}

// isSystemd says whether pid runs systemd (nspawn's child first runs
// nspawn's own code, then executes the container's init).
func (c *container) isSystemd(pid int) bool {
	exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
	return err == nil && strings.HasSuffix(exe, "/systemd")
}

func (c *container) log() string {
	data, _ := os.ReadFile(c.logPath)
	return string(data)
}

// run runs a command inside the container, in all of its PID 1's
// namespaces, with its output; bounded.
func (c *container) run(args ...string) (string, error) {
	return c.runBounded(time.Minute, args...)
}

func (c *container) runBounded(bound time.Duration, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), bound)
	defer cancel()
	cmd := exec.CommandContext(ctx, "nsenter", append([]string{"-t", strconv.Itoa(c.pid1), "-a"}, args...)...)
	// Inside, the host's variables (PATH aside) would mislead systemctl.
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8", "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0"}
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		return string(out), fmt.Errorf("%s: not done after %s:\n%s", strings.Join(args, " "), bound, out)
	}
	if err != nil {
		return string(out), fmt.Errorf("%s: %w:\n%s", strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

// must runs a command inside, failing the test if it fails.
func (c *container) must(args ...string) string {
	c.t.Helper()
	out, err := c.run(args...)
	if err != nil {
		c.t.Fatal(err)
	}
	return out
}

// path is where the host sees path of the container's file system: through
// its PID 1's root, so files written there land in the container's overlay.
func (c *container) path(path string) string {
	return filepath.Join(fmt.Sprintf("/proc/%d/root", c.pid1), path)
}

// stop halts the container (SIGTERM to nspawn), kills whatever is left if
// it does not halt in time, and removes its cgroups.
func (c *container) stop() {
	if c.halted {
		return
	}
	c.halted = true
	if c.nspawn != nil && c.nspawn.Process != nil {
		begin := time.Now()
		_ = c.nspawn.Process.Signal(syscall.SIGTERM) // fails only if it exited
		select {
		case <-c.exited:
			if c.nspawnEr != nil {
				c.t.Errorf("container %s: systemd-nspawn exited with %v after SIGTERM; its output:\n%s", c.name, c.nspawnEr, c.log())
			} else {
				c.t.Logf("container %s halted in %s", c.name, time.Since(begin).Round(10*time.Millisecond))
			}
		case <-time.After(haltTimeout):
			c.t.Errorf("container %s did not halt %s after SIGTERM; killing it", c.name, haltTimeout)
			_ = c.nspawn.Process.Kill()
			<-c.exited // SIGKILL cannot be ignored
		}
	}
	if err := removeCgroups(c.cgroups); err != nil {
		c.t.Errorf("removing the container's cgroups: %v", err)
	}
}

// sweepCgroups removes the cgroups a killed run left, killing what still
// runs in them; a cgroup is named after its test process, so those of a
// test still running are left alone.
func sweepCgroups(roots []string) error {
	var stale []string
	for _, r := range roots {
		dirs, _ := filepath.Glob(filepath.Join(r, cgroupPrefix+"*"))
		for _, d := range dirs {
			pid, err := strconv.Atoi(strings.TrimPrefix(filepath.Base(d), cgroupPrefix))
			if err == nil && alive(pid) {
				continue
			}
			stale = append(stale, d)
		}
	}
	return removeCgroups(stale)
}

// alive says whether process pid exists.
func alive(pid int) bool { return syscall.Kill(pid, 0) == nil }

// removeCgroups kills any process left in the cgroups (a container that
// did not halt) and removes them, children first. A cgroup's last process
// takes a moment to leave after SIGKILL, so each removal is retried,
// bounded.
func removeCgroups(dirs []string) error {
	var errs []error
	for _, dir := range dirs {
		var tree []string
		_ = filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				tree = append(tree, p)
			}
			return nil
		})
		for i := len(tree) - 1; i >= 0; i-- {
			if err := removeCgroup(tree[i]); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

func removeCgroup(dir string) error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := os.Remove(dir)
		if err == nil || errors.Is(err, os.ErrNotExist) {
			return nil
		}
		data, _ := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
		for _, f := range strings.Fields(string(data)) {
			if pid, perr := strconv.Atoi(f); perr == nil {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: %w (processes: %q)", dir, err, strings.Fields(string(data)))
		}
		time.Sleep(pollEvery)
	}
}
