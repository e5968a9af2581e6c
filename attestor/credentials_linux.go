package attestor

import (
	"context"
	"fmt"
	"net"
	"syscall"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
)

// authType names these credentials in AuthInfo.AuthType.
const authType = "lanyard-peercred"

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
		n, err := getsockoptUint32s(int(fd), unix.SOL_SOCKET, unix.SO_PEERGROUPS, buf)
		switch err {
		case nil:
			p.groups, p.groupsKnown = buf[:n], true
			return
		case unix.ERANGE:
			// NGROUPS_MAX (65536) bounds size.
			buf = make([]uint32, n)
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
