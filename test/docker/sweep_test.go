package docker_test

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Every dir a test of this package makes under os.TempDir() starts with
// one of these (testkit.ShortDir's prefixes): engines, agent sockets,
// bind-mount targets, workload copies.
var dirPrefixes = []string{"ldk", "lpm", "lda", "ldm", "ldw"}

// lockMachine makes the tests of this package on a machine run one at a
// time, so that each may sweep what a killed run left (sweepStale): a
// killed test runs no cleanup, and its containers outlive their daemons
// (the daemons die with the test binary; shims, conmon and containers do
// not).
func lockMachine(t *testing.T) {
	t.Helper()
	f, err := os.OpenFile(filepath.Join(os.TempDir(), "lanyard-docker-tests.lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		f.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() }) // closing releases the lock, after every other cleanup
	if err := sweepStale(); err != nil {
		t.Fatalf("sweeping what an earlier, killed run left: %v", err)
	}
}

// sweepStale kills the processes of earlier runs (those whose command
// line names one of their dirs, and all their descendants: the
// containers), unmounts what is mounted under those dirs, and removes
// them, and the engines' cgroups they leave empty.
func sweepStale() error {
	var dirs []string
	for _, p := range dirPrefixes {
		m, _ := filepath.Glob(filepath.Join(os.TempDir(), p+"*"))
		dirs = append(dirs, m...)
	}
	if len(dirs) == 0 {
		return nil
	}
	victims := staleProcesses(dirs)
	for _, pid := range victims {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	deadline := time.Now().Add(stopTimeout)
	for _, pid := range victims {
		for syscall.Kill(pid, 0) == nil && !isZombie(pid) {
			if time.Now().After(deadline) {
				return errors.New("process " + strconv.Itoa(pid) + " of an earlier run does not exit")
			}
			time.Sleep(pollEvery)
		}
	}
	mounts, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return err
	}
	lines := strings.Split(string(mounts), "\n")
	for _, line := range slices.Backward(lines) {
		f := strings.Fields(line)
		if len(f) > 4 && slices.ContainsFunc(dirs, func(d string) bool { return strings.HasPrefix(f[4], d+"/") }) {
			_ = syscall.Unmount(f[4], syscall.MNT_DETACH)
		}
	}
	for _, d := range dirs {
		if err := os.RemoveAll(d); err != nil {
			return err
		}
	}
	// Podman 4.3 keeps its blob info cache there whatever its --root; a
	// killed run may have made it. It is only a cache: another podman
	// loses nothing but lookups.
	if slices.ContainsFunc(dirs, func(d string) bool { return strings.HasPrefix(filepath.Base(d), "lpm") }) {
		for _, p := range []string{"/var/lib/containers/cache/blob-info-cache-v1.boltdb", "/var/lib/containers/cache", "/var/lib/containers"} {
			_ = os.Remove(p)
		}
	}
	// The killed containers' cgroups, now empty, then their parents; a
	// cgroup still in use (another engine's) refuses rmdir.
	for _, parent := range []string{"docker", "libpod_parent"} {
		for _, dir := range cgroupDirs(parent) {
			children, _ := filepath.Glob(filepath.Join(dir, "*"))
			for _, c := range children {
				if fi, err := os.Stat(c); err == nil && fi.IsDir() {
					_ = os.Remove(c)
				}
			}
			_ = os.Remove(dir)
		}
	}
	return nil
}

// staleProcesses is every process whose command line names one of dirs,
// with its descendants.
func staleProcesses(dirs []string) []int {
	parent := map[int]int{}
	var pids []int
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		stat, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// The fields after the command's ")" are: state, ppid, ...
		if _, rest, ok := strings.Cut(string(stat), ") "); ok {
			if f := strings.Fields(rest); len(f) > 1 {
				parent[pid], _ = strconv.Atoi(f[1])
			}
		}
		cmdline, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if slices.ContainsFunc(dirs, func(d string) bool { return strings.Contains(string(cmdline), d) }) {
			pids = append(pids, pid)
		}
	}
	// Descendants, in rounds: a process tree is shallow.
	for grew := true; grew; {
		grew = false
		for pid, ppid := range parent {
			if slices.Contains(pids, ppid) && !slices.Contains(pids, pid) {
				pids = append(pids, pid)
				grew = true
			}
		}
	}
	return pids
}

// isZombie reports whether pid has exited and waits for its parent.
func isZombie(pid int) bool {
	stat, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return true
	}
	_, rest, _ := strings.Cut(string(stat), ") ")
	return strings.HasPrefix(rest, "Z")
}
