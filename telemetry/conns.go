package telemetry

import (
	"errors"
	"net"
	"sync/atomic"
	"syscall"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"
)

// The uid classes by index, with one for a peer whose credentials could
// not be read.
const (
	uidClassRoot = iota
	uidClassSystem
	uidClassUser
	uidClassUnknown
	numUIDClasses
)

var uidClassNames = [numUIDClasses]string{UIDRoot, UIDSystem, UIDUser, "unknown"}

func uidClassIndex(uid uint32) int {
	switch UIDClass(uid) {
	case UIDRoot:
		return uidClassRoot
	case UIDSystem:
		return uidClassSystem
	default:
		return uidClassUser
	}
}

// CountConns counts the connections l accepts on the socket named socket
// ("workload", "admin"), open and in all, by the kind of user of the peer.
// It returns l itself on nil Metrics.
func (m *Metrics) CountConns(l net.Listener, socket string) net.Listener {
	if m == nil {
		return l
	}
	c := &countingListener{Listener: l}
	for i, name := range uidClassNames {
		c.open[i] = m.connections.WithLabelValues(socket, name)
		c.total[i] = m.connectionsTotal.WithLabelValues(socket, name)
	}
	return c
}

type countingListener struct {
	net.Listener
	open  [numUIDClasses]prometheus.Gauge
	total [numUIDClasses]prometheus.Counter
}

func (l *countingListener) Accept() (net.Conn, error) {
	conn, err := l.Listener.Accept()
	if err != nil {
		return conn, err
	}
	class := uidClassUnknown
	if uid, err := peerUID(conn); err == nil {
		class = uidClassIndex(uid)
	}
	l.open[class].Inc()
	l.total[class].Inc()
	return &countedConn{Conn: conn, open: l.open[class]}, nil
}

// peerUID reads the peer's effective uid at connect (SO_PEERCRED).
func peerUID(conn net.Conn) (uint32, error) {
	sc, ok := conn.(syscall.Conn)
	if !ok {
		return 0, errors.New("not a socket")
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return 0, err
	}
	var cred *unix.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return 0, err
	}
	if credErr != nil {
		return 0, credErr
	}
	return cred.Uid, nil
}

// countedConn is open until its first Close. It passes SyscallConn
// through: the peer-credential handshake reads the socket.
type countedConn struct {
	net.Conn
	open   prometheus.Gauge
	closed atomic.Bool
}

func (c *countedConn) Close() error {
	if c.closed.CompareAndSwap(false, true) {
		c.open.Dec()
	}
	return c.Conn.Close()
}

func (c *countedConn) SyscallConn() (syscall.RawConn, error) {
	sc, ok := c.Conn.(syscall.Conn)
	if !ok {
		return nil, errors.New("the connection is not a socket")
	}
	return sc.SyscallConn()
}
