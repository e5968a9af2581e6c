package attestor

import (
	"errors"
	"fmt"

	"github.com/lanyard-dev/lanyard/attestor/procfs"
	"golang.org/x/sys/unix"
)

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
	var stx unix.Statx_t
	if err := statxIno(dirfd, path, &stx); err != nil {
		return FileID{}, err
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
	start, err := procfs.ParseStartTime(buf[:n])
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

// parseEffectiveIDs reads the effective UID and GID from the start of
// /proc/<pid>/status. Both lines must be whole and name an effective ID.
func parseEffectiveIDs(status []byte) (uid, gid uint32, err error) {
	st, complete, err := procfs.ParseStatus(status, procfs.UIDLine|procfs.GIDLine)
	switch {
	case err != nil:
		return 0, 0, fmt.Errorf("status: %w", err)
	case !complete:
		return 0, 0, errors.New("status has no whole Uid and Gid lines")
	case st.UID.Count < 2:
		return 0, 0, errors.New("status Uid line has no effective ID")
	case st.GID.Count < 2:
		return 0, 0, errors.New("status Gid line has no effective ID")
	}
	return st.UID.Effective, st.GID.Effective, nil
}
