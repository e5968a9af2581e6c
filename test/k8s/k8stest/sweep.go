package k8stest

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// cgroupRoot holds the cgroup hierarchies; with the cgroupfs driver the
// kubelet puts every pod under kubepods in each of them.
const cgroupRoot = "/sys/fs/cgroup"

// sweepStale removes what killed runs left: every cluster dir under
// os.TempDir() (the machine lock is held, so none is in use). It refuses to
// run next to a kubelet it did not start, which owns /kubepods.
func sweepStale() error {
	if pid, args := foreignKubelet(); pid != 0 {
		return fmt.Errorf("a kubelet that k8stest did not start runs (pid %d: %s); it would remove this cluster's pods, and this cluster its", pid, args)
	}
	dirs, err := filepath.Glob(filepath.Join(os.TempDir(), dirPrefix+"*"))
	if err != nil {
		return err
	}
	for _, dir := range dirs {
		if err := sweep(dir); err != nil {
			return err
		}
	}
	// Cgroups a killed run left after its dir was removed.
	return sweepCgroups()
}

// sweep leaves nothing of the cluster in dir: it kills the processes that
// name dir (daemons, containerd's shims) and every pod's processes, then
// unmounts what is mounted under dir, removes the kubepods cgroups, the
// kubelet's log symlinks to dir, and dir.
func sweep(dir string) error {
	if err := killNaming(dir); err != nil {
		return err
	}
	if err := sweepCgroups(); err != nil {
		return err
	}
	if err := unmountUnder(dir); err != nil {
		return err
	}
	removeLogLinks(dir)
	removeDevicePluginSocket()
	// containerd puts its shims' sockets here whatever its state dir; the
	// dirs go only when empty, so another containerd's stay.
	os.Remove(shimSocketDir)
	os.Remove(filepath.Dir(shimSocketDir))
	return os.RemoveAll(dir)
}

// processes lists every process's pid and command line.
func processes() map[int][]byte {
	procs := map[int][]byte{}
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue // exited meanwhile
		}
		procs[pid] = cmdline
	}
	return procs
}

// foreignKubelet is a running kubelet whose flags do not point into a
// k8stest dir.
func foreignKubelet() (int, string) {
	marker := []byte(filepath.Join(os.TempDir(), dirPrefix))
	for pid, cmdline := range processes() {
		args := bytes.Split(bytes.TrimRight(cmdline, "\x00"), []byte{0})
		if len(args) == 0 || filepath.Base(string(args[0])) != "kubelet" {
			continue
		}
		if !bytes.Contains(cmdline, marker) {
			return pid, string(bytes.ReplaceAll(cmdline, []byte{0}, []byte{' '}))
		}
	}
	return 0, ""
}

// killNaming SIGKILLs every process whose command line names dir, until
// none is left.
func killNaming(dir string) error {
	self := os.Getpid()
	// Every daemon and shim names a path in dir; dir alone could be the
	// prefix of another dir's name.
	inDir := []byte(dir + "/")
	return untilGone("processes naming "+dir, func() []int {
		var pids []int
		for pid, cmdline := range processes() {
			if pid != self && bytes.Contains(cmdline, inDir) {
				pids = append(pids, pid)
				removeShimSocket(cmdline)
			}
		}
		return pids
	})
}

// shimSocketDir is where containerd 1.6's shims listen, whatever its state
// dir; a killed shim leaves its socket there.
const shimSocketDir = "/run/containerd/s"

// removeShimSocket removes the socket of the shim with this command line
// (no-op for other processes): containerd names it by the SHA-256 of
// <containerd address>/<namespace>/<id>.
func removeShimSocket(cmdline []byte) {
	args := strings.Split(strings.TrimRight(string(cmdline), "\x00"), "\x00")
	if len(args) == 0 || filepath.Base(args[0]) != "containerd-shim-runc-v2" {
		return
	}
	flags := map[string]string{}
	for i := 1; i+1 < len(args); i++ {
		if strings.HasPrefix(args[i], "-") {
			flags[strings.TrimLeft(args[i], "-")] = args[i+1]
		}
	}
	if flags["address"] == "" || flags["namespace"] == "" || flags["id"] == "" {
		return
	}
	sum := sha256.Sum256([]byte(filepath.Join(flags["address"], flags["namespace"], flags["id"])))
	os.Remove(filepath.Join(shimSocketDir, hex.EncodeToString(sum[:])))
}

// untilGone kills the pids list returns until it returns none, bounded.
func untilGone(what string, list func() []int) error {
	deadline := time.Now().Add(stopTimeout)
	for {
		pids := list()
		if len(pids) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s still alive after %s: %v", what, stopTimeout, pids)
		}
		for _, pid := range pids {
			_ = syscall.Kill(pid, syscall.SIGKILL) // gone already is fine
		}
		time.Sleep(pollEvery)
	}
}

// kubepodsDirs are the kubepods cgroup of every hierarchy that has one.
func kubepodsDirs() []string {
	dirs, _ := filepath.Glob(filepath.Join(cgroupRoot, "*", "kubepods"))
	return dirs
}

// sweepCgroups kills every process in a kubepods cgroup and removes the
// cgroups, deepest first.
func sweepCgroups() error {
	err := untilGone("pod processes", func() []int {
		var pids []int
		for _, root := range kubepodsDirs() {
			_ = filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
				if err != nil || !d.IsDir() {
					return nil
				}
				data, _ := os.ReadFile(filepath.Join(path, "cgroup.procs"))
				for _, f := range strings.Fields(string(data)) {
					if pid, err := strconv.Atoi(f); err == nil {
						pids = append(pids, pid)
					}
				}
				return nil
			})
		}
		return pids
	})
	if err != nil {
		return err
	}
	for _, root := range kubepodsDirs() {
		var dirs []string
		_ = filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, path)
			}
			return nil
		})
		// Children before parents: a cgroup with children cannot go.
		sort.Slice(dirs, func(i, j int) bool { return len(dirs[i]) > len(dirs[j]) })
		for _, d := range dirs {
			if err := syscall.Rmdir(d); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return fmt.Errorf("removing cgroup %s: %w", d, err)
			}
		}
	}
	return nil
}

// mountsUnder lists the mount points at or under dir, deepest first.
func mountsUnder(dir string) ([]string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var points []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		// id parent major:minor root mountpoint ...; octal escapes in paths.
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		point := unescapeMountPath(fields[4])
		if point == dir || strings.HasPrefix(point, dir+"/") {
			points = append(points, point)
		}
	}
	sort.Slice(points, func(i, j int) bool { return len(points[i]) > len(points[j]) })
	return points, sc.Err()
}

func unescapeMountPath(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// unmountUnder detaches every mount under dir: overlay root filesystems,
// sandboxes' /dev/shm, the kubelet's volumes and its rshared root dir.
func unmountUnder(dir string) error {
	deadline := time.Now().Add(stopTimeout)
	for {
		points, err := mountsUnder(dir)
		if err != nil || len(points) == 0 {
			return err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("still mounted after %s: %v", stopTimeout, points)
		}
		for _, p := range points {
			_ = unix.Unmount(p, unix.MNT_DETACH) // stacked mounts take a pass each
		}
		if again, err := mountsUnder(dir); err != nil || len(again) == len(points) {
			time.Sleep(pollEvery) // nothing went: give it a moment
		}
	}
}

// removeLogLinks removes the kubelet's symlinks in /var/log/containers to
// pod logs in dir (it makes them whatever its podLogsDir), and that dir
// when it is left empty.
func removeLogLinks(dir string) {
	const links = "/var/log/containers"
	entries, err := os.ReadDir(links)
	if err != nil {
		return
	}
	for _, e := range entries {
		p := filepath.Join(links, e.Name())
		if target, err := os.Readlink(p); err == nil && strings.HasPrefix(target, dir+"/") {
			os.Remove(p)
		}
	}
	os.Remove(links) // fails unless empty, as it should
}

// devicePluginDir is where every kubelet puts its device plugin socket,
// whatever its root dir (k8s.io/kubelet's DevicePluginPath).
const devicePluginDir = "/var/lib/kubelet/device-plugins"

// removeDevicePluginSocket removes what the kubelet leaves in
// devicePluginDir (no other kubelet runs: sweepStale checked), and the
// dirs when that leaves them empty.
func removeDevicePluginSocket() {
	os.Remove(filepath.Join(devicePluginDir, "kubelet.sock"))
	os.Remove(filepath.Join(devicePluginDir, "kubelet_internal_checkpoint"))
	os.Remove(devicePluginDir)
	os.Remove(filepath.Dir(devicePluginDir))
}
