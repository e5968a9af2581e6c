package agent

import (
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
)

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

// offenderLogInterval spaces the warnings about one user: a flood refuses
// thousands of connections a second, and one line a minute says who.
const offenderLogInterval = time.Minute

// limitListener caps the connections held at once and shares the cap
// between the users that connect: peer uids in the agent's user namespace,
// and user namespaces for peers in others (see peerKey). While there is room every
// connection is taken. When the cap is reached, a user below its fair
// share (the cap divided by the users holding connections, counting the
// newcomer) gets in by closing the least recently active connection of the
// user holding the most; a user at or above its share is refused. So one
// user can fill an idle agent but never keep another user out, and no one,
// root included, needs a reserve: the agent's health probes get in as any
// light user does.
//
// Activity is the last second a connection read or wrote a byte: from the
// listener's view that is the best sign of a call in flight, and it costs
// the hot path one atomic load (and a store once a second).
type limitListener struct {
	net.Listener
	max int
	log hclog.Logger

	keys *peerKeyer

	mu    sync.Mutex
	total int
	users map[peerKey]*userConns
	seq   uint64
	// lastNewcomerWarn spaces the warnings about users refused while
	// every user holds a single connection.
	lastNewcomerWarn time.Time
}

// userConns are one user's connections.
type userConns struct {
	conns map[*limitConn]struct{}
	// Since the last warning about this user.
	refused, closed int
	lastWarn        time.Time
}

func newLimitListener(l net.Listener, maxConns int, log hclog.Logger) *limitListener {
	return &limitListener{Listener: l, max: max(maxConns, 1), log: log, keys: newPeerKeyer(log), users: make(map[peerKey]*userConns)}
}

func (l *limitListener) Accept() (net.Conn, error) {
	for {
		conn, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		cred, err := peerCred(conn)
		if err != nil {
			// Nor could the handshake attest it.
			l.log.Debug("Closing a connection whose peer credentials cannot be read", "error", err)
			conn.Close()
			continue
		}
		c := &limitConn{Conn: conn, l: l, key: l.keys.key(cred.Pid, cred.Uid), uid: cred.Uid}
		evicted, ok := l.admit(c)
		if evicted != nil {
			evicted.Conn.Close()
		}
		if !ok {
			conn.Close()
			continue
		}
		return c, nil
	}
}

// admit takes c in, or refuses it; when the cap is reached it may name a
// connection of the heaviest user to close to make room.
func (l *limitListener) admit(c *limitConn) (evict *limitConn, ok bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	c.active.Store(coarseNow())
	if l.total >= l.max {
		mine := l.users[c.key]
		held, holders := 0, len(l.users)
		if mine != nil {
			held = len(mine.conns)
		} else {
			holders++
		}
		share := max(l.max/holders, 1)
		heavyKey, heavy := l.heaviest()
		if held >= share || len(heavy.conns) <= held+1 {
			if mine == nil {
				// Every user holds one connection: the newcomer has
				// nothing to be counted against, and no one to blame.
				l.warnNewcomerLocked(c.key, share)
				return nil, false
			}
			mine.refused++
			l.warnLocked(c.key, mine, share)
			return nil, false
		}
		evict = heavy.leastRecentlyActive()
		l.removeLocked(evict)
		heavy.closed++
		l.warnLocked(heavyKey, heavy, share)
	}
	l.seq++
	c.seq = l.seq
	u := l.users[c.key]
	if u == nil {
		u = &userConns{conns: make(map[*limitConn]struct{})}
		l.users[c.key] = u
	}
	u.conns[c] = struct{}{}
	l.total++
	return evict, true
}

// heaviest is the user holding the most connections (the lowest key among
// equals). There is one whenever the cap is reached.
func (l *limitListener) heaviest() (peerKey, *userConns) {
	var key peerKey
	var heavy *userConns
	for k, u := range l.users {
		if heavy == nil || len(u.conns) > len(heavy.conns) || len(u.conns) == len(heavy.conns) && k.less(key) {
			key, heavy = k, u
		}
	}
	return key, heavy
}

// leastRecentlyActive is the connection idle the longest, the oldest among
// equals.
func (u *userConns) leastRecentlyActive() *limitConn {
	var pick *limitConn
	var pickActive int64
	for c := range u.conns {
		a := c.active.Load()
		if pick == nil || a < pickActive || a == pickActive && c.seq < pick.seq {
			pick, pickActive = c, a
		}
	}
	return pick
}

func (l *limitListener) removeLocked(c *limitConn) {
	if c.released {
		return
	}
	c.released = true
	u := l.users[c.key]
	delete(u.conns, c)
	if len(u.conns) == 0 {
		delete(l.users, c.key)
	}
	l.total--
}

func (l *limitListener) release(c *limitConn) {
	l.mu.Lock()
	l.removeLocked(c)
	l.mu.Unlock()
}

// warnLocked names a user that was refused or had a connection closed, at
// most once per offenderLogInterval.
func (l *limitListener) warnLocked(key peerKey, u *userConns, share int) {
	now := time.Now()
	if !u.lastWarn.IsZero() && now.Sub(u.lastWarn) < offenderLogInterval {
		return
	}
	// refused and closed count since the previous warning about key.
	args := append(key.logArgs(), "connections", len(u.conns), "share", share, "limit", l.max,
		"refused", u.refused, "closed", u.closed)
	l.log.Warn("Connection limit reached: a user at its share of the limit has new connections refused, and the user holding the most has its least recently active ones closed", args...)
	u.lastWarn = now
	u.refused, u.closed = 0, 0
}

// warnNewcomerLocked names a user refused while every user holds one
// connection (as many users as the limit), at most once per
// offenderLogInterval.
func (l *limitListener) warnNewcomerLocked(key peerKey, share int) {
	now := time.Now()
	if !l.lastNewcomerWarn.IsZero() && now.Sub(l.lastNewcomerWarn) < offenderLogInterval {
		return
	}
	args := append(key.logArgs(), "users", len(l.users), "share", share, "limit", l.max)
	l.log.Warn("Connection limit reached with every user holding one connection: refusing a new user", args...)
	l.lastNewcomerWarn = now
}

// PeerUID is the connecting process's effective uid at connect
// (SO_PEERCRED), for the metrics' uid classes.
func PeerUID(conn net.Conn) (uint32, error) {
	if c, ok := conn.(*limitConn); ok {
		return c.uid, nil // read at accept: no second getsockopt
	}
	cred, err := peerCred(conn)
	if err != nil {
		return 0, err
	}
	return cred.Uid, nil
}

// peerCred reads the connecting process's pid and uid (SO_PEERCRED): one
// getsockopt per connection.
func peerCred(conn net.Conn) (*unix.Ucred, error) {
	sc, ok := conn.(syscall.Conn)
	if !ok {
		return nil, errNotSocket
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil, err
	}
	var cred *unix.Ucred
	var credErr error
	if err := rc.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return nil, err
	}
	if credErr != nil {
		return nil, credErr
	}
	return cred, nil
}

// clockStart anchors coarseNow to the monotonic clock.
var clockStart = time.Now()

// coarseNow is the second since the agent started.
func coarseNow() int64 { return int64(time.Since(clockStart) / time.Second) }

type limitConn struct {
	net.Conn
	l      *limitListener
	key    peerKey
	uid    uint32       // the peer's, read at accept
	seq    uint64       // accept order; set under l.mu
	active atomic.Int64 // coarseNow of the last byte read or written
	// released is set under l.mu once the connection no longer counts.
	released bool
}

func (c *limitConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	if n > 0 {
		c.touch()
	}
	return n, err
}

func (c *limitConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	if n > 0 {
		c.touch()
	}
	return n, err
}

func (c *limitConn) touch() {
	if now := coarseNow(); c.active.Load() != now {
		c.active.Store(now)
	}
}

// SyscallConn exposes the socket, for reading the peer's credentials.
func (c *limitConn) SyscallConn() (syscall.RawConn, error) {
	sc, ok := c.Conn.(syscall.Conn)
	if !ok {
		return nil, errNotSocket
	}
	return sc.SyscallConn()
}

func (c *limitConn) Close() error {
	err := c.Conn.Close()
	c.l.release(c)
	return err
}
