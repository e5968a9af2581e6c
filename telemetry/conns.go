package telemetry

import (
	"errors"
	"net"
	"sync/atomic"
	"syscall"

	"github.com/prometheus/client_golang/prometheus"
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
// ("workload", "admin"), open and in all, by the kind of user of the peer,
// whose uid uidOf reads (agent.PeerUID). It returns l itself on nil
// Metrics.
func (m *Metrics) CountConns(l net.Listener, socket string, uidOf func(net.Conn) (uint32, error)) net.Listener {
	if m == nil {
		return l
	}
	c := &countingListener{Listener: l, uidOf: uidOf}
	for i, name := range uidClassNames {
		c.open[i] = m.connections.WithLabelValues(socket, name)
		c.total[i] = m.connectionsTotal.WithLabelValues(socket, name)
	}
	return c
}

type countingListener struct {
	net.Listener
	uidOf func(net.Conn) (uint32, error)
	open  [numUIDClasses]prometheus.Gauge
	total [numUIDClasses]prometheus.Counter
}

func (l *countingListener) Accept() (net.Conn, error) {
	conn, err := l.Listener.Accept()
	if err != nil {
		return conn, err
	}
	class := uidClassUnknown
	if uid, err := l.uidOf(conn); err == nil {
		class = uidClassIndex(uid)
	}
	l.open[class].Inc()
	l.total[class].Inc()
	return &countedConn{Conn: conn, open: l.open[class]}, nil
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
