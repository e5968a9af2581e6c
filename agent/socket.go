package agent

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
)

// Listen opens the Workload API socket at path. It creates the directory,
// replaces a stale socket left by a crash, and refuses a socket that a
// running agent still serves. Workloads of any user must be able to
// connect, so the socket is world-writable; what they get is decided by
// attestation, not by file modes.
//
// It refuses a socket directory that another user could change (see
// openSocketDir), and follows no symlink for the socket or its lock: a user
// who could swap either could serve workloads a CA of their own, or have
// the agent create or chmod a file of their choosing.
//
// At most maxConns connections are held at once, shared fairly between
// the users that connect (see limitListener), so that a flood cannot
// exhaust the agent's file descriptors (each connection holds two: the
// socket and the caller's pidfd) nor lock other users out.
func Listen(path string, maxConns int, log hclog.Logger) (net.Listener, error) {
	return listenAt(path, socketDirUse, 0o777, maxConns, log)
}

// ListenAdmin opens the admin socket at path as Listen opens the Workload
// API's, with the checks of Listen, except that the directories it creates
// are 0750 and the socket 0770: only the agent's user and group reach it,
// as spire-agent's admin socket.
func ListenAdmin(path string, maxConns int, log hclog.Logger) (net.Listener, error) {
	return listenAt(path, adminDirUse, 0o770, maxConns, log)
}

// ListenBroker opens the SPIFFE Broker Endpoint's socket at path as
// ListenAdmin opens the admin socket: spire-agent makes it 0770 too. Its
// callers are authenticated by mutual TLS; the mode keeps the rest of the
// node from even reaching the handshake.
func ListenBroker(path string, maxConns int, log hclog.Logger) (net.Listener, error) {
	return listenAt(path, brokerDirUse, 0o770, maxConns, log)
}

func listenAt(path string, use dirUse, mode uint32, maxConns int, log hclog.Logger) (net.Listener, error) {
	if err := refuseDotDot(path, use); err != nil {
		return nil, err
	}
	dir, err := openSocketDir(filepath.Dir(path), use)
	if err != nil {
		return nil, err
	}
	defer unix.Close(dir)
	name := filepath.Base(path)
	// The lock settles a race between two agents starting at once; the
	// kernel drops it when the process dies.
	lock, err := openLock(dir, name+".lock", path+".lock")
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		lock.Close()
		return nil, fmt.Errorf("the socket %s is in use by another running agent (its lock %s.lock is held): stop that agent or choose another %s", path, path, use.key)
	}
	if err := removeStaleSocket(dir, name, path, use.key); err != nil {
		lock.Close()
		return nil, err
	}
	// By path: only root and the agent can change the checked directory.
	l, err := net.Listen("unix", path)
	if err != nil {
		lock.Close()
		return nil, fmt.Errorf("listening on %s: %w", path, err)
	}
	if err := chmodSocket(dir, name, mode); err != nil {
		l.Close()
		lock.Close()
		return nil, fmt.Errorf("setting the mode of the socket %s to %s: %w", path, octalMode(mode), err)
	}
	return &lockedListener{Listener: newLimitListener(l, maxConns, log), lock: lock}, nil
}

// openLock opens (creating) the lock file in dir without following a
// symlink, and accepts only a regular file of the agent's own.
func openLock(dir int, name, path string) (*os.File, error) {
	fd, err := unix.Openat(dir, name, unix.O_CREAT|unix.O_RDWR|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0o600)
	if err != nil {
		if errors.Is(err, unix.ELOOP) {
			return nil, fmt.Errorf("the socket lock %s is a symlink: remove it", path)
		}
		return nil, fmt.Errorf("opening the socket lock %s: %w", path, err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("checking the socket lock %s: %w", path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG || int(st.Uid) != os.Geteuid() {
		unix.Close(fd)
		return nil, fmt.Errorf("the socket lock %s is not a regular file of the agent's user (it is %s, owned by %s): remove it", path, fileMode(&st), describeOwner(st.Uid))
	}
	return os.NewFile(uintptr(fd), path), nil
}

// chmodSocket sets the mode of the socket name in dir through a descriptor
// of the socket's own inode (O_PATH|O_NOFOLLOW), so that what is changed is
// that socket, never what a symlink in its place points to. fchmod does not
// take O_PATH descriptors; chmod of their /proc/self/fd link does, as
// glibc's fchmodat(AT_SYMLINK_NOFOLLOW) does it.
func chmodSocket(dir int, name string, mode uint32) error {
	fd, err := unix.Openat(dir, name, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFSOCK {
		return fmt.Errorf("%s is %s, not the socket just bound", name, fileMode(&st))
	}
	return unix.Chmod("/proc/self/fd/"+strconv.Itoa(fd), mode)
}

// removeStaleSocket removes the socket name in dir when nothing listens on
// it. It never follows a symlink: anything but a socket is refused.
func removeStaleSocket(dir int, name, path, key string) error {
	var st unix.Stat_t
	err := unix.Fstatat(dir, name, &st, unix.AT_SYMLINK_NOFOLLOW)
	if errors.Is(err, unix.ENOENT) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("checking %s: %w", path, err)
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFSOCK:
	case unix.S_IFLNK:
		return fmt.Errorf("%s exists and is a symlink, not a socket: remove it or choose another %s", path, key)
	default:
		return fmt.Errorf("%s exists and is not a socket (it is %s): remove it or choose another %s", path, fileMode(&st), key)
	}
	conn, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		conn.Close()
		return fmt.Errorf("the socket %s is in use by a running process (another lanyard or spire-agent?): stop it or choose another %s", path, key)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("checking whether %s is in use: %w", path, err)
	}
	if err := unix.Unlinkat(dir, name, 0); err != nil {
		return fmt.Errorf("removing the stale socket %s: %w", path, err)
	}
	return nil
}

// lockedListener holds the socket lock for as long as it listens.
type lockedListener struct {
	net.Listener
	lock *os.File
}

func (l *lockedListener) Close() error {
	err := l.Listener.Close()
	l.lock.Close()
	return err
}
