package attestor

import (
	"fmt"
	"net"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// Caller is the process at the other end of a Workload API connection, as
// seen when the connection was accepted.
type Caller struct {
	PID      int32
	UID, GID uint32

	// groups are the supplementary groups at connect, valid when
	// groupsKnown (SO_PEERGROUPS, Linux 4.13).
	groups      []uint32
	groupsKnown bool
	// exe is the executable at accept, zero when it could not be seen.
	exe FileID

	// err is set once at accept when the caller cannot be tracked; Verify
	// returns it.
	err error
	// refused, once set, is what Verify returns for good (under mu).
	refused error
	// start is the process start time (clock ticks after boot, field 22
	// of /proc/<pid>/stat); with the PID it names one process for good.
	start uint64
	kind  fdKind

	mu sync.RWMutex // Verify reads fd while a close may release it
	fd int          // valid only when kind is not kindNone
	// conn is the connection to close on CloseConn; nil for callers not
	// made by a handshake.
	conn net.Conn
}

type fdKind uint8

const (
	kindNone    fdKind = iota // no fd: never tracked, or released
	kindPidfd                 // fd is a pidfd
	kindProcDir               // fd is an O_DIRECTORY fd on /proc/<pid>
)

// Kernel features found missing are remembered so that each handshake does
// not pay for a failing system call.
var (
	noPeerPidfd  atomic.Bool // SO_PEERPIDFD (Linux 6.5)
	noPidfdOpen  atomic.Bool // pidfd_open (Linux 5.3), or blocked by seccomp
	noPidfdInfo  atomic.Bool // PIDFD_GET_INFO (Linux 6.13), or blocked by seccomp
	noPeerGroups atomic.Bool // SO_PEERGROUPS (Linux 4.13)
)

// newCaller starts tracking pid, using a pidfd when the kernel has them.
func newCaller(pid int32, uid, gid uint32) *Caller {
	c := &Caller{}
	c.init(pid, uid, gid, -1, false)
	return c
}

// init records the process and opens the fd that pins it. peerPidfd, when
// not -1, is a pidfd the kernel gave for the socket peer; init owns it.
// procDir forces the /proc dir fd used where pidfd_open is unavailable.
// Problems are stored in c.err for Verify to report: the handshake itself
// only fails when the socket cannot name its peer.
func (c *Caller) init(pid int32, uid, gid uint32, peerPidfd int, procDir bool) {
	c.PID, c.UID, c.GID = pid, uid, gid
	if pid <= 0 {
		if peerPidfd >= 0 {
			unix.Close(peerPidfd)
		}
		c.err = ErrCallerNotVisible
		return
	}
	switch {
	case peerPidfd >= 0:
		c.fd, c.kind = peerPidfd, kindPidfd
	case procDir || noPidfdOpen.Load():
		c.err = c.openProcDir()
	default:
		fd, err := unix.PidfdOpen(int(pid), 0)
		switch {
		case err == nil:
			c.fd, c.kind = fd, kindPidfd
		case err == unix.ESRCH:
			c.err = fmt.Errorf("%w: pid %d exited before its connection was accepted", ErrCallerGone, pid)
			return
		case err == unix.ENOSYS || err == unix.EPERM:
			// Before Linux 5.3, or a seccomp profile that refuses it.
			noPidfdOpen.Store(true)
			c.err = c.openProcDir()
		default:
			c.err = fmt.Errorf("cannot track caller pid %d: pidfd_open: %w", pid, err)
		}
	}
	if c.err != nil {
		return
	}
	// Before the liveness check below, so that the check proves the file
	// seen was this process's executable. A failure leaves exe zero: the
	// agent may not see other users' executables (it is not root), and
	// then attestors that need them fail on their own.
	c.exe, _ = c.statExe()
	if c.kind == kindPidfd && !noPidfdInfo.Load() {
		// Verify will ask the pidfd, which needs no start time; this
		// checks that the caller is still there, as it connected.
		if done, err := c.verifyPidfdInfo(); done {
			if err != nil {
				c.err = err
				c.releaseFD()
			}
			return
		}
	}
	var buf [procBufSize]byte
	start, err := c.readStartTime(&buf)
	if err == nil && c.kind == kindPidfd {
		// The process was alive after its stat was read, so the stat
		// was its own and not that of a process reusing the PID.
		err = c.pidfdAlive()
	}
	if err != nil {
		c.err = err
		c.releaseFD()
		return
	}
	c.start = start
}

func (c *Caller) openProcDir() error {
	var path [procPathSize]byte
	fd, err := openat(unix.AT_FDCWD, procPath(&path, c.PID, nil), unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC)
	switch {
	case err == nil:
		c.fd, c.kind = fd, kindProcDir
		return nil
	case err == unix.ENOENT || err == unix.ESRCH:
		return fmt.Errorf("%w: pid %d exited before its connection was accepted (or /proc is not this PID namespace's)", ErrCallerGone, c.PID)
	default:
		return fmt.Errorf("cannot track caller pid %d: open /proc/%d: %w", c.PID, c.PID, err)
	}
}

// Process is the caller as the kernel described it at connect, for the
// workload attestors.
func (c *Caller) Process() Process {
	return Process{PID: c.PID, UID: c.UID, GID: c.GID, Groups: c.groups, GroupsKnown: c.groupsKnown, Exe: c.exe}
}

// Verify reports whether the process that connected still exists and still
// holds the PID: call it after attestation, before trusting the selectors.
// It also fails when the process's effective UID or GID changed since it
// connected (for instance it executed a setuid program), since attestors
// would then describe different credentials than the ones that connected.
// Errors about an exited process or a reused PID wrap ErrCallerGone, those
// about changed credentials ErrCallerChanged. After Refuse it returns the
// refusal.
func (c *Caller) Verify() error {
	if c.err != nil {
		return c.err
	}
	c.mu.RLock()
	defer c.mu.RUnlock()
	if c.refused != nil {
		return c.refused
	}
	if c.kind == kindNone {
		return fmt.Errorf("%w: pid %d is no longer tracked: its connection was closed", ErrCallerGone, c.PID)
	}
	// A process named by PID (no connection) may have exited and not been
	// reaped: a zombie keeps its /proc entry, its credentials and its
	// start time, but its pidfd is readable. A caller on a connection
	// cannot be a zombie and call, so the fetch path skips this.
	if c.conn == nil && c.kind == kindPidfd && pidfdExited(c.fd) {
		return fmt.Errorf("%w: pid %d exited", ErrCallerGone, c.PID)
	}
	if c.kind == kindPidfd && !noPidfdInfo.Load() {
		if done, err := c.verifyPidfdInfo(); done {
			return err
		}
	}
	var buf [procBufSize]byte
	start, err := c.readStartTime(&buf)
	if err != nil {
		return err
	}
	if start != c.start {
		return fmt.Errorf("%w: pid %d now belongs to a process started at tick %d, not the caller started at tick %d", ErrCallerGone, c.PID, start, c.start)
	}
	uid, gid, err := c.readEffectiveIDs(&buf)
	if err != nil {
		return err
	}
	if uid != c.UID || gid != c.GID {
		return c.credentialsChanged(uid, gid)
	}
	if c.kind == kindPidfd {
		return c.pidfdAlive()
	}
	return nil
}

func (c *Caller) credentialsChanged(uid, gid uint32) error {
	return fmt.Errorf("%w: pid %d connected as uid %d gid %d but now runs as uid %d gid %d (e.g. it executed a setuid program): it must reconnect", ErrCallerChanged, c.PID, c.UID, c.GID, uid, gid)
}

// Refuse makes every later Verify fail with err, and stops tracking the
// process. The connection stays open, so that the refusal reaches the
// client as a status rather than as a dropped connection, until CloseConn.
// It reports whether this call refused the caller (false when it already
// was).
func (c *Caller) Refuse(err error) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.refused != nil {
		return false
	}
	c.refused = err
	if c.kind != kindNone {
		unix.Close(c.fd)
		c.fd, c.kind = -1, kindNone
	}
	return true
}

// verifyPidfdInfo does Verify's work with one ioctl on the pidfd instead of
// reading /proc twice: it fails once the process is reaped, and reports the
// effective UID and GID the process has now. A pidfd names one process for
// good, so no start time is compared. done is false when the kernel cannot
// answer (before Linux 6.13); Verify then reads /proc.
func (c *Caller) verifyPidfdInfo() (done bool, err error) {
	info := unix.PidfdInfo{Mask: unix.PIDFD_INFO_CREDS}
	switch err := unix.IoctlPidfdInfo(c.fd, &info); err {
	case nil:
		if info.Mask&unix.PIDFD_INFO_CREDS == 0 {
			noPidfdInfo.Store(true)
			return false, nil
		}
	case unix.ESRCH:
		return true, fmt.Errorf("%w: pid %d exited", ErrCallerGone, c.PID)
	case unix.ENOTTY, unix.EINVAL, unix.EOPNOTSUPP, unix.ENOSYS, unix.EPERM:
		noPidfdInfo.Store(true)
		return false, nil
	default:
		return true, fmt.Errorf("cannot check caller pid %d: PIDFD_GET_INFO: %w", c.PID, err)
	}
	if info.Euid != c.UID || info.Egid != c.GID {
		return true, c.credentialsChanged(info.Euid, info.Egid)
	}
	return true, nil
}

// pidfdAlive asks the kernel through the pidfd, which cannot be fooled by
// PID reuse. Signal 0 only checks; EPERM still proves the process exists.
func (c *Caller) pidfdAlive() error {
	err := unix.PidfdSendSignal(c.fd, 0, nil, 0)
	switch err {
	case nil, unix.EPERM:
		return nil
	case unix.ESRCH:
		return fmt.Errorf("%w: pid %d exited", ErrCallerGone, c.PID)
	default:
		return fmt.Errorf("cannot check whether caller pid %d is alive: pidfd_send_signal: %w", c.PID, err)
	}
}

// CloseConn closes the connection (used on a client that stopped reading
// its stream) and stops tracking the process.
func (c *Caller) CloseConn() {
	if c.conn != nil {
		c.conn.Close()
		return
	}
	c.releaseFD()
}

func (c *Caller) releaseFD() {
	c.mu.Lock()
	if c.kind != kindNone {
		unix.Close(c.fd)
		c.fd, c.kind = -1, kindNone
	}
	c.mu.Unlock()
}
