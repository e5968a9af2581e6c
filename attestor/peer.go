package attestor

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
)

// ErrCallerGone means the process that opened a Workload API connection has
// exited, or its PID now belongs to another process, so selectors gathered
// for that PID must not be trusted.
var ErrCallerGone = errors.New("the calling process exited or its PID was reused")

// ErrCallerNotVisible means the peer's PID is 0: the caller runs in a PID
// namespace the agent cannot see into.
var ErrCallerNotVisible = errors.New("the caller's PID is not visible: run the agent in the host PID namespace (hostPID: true)")

// authType names these credentials in AuthInfo.AuthType.
const authType = "lanyard-peercred"

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

const (
	// procBufSize holds the start of /proc/<pid>/stat up to field 22 (at
	// most about 480 bytes: pid, a 64-byte comm and 19 numbers) and the
	// first lines of /proc/<pid>/status up to Gid.
	procBufSize = 512
	// procPathSize fits "/proc/" + a 10-digit pid + "/status" + NUL.
	procPathSize = 32
)

// Names of the files read, NUL-terminated for openat.
var (
	statName   = []byte("stat\x00")
	statusName = []byte("status\x00")
	exeName    = []byte("exe\x00")
)

// statExe identifies the file /proc/<pid>/exe links to. c.mu must be held
// or c not yet shared.
func (c *Caller) statExe() (FileID, error) {
	dirfd, path := unix.AT_FDCWD, (*byte)(nil)
	var buf [procPathSize]byte
	if c.kind == kindProcDir {
		dirfd, path = c.fd, &exeName[0]
	} else {
		path = procPath(&buf, c.PID, exeName)
	}
	// statx rather than fstatat: its syscall number is the same on every
	// architecture, and a raw call does not copy the path to the heap.
	var stx unix.Statx_t
	_, _, errno := unix.Syscall6(unix.SYS_STATX, uintptr(dirfd), uintptr(unsafe.Pointer(path)), unix.AT_STATX_SYNC_AS_STAT, unix.STATX_INO, uintptr(unsafe.Pointer(&stx)), 0)
	if errno != 0 {
		return FileID{}, errno
	}
	// The device number as stat(2) encodes it, to compare with fstat's.
	return FileID{Dev: unix.Mkdev(stx.Dev_major, stx.Dev_minor), Ino: stx.Ino}, nil
}

// readStartTime reads field 22 of the process's stat file with one read.
func (c *Caller) readStartTime(buf *[procBufSize]byte) (uint64, error) {
	n, err := c.readProcFile(buf, statName)
	if err != nil {
		return 0, err
	}
	start, err := parseStartTime(buf[:n])
	if err != nil {
		return 0, fmt.Errorf("cannot read the start time of caller pid %d: %w", c.PID, err)
	}
	return start, nil
}

// readEffectiveIDs reads the effective UID and GID from the process's status
// file, the credentials SO_PEERCRED reported at connect time.
func (c *Caller) readEffectiveIDs(buf *[procBufSize]byte) (uid, gid uint32, err error) {
	n, err := c.readProcFile(buf, statusName)
	if err != nil {
		return 0, 0, err
	}
	uid, gid, err = parseEffectiveIDs(buf[:n])
	if err != nil {
		return 0, 0, fmt.Errorf("cannot read the credentials of caller pid %d: %w", c.PID, err)
	}
	return uid, gid, nil
}

// readProcFile reads the start of /proc/<pid>/<name>, through the /proc dir
// fd when that is what pins the process (lookups through it fail once the
// process is gone, even if the PID is reused). c.mu must be held or c not
// yet shared.
func (c *Caller) readProcFile(buf *[procBufSize]byte, name []byte) (int, error) {
	var fd int
	var err error
	if c.kind == kindProcDir {
		fd, err = openat(c.fd, &name[0], unix.O_RDONLY|unix.O_CLOEXEC)
	} else {
		var path [procPathSize]byte
		fd, err = openat(unix.AT_FDCWD, procPath(&path, c.PID, name), unix.O_RDONLY|unix.O_CLOEXEC)
	}
	if err != nil {
		return 0, c.procError(name, err)
	}
	n, err := readFD(fd, buf[:])
	unix.Close(fd)
	if err != nil {
		return 0, c.procError(name, err)
	}
	return n, nil
}

// procError turns a failed /proc read into ErrCallerGone when the process
// is gone, and otherwise into an error that says what to check.
func (c *Caller) procError(name []byte, err error) error {
	file := string(name[:len(name)-1])
	if err != unix.ENOENT && err != unix.ESRCH {
		return fmt.Errorf("cannot read /proc/%d/%s of the caller: %w", c.PID, file, err)
	}
	if c.kind == kindPidfd && c.pidfdAlive() == nil {
		return fmt.Errorf("caller pid %d is alive but /proc/%d/%s does not exist: mount a /proc of the agent's PID namespace, without hidepid", c.PID, c.PID, file)
	}
	return fmt.Errorf("%w: pid %d exited (/proc/%d/%s: %v)", ErrCallerGone, c.PID, c.PID, file, err)
}

// procPath writes "/proc/<pid>/<name>" NUL-terminated into path, or
// "/proc/<pid>" when name is empty, without allocating.
func procPath(path *[procPathSize]byte, pid int32, name []byte) *byte {
	b := append(path[:0], "/proc/"...)
	var digits [10]byte
	i := len(digits)
	for v := uint32(pid); ; v /= 10 {
		i--
		digits[i] = byte('0' + v%10)
		if v < 10 {
			break
		}
	}
	b = append(b, digits[i:]...)
	if len(name) > 0 {
		b = append(b, '/')
		b = append(b, name...) // carries the NUL
	} else {
		b = append(b, 0)
	}
	return &b[0]
}

// openat opens a NUL-terminated path; unix.Openat would allocate a copy of
// the path on every call.
func openat(dirfd int, path *byte, flags int) (int, error) {
	fd, _, errno := unix.Syscall6(unix.SYS_OPENAT, uintptr(dirfd), uintptr(unsafe.Pointer(path)), uintptr(flags), 0, 0, 0)
	if errno != 0 {
		return -1, errno
	}
	return int(fd), nil
}

// readFD is read(2) without unix.Read's race-detector hooks, which move buf
// to the heap in -race builds; buf never leaves the calling goroutine.
func readFD(fd int, buf []byte) (int, error) {
	n, _, errno := unix.Syscall(unix.SYS_READ, uintptr(fd), uintptr(unsafe.Pointer(&buf[0])), uintptr(len(buf)))
	if errno != 0 {
		return 0, errno
	}
	return int(n), nil
}

// parseStartTime returns field 22 of a /proc/<pid>/stat line. Field 2 (comm)
// is in parentheses and may itself hold spaces and ')', but no later field
// holds ')', so fields are counted from the last ')'.
func parseStartTime(stat []byte) (uint64, error) {
	end := bytes.LastIndexByte(stat, ')')
	if end < 0 || bytes.IndexByte(stat, '(') < 0 {
		return 0, errors.New("stat has no parenthesized command name")
	}
	rest := stat[end+1:]
	// rest is " <field 3> <field 4> ..."; skip to the space before field 22.
	for field := 3; field <= 22; field++ {
		if len(rest) == 0 || rest[0] != ' ' {
			return 0, fmt.Errorf("stat ends before field %d", field)
		}
		rest = rest[1:]
		if field < 22 {
			sp := bytes.IndexByte(rest, ' ')
			if sp < 0 {
				return 0, fmt.Errorf("stat ends before field %d", field+1)
			}
			rest = rest[sp:]
		}
	}
	v, n, err := parseUint(rest)
	if err != nil {
		return 0, fmt.Errorf("stat field 22 (start time): %w", err)
	}
	// A number cut off by the end of the buffer would compare wrongly.
	if n == len(rest) || (rest[n] != ' ' && rest[n] != '\n') {
		return 0, errors.New("stat field 22 (start time) is not followed by a separator")
	}
	return v, nil
}

// parseEffectiveIDs finds the second numbers of the Uid: and Gid: lines of
// /proc/<pid>/status (real, effective, saved, filesystem).
func parseEffectiveIDs(status []byte) (uid, gid uint32, err error) {
	if uid, err = statusEffectiveID(status, uidKey); err != nil {
		return 0, 0, err
	}
	if gid, err = statusEffectiveID(status, gidKey); err != nil {
		return 0, 0, err
	}
	return uid, gid, nil
}

// Keys of status lines; Name: is escaped there, so a line break always
// starts a key.
var uidKey, gidKey = []byte("\nUid:"), []byte("\nGid:")

func statusEffectiveID(status, key []byte) (uint32, error) {
	i := bytes.Index(status, key)
	if i < 0 {
		return 0, fmt.Errorf("status has no %s line", key[1:])
	}
	line := status[i+len(key):]
	if nl := bytes.IndexByte(line, '\n'); nl >= 0 {
		line = line[:nl]
	} else {
		return 0, fmt.Errorf("status %s line is cut short", key[1:])
	}
	line = bytes.TrimLeft(line, " \t")
	_, n, err := parseUint(line) // real ID
	if err != nil {
		return 0, fmt.Errorf("status %s line: %w", key[1:], err)
	}
	line = bytes.TrimLeft(line[n:], " \t")
	v, n, err := parseUint(line)
	if err != nil || v > 1<<32-1 || (n < len(line) && line[n] != '\t' && line[n] != ' ') {
		return 0, fmt.Errorf("status %s line has no effective ID", key[1:])
	}
	return uint32(v), nil
}

// parseUint reads leading decimal digits; strconv would need a string.
func parseUint(b []byte) (v uint64, n int, err error) {
	for n < len(b) && b[n] >= '0' && b[n] <= '9' {
		d := uint64(b[n] - '0')
		if v > (1<<64-1-d)/10 {
			return 0, 0, errors.New("number overflows 64 bits")
		}
		v = v*10 + d
		n++
	}
	if n == 0 {
		return 0, 0, errors.New("not a number")
	}
	return v, n, nil
}

// AuthInfo is what the handshake of Credentials attaches to a connection.
type AuthInfo struct {
	credentials.CommonAuthInfo
	Caller *Caller // nil on the client side
}

// AuthType implements credentials.AuthInfo.
func (AuthInfo) AuthType() string { return authType }

// CallerFromContext returns the Caller of a gRPC call served over
// Credentials.
func CallerFromContext(ctx context.Context) (*Caller, bool) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return nil, false
	}
	var c *Caller
	switch ai := p.AuthInfo.(type) {
	case *AuthInfo:
		c = ai.Caller
	case AuthInfo:
		c = ai.Caller
	}
	return c, c != nil
}

// Credentials returns gRPC transport credentials for a Workload API server
// on a Unix socket: the handshake records the connecting process (SO_PEERCRED
// plus a pidfd or /proc dir fd and its start time) and attaches it as
// AuthInfo. Nothing is encrypted. On the client side it is a pass-through.
func Credentials() credentials.TransportCredentials { return peerCreds{} }

type peerCreds struct{}

// peerConn carries everything a handshake needs in one allocation and
// releases the caller's fd when the connection closes.
type peerConn struct {
	net.Conn
	raw    syscall.Conn
	caller Caller
	info   AuthInfo

	// Filled by readPeer during the handshake.
	cred        unix.Ucred
	credErr     error
	peerPidfd   int
	peerGone    bool
	groups      []uint32
	groupsKnown bool
	// groupsBuf holds the supplementary groups of most callers without
	// another allocation.
	groupsBuf [16]uint32
}

// readPeer reads the peer's credentials and, where the kernel offers it, a
// pidfd for the peer; it runs inside RawConn.Control.
func (p *peerConn) readPeer(fd uintptr) {
	var cred *unix.Ucred
	cred, p.credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	if p.credErr != nil {
		return
	}
	p.cred = *cred
	p.readPeerGroups(fd)
	if noPeerPidfd.Load() {
		return
	}
	// The kernel's pidfd for the peer names the process that connected
	// even if it exited and its PID was reused since.
	pfd, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PEERPIDFD)
	switch err {
	case nil:
		p.peerPidfd = pfd
	case unix.ENOPROTOOPT:
		noPeerPidfd.Store(true)
	case unix.EINVAL, unix.ESRCH:
		// The peer was reaped (kernels 6.5 to 6.15 have no pidfd for
		// it); pidfd_open could find a process reusing its PID.
		p.peerGone = true
	}
}

// readPeerGroups reads the supplementary groups the peer had when it
// connected. Unlike /proc/<pid>/status, which shows the credentials of
// whatever the process runs now, the kernel fixed these at connect.
func (p *peerConn) readPeerGroups(fd uintptr) {
	if noPeerGroups.Load() {
		return
	}
	buf := p.groupsBuf[:]
	// At most two rounds: the second has the size the kernel asked for,
	// unless the groups changed in between (the kernel keeps the
	// connect-time set, so they cannot).
	for range 2 {
		size := uint32(len(buf) * 4)
		_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, fd, unix.SOL_SOCKET, unix.SO_PEERGROUPS, uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&size)), 0)
		switch errno {
		case 0:
			p.groups, p.groupsKnown = buf[:size/4], true
			return
		case unix.ERANGE:
			// NGROUPS_MAX (65536) bounds size.
			buf = make([]uint32, size/4)
		case unix.ENOPROTOOPT:
			noPeerGroups.Store(true)
			return
		default:
			return
		}
	}
}

func (p *peerConn) Close() error {
	p.caller.releaseFD()
	return p.Conn.Close()
}

// SyscallConn keeps the socket reachable through the wrapper (gRPC's
// channelz reads socket options through it).
func (p *peerConn) SyscallConn() (syscall.RawConn, error) { return p.raw.SyscallConn() }

func (peerCreds) ServerHandshake(conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	raw, ok := conn.(syscall.Conn)
	if addr := conn.LocalAddr(); !ok || addr == nil || addr.Network() != "unix" {
		return nil, nil, fmt.Errorf("workload API peer credentials need a Unix socket connection, got a %T on %v: serve the Workload API on a unix:// address", conn, addr)
	}
	rc, err := raw.SyscallConn()
	if err != nil {
		return nil, nil, fmt.Errorf("cannot reach the socket to read the caller's credentials: %w", err)
	}
	// Results land in p, which is allocated anyway, so that the callback
	// captures one pointer.
	p := &peerConn{Conn: conn, raw: raw, peerPidfd: -1}
	ctlErr := rc.Control(p.readPeer)
	if ctlErr == nil {
		ctlErr = p.credErr
	}
	if ctlErr != nil {
		return nil, nil, fmt.Errorf("cannot read the Workload API caller's credentials (SO_PEERCRED): %w", ctlErr)
	}
	cred := &p.cred
	if p.peerGone && cred.Pid > 0 {
		p.caller.PID, p.caller.UID, p.caller.GID = cred.Pid, cred.Uid, cred.Gid
		p.caller.err = fmt.Errorf("%w: pid %d exited before its connection was accepted", ErrCallerGone, cred.Pid)
	} else {
		p.caller.init(cred.Pid, cred.Uid, cred.Gid, p.peerPidfd, false)
	}
	p.caller.groups, p.caller.groupsKnown = p.groups, p.groupsKnown
	p.caller.conn = p
	p.info = AuthInfo{CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.NoSecurity}, Caller: &p.caller}
	return p, &p.info, nil
}

func (peerCreds) ClientHandshake(_ context.Context, _ string, conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return conn, AuthInfo{CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.NoSecurity}}, nil
}

// Info reports "insecure", as grpc's insecure credentials do, so that gRPC
// treats the transport the same way (no encryption; per-RPC credentials
// that need transport security are refused when dialing).
func (peerCreds) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: "insecure"}
}

func (peerCreds) Clone() credentials.TransportCredentials { return peerCreds{} }

// OverrideServerName implements a deprecated method; there is no server
// name to check.
func (peerCreds) OverrideServerName(string) error { return nil }
