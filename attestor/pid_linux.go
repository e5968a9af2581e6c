package attestor

import (
	"errors"
	"fmt"
	"os"
	"strconv"

	"github.com/lanyard-dev/lanyard/attestor/procfs"
	"golang.org/x/sys/unix"
)

// TrackPID pins the process pid that a delegate names, as the handshake
// pins a caller, so that attestation and Verify apply to that process: a
// PID that exits or is reused fails Verify with ErrCallerGone. Its
// effective IDs are read from the process, since no socket reports them;
// a process that dies between that read and the pin fails here or in
// Verify, which compares them again. Supplementary groups are unknown.
// Release it when done.
func TrackPID(pid int32) (*Caller, error) {
	if pid <= 0 {
		return nil, fmt.Errorf("%w: pid %d names no process", ErrCallerGone, pid)
	}
	probe := &Caller{PID: pid}
	var buf [procBufSize]byte
	uid, gid, err := probe.readEffectiveIDs(&buf)
	if err != nil {
		return nil, err
	}
	c := newCaller(pid, uid, gid)
	if c.err != nil {
		return nil, c.err
	}
	return c, nil
}

// pidfdExited reports whether the process of a pidfd has exited, reaped or
// not: the kernel makes a pidfd readable then.
func pidfdExited(fd int) bool {
	fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	n, err := unix.Poll(fds, 0)
	return err == nil && n > 0 && fds[0].Revents&(unix.POLLIN|unix.POLLHUP) != 0
}

// Release stops tracking a caller made by TrackPID.
func (c *Caller) Release() { c.releaseFD() }

// PIDNamespaceDepth is how many PID namespaces below the agent's the
// caller's process runs in: 0 in the agent's own (or when the kernel does
// not say). A PID such a caller names is a number in its namespace, which
// means another process in the agent's.
func (c *Caller) PIDNamespaceDepth() (int, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(int(c.PID)) + "/status")
	if errors.Is(err, os.ErrNotExist) {
		return 0, fmt.Errorf("%w: pid %d exited", ErrCallerGone, c.PID)
	}
	if err != nil {
		return 0, fmt.Errorf("reading pid %d's PID namespaces: %w", c.PID, err)
	}
	depth, _ := procfs.NSpidDepth(b)
	// The file read must have been the caller's.
	if err := c.Verify(); err != nil {
		return 0, err
	}
	return depth, nil
}
