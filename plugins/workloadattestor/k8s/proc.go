package k8s

import (
	"errors"
	"fmt"
	"slices"
	"strconv"

	"golang.org/x/sys/unix"
)

// readCgroupFile reads /proc/<pid>/cgroup under procRoot. The file is
// opened without following a symlink and read whole, up to
// maxCgroupFileSize (cgroup.go).
func readCgroupFile(procRoot string, pid int32) ([]byte, error) {
	path := procRoot + "/" + strconv.FormatInt(int64(pid), 10) + "/cgroup"
	fd, err := openNoFollow(path)
	if err != nil {
		return nil, cgroupFileError(pid, path, err)
	}
	defer unix.Close(fd)
	buf := make([]byte, 0, 4096)
	for {
		if len(buf) == cap(buf) {
			buf = slices.Grow(buf, cap(buf))
		}
		n, err := unix.Read(fd, buf[len(buf):min(cap(buf), maxCgroupFileSize+1)])
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return nil, cgroupFileError(pid, path, err)
		}
		if n == 0 {
			return buf, nil
		}
		buf = buf[:len(buf)+n]
		if len(buf) > maxCgroupFileSize {
			return nil, fmt.Errorf("pid %d: %s is larger than %d bytes", pid, path, maxCgroupFileSize)
		}
	}
}

func openNoFollow(path string) (int, error) {
	for {
		fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0)
		if !errors.Is(err, unix.EINTR) {
			return fd, err
		}
	}
}

func cgroupFileError(pid int32, path string, err error) error {
	switch {
	case errors.Is(err, unix.ENOENT), errors.Is(err, unix.ESRCH):
		return fmt.Errorf("pid %d: %s: the process does not exist (it may have exited, or the agent does not see the host's /proc: run it with hostPID: true): %w", pid, path, err)
	case errors.Is(err, unix.EACCES), errors.Is(err, unix.EPERM):
		return fmt.Errorf("pid %d: %s: permission denied: run the agent as root: %w", pid, path, err)
	}
	return fmt.Errorf("pid %d: reading %s: %w", pid, path, err)
}
