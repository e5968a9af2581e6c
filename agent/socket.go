package agent

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
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
// At most maxConns connections are held at once; more are accepted and
// closed at once with a logged warning, so that a flood cannot exhaust the
// agent's file descriptors (each connection holds two: the socket and the
// caller's pidfd).
func Listen(path string, maxConns int, log hclog.Logger) (net.Listener, error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("creating the socket directory %s: %w", dir, err)
	}
	// The lock settles a race between two agents starting at once; the
	// kernel drops it when the process dies.
	lock, err := os.OpenFile(path+".lock", os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("opening the socket lock %s.lock: %w", path, err)
	}
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		lock.Close()
		return nil, fmt.Errorf("the socket %s is in use by another running agent (its lock %s.lock is held): stop that agent or choose another socket_path", path, path)
	}
	if err := removeStaleSocket(path); err != nil {
		lock.Close()
		return nil, err
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		lock.Close()
		return nil, fmt.Errorf("listening on %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o777); err != nil {
		l.Close()
		lock.Close()
		return nil, fmt.Errorf("making the socket %s reachable by workloads: %w", path, err)
	}
	return &lockedListener{Listener: newLimitListener(l, maxConns, log), lock: lock}, nil
}

// DefaultMaxConnections leaves room under the open-file limit (which Go
// raises to the hard limit at start) for everything else the agent opens.
func DefaultMaxConnections() int {
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err != nil || lim.Cur == unix.RLIM_INFINITY {
		return 16384
	}
	n := (int64(lim.Cur) - 256) / 2
	return int(max(min(n, 16384), 64))
}

type limitListener struct {
	net.Listener
	slots    chan struct{}
	log      hclog.Logger
	lastWarn atomic.Int64
}

func newLimitListener(l net.Listener, maxConns int, log hclog.Logger) *limitListener {
	return &limitListener{Listener: l, slots: make(chan struct{}, maxConns), log: log}
}

func (l *limitListener) Accept() (net.Conn, error) {
	for {
		conn, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		select {
		case l.slots <- struct{}{}:
			return &limitConn{Conn: conn, release: func() { <-l.slots }}, nil
		default:
			conn.Close()
			if now := time.Now().Unix(); l.lastWarn.Swap(now) != now {
				l.log.Warn("Refusing connections: the connection limit is reached", "limit", cap(l.slots))
			}
		}
	}
}

type limitConn struct {
	net.Conn
	once    sync.Once
	release func()
}

// SyscallConn exposes the socket, for reading the peer's credentials.
func (c *limitConn) SyscallConn() (syscall.RawConn, error) {
	sc, ok := c.Conn.(syscall.Conn)
	if !ok {
		return nil, errors.New("not a socket connection")
	}
	return sc.SyscallConn()
}

func (c *limitConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.release)
	return err
}

func removeStaleSocket(path string) error {
	info, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("checking %s: %w", path, err)
	}
	if info.Mode()&os.ModeSocket == 0 {
		return fmt.Errorf("%s exists and is not a socket: remove it or choose another socket_path", path)
	}
	conn, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		conn.Close()
		return fmt.Errorf("the socket %s is in use by a running process (another lanyard or spire-agent?): stop it or choose another socket_path", path)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("checking whether %s is in use: %w", path, err)
	}
	if err := os.Remove(path); err != nil {
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
