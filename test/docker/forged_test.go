package docker_test

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/lanyard-dev/lanyard/internal/testkit"
)

// TestForgedCgroups: a host process dressed up as a running container gets
// none of its selectors, whichever of the two disguises it wears.
//
//   - Its mount namespace: any user may enter a user and mount namespace
//     and bind-mount the container's cgroup directory; /proc/<pid>/mountinfo
//     then shows a cgroup mount whose root names the container. Lanyard
//     reads only /proc/<pid>/cgroup, which the kernel writes.
//   - Its cgroup: under systemd, a user owns the cgroup tree of
//     user@<uid>.service and may name a cgroup there after any container.
//     Made here by root in a tree of its own, as such a user would; the
//     container's own process is not in it, so the attestor refuses.
func TestForgedCgroups(t *testing.T) {
	e, a, bin := dockerWithAgent(t)
	victim := e.runWorkload(a, workloadUser, workloadImage, "--label", "app=web", "--env", "ROLE=frontend")
	e.waitIDs(victim, "spiffe://example.org/label", "spiffe://example.org/env", "spiffe://example.org/image", "spiffe://example.org/label-and-env")
	victimID := e.mustRun("inspect", "--format", "{{.Id}}", victim)
	victimPID := e.mustRun("inspect", "--format", "{{.State.Pid}}", victim)
	cgroups, err := os.ReadFile("/proc/" + victimPID + "/cgroup")
	if err != nil {
		t.Fatal(err)
	}
	// The workload binary where uid workloadUser may run it.
	workload := filepath.Join(testkit.ShortDir(t, "ldw"), "workload")
	data, err := os.ReadFile(filepath.Join(bin, "workload"))
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, workload, string(data))
	if err := os.Chmod(workload, 0o755); err != nil {
		t.Fatal(err)
	}
	env := []string{"SPIFFE_ENDPOINT_SOCKET=unix://" + filepath.Join(a.socketDir, "agent.sock"), "WORKLOAD_INTERVAL=300ms"}
	asUser := []string{"setpriv", "--reuid", workloadUser, "--regid", workloadUser, "--clear-groups"}

	t.Run("mount namespace", func(t *testing.T) {
		dir := testkit.ShortDir(t, "ldm")
		var script strings.Builder
		for _, h := range victimHierarchies(t, cgroups) {
			target := filepath.Join(dir, filepath.Base(h.mount))
			if err := os.Mkdir(target, 0o755); err != nil {
				t.Fatal(err)
			}
			fmt.Fprintf(&script, "mount --bind %s %s || exit 1\n", filepath.Join(h.mount, h.path), target)
		}
		fmt.Fprintf(&script, "echo forged $(grep -c %s /proc/self/mountinfo)\nexec %s\n", victimID, workload)
		args := append(append([]string{}, asUser...), "unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script.String())
		cmd := exec.Command(args[0], args[1:]...)
		cmd.Env = append(os.Environ(), env...)
		child := testkit.StartChild(t, cmd)
		line, _ := child.Next(t, startTimeout)
		if n := strings.TrimPrefix(line, "forged "); n == line || n == "0" {
			t.Fatalf("the cgroup mounts were not made: %q; stderr:\n%s", line, child.Stderr)
		}
		expectDenied(t, child)
	})

	t.Run("cgroup named after the container", func(t *testing.T) {
		var suffix [6]byte
		_, _ = rand.Read(suffix[:])
		forged := "lanyard-forged-" + hex.EncodeToString(suffix[:]) + "/docker-" + victimID + ".scope"
		var script strings.Builder
		for _, h := range victimHierarchies(t, cgroups) {
			dir := filepath.Join(h.mount, forged)
			for _, d := range []string{filepath.Dir(dir), dir} {
				if err := os.Mkdir(d, 0o755); err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { removeWhenFree(t, d) })
				inheritCpuset(t, d)
			}
			fmt.Fprintf(&script, "echo $$ > %s/cgroup.procs || exit 1\n", dir)
		}
		fmt.Fprintf(&script, "exec %s %s\n", strings.Join(asUser, " "), workload)
		cmd := exec.Command("sh", "-c", script.String())
		cmd.Env = append(os.Environ(), env...)
		child := testkit.StartChild(t, cmd)
		expectDenied(t, child)
		own, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", cmd.Process.Pid))
		if err != nil || !strings.Contains(string(own), forged) {
			t.Fatalf("the workload is not in the forged cgroup (%v):\n%s", err, own)
		}
		testkit.WaitFor(t, startTimeout, "the agent to log the refusal", func() bool {
			return strings.Contains(a.proc.Logs.String(), "Refusing docker selectors")
		})
	})
	// The container itself is still itself.
	e.waitIDs(victim, "spiffe://example.org/label", "spiffe://example.org/env", "spiffe://example.org/image", "spiffe://example.org/label-and-env")
}

// expectDenied reads the workload's first fetch: refused, as uid
// workloadUser alone matches no entry.
func expectDenied(t *testing.T, child *testkit.Child) {
	t.Helper()
	line, ok := child.Next(t, startTimeout)
	if !ok || !strings.HasPrefix(line, "error ") || !strings.Contains(line, "PermissionDenied") {
		t.Fatalf("the forged workload's fetch: %q, want PermissionDenied; stderr:\n%s", line, child.Stderr)
	}
	t.Logf("forged workload: %s", line)
}

type hierarchy struct {
	mount string // where the hierarchy is mounted
	path  string // the victim's cgroup in it
}

// victimHierarchies maps the lines of a cgroup file to the mounts of this
// machine's hierarchies: a v1 controller (or a named hierarchy) at
// /sys/fs/cgroup/<controllers or name>, the unified one at
// /sys/fs/cgroup/unified (hybrid) or /sys/fs/cgroup (v2 only).
func victimHierarchies(t *testing.T, cgroups []byte) []hierarchy {
	t.Helper()
	var out []hierarchy
	for line := range strings.Lines(strings.TrimSpace(string(cgroups))) {
		f := strings.SplitN(strings.TrimSpace(line), ":", 3)
		if len(f) != 3 {
			t.Fatalf("cgroup line %q", line)
		}
		mount := filepath.Join("/sys/fs/cgroup", strings.TrimPrefix(f[1], "name="))
		if f[1] == "" {
			mount = "/sys/fs/cgroup/unified"
			if _, err := os.Stat(mount); err != nil {
				mount = "/sys/fs/cgroup"
			}
		}
		if _, err := os.Stat(filepath.Join(mount, f[2])); err != nil {
			t.Fatalf("the victim's cgroup %s: %v", line, err)
		}
		out = append(out, hierarchy{mount: mount, path: f[2]})
	}
	return out
}

// inheritCpuset gives a new v1 cpuset cgroup its parent's CPUs and memory
// nodes: a process cannot join one that has none.
func inheritCpuset(t *testing.T, dir string) {
	for _, name := range []string{"cpuset.cpus", "cpuset.mems"} {
		v, err := os.ReadFile(filepath.Join(filepath.Dir(dir), name))
		if errors.Is(err, os.ErrNotExist) {
			return // not a v1 cpuset hierarchy
		}
		if err == nil {
			err = os.WriteFile(filepath.Join(dir, name), v, 0)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
}
