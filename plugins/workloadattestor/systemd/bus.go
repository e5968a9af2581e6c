package systemd

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/godbus/dbus/v5"
	"github.com/hashicorp/go-hclog"
)

// dialTimeout bounds connecting to the bus (connect, authentication,
// Hello) when the attestation that dials has no deadline of its own.
const dialTimeout = 5 * time.Second

// systemBus is the attestor's one connection to the system bus: dialled
// at the first call, shared by every call, dialled again once the bus
// closed it (a restart of dbus). What keeps systemd from answering is
// logged once each time its cause changes, not for every call.
type systemBus struct {
	address string
	log     hclog.Logger
	getpid  func() int
	// dialing is a token held while dialling: one dial at a time, which a
	// caller waits for only as long as its ctx allows.
	dialing chan struct{}

	mu       sync.Mutex
	conn     *dbus.Conn
	reported string // the cause last logged; "" while systemd answers
}

func newSystemBus(address string, log hclog.Logger) *systemBus {
	return &systemBus{address: address, log: log, getpid: os.Getpid, dialing: make(chan struct{}, 1)}
}

// closeWith closes the connection once owner is unreachable: attestors
// are replaced on reload with no call that would close it.
func (b *systemBus) closeWith(owner *Attestor) {
	runtime.AddCleanup(owner, func(b *systemBus) { b.close() }, b)
}

func (b *systemBus) close() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.conn != nil {
		b.conn.Close()
		b.conn = nil
	}
}

// do runs call on the connection. A call that fails because the bus went
// away under it is made once more on a new connection.
func (b *systemBus) do(ctx context.Context, call func(*dbus.Conn) error) error {
	conn, err := b.connection(ctx)
	if err != nil {
		return err
	}
	err = call(conn)
	if err != nil && !conn.Connected() && ctx.Err() == nil {
		b.drop(conn)
		if conn, err = b.connection(ctx); err != nil {
			return err
		}
		err = call(conn)
	}
	if ctx.Err() != nil {
		return err
	}
	cause := callCause(err)
	b.report(cause, err)
	if cause != "" {
		return fmt.Errorf("%s: %w", cause, err)
	}
	return err
}

// connection returns the connection, dialling it when there is none or the
// bus closed it.
func (b *systemBus) connection(ctx context.Context) (*dbus.Conn, error) {
	if conn := b.current(); conn != nil {
		return conn, nil
	}
	select {
	case b.dialing <- struct{}{}:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	defer func() { <-b.dialing }()
	if conn := b.current(); conn != nil {
		return conn, nil // another caller dialled meanwhile
	}
	conn, err := b.dial(ctx)
	if err != nil {
		err = fmt.Errorf("connecting to the system bus at %s: %w", b.address, err)
		if ctx.Err() == nil {
			b.report(b.dialCause(err), err)
		}
		return nil, err
	}
	b.mu.Lock()
	b.conn = conn
	b.mu.Unlock()
	return conn, nil
}

func (b *systemBus) current() *dbus.Conn {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.conn != nil && !b.conn.Connected() {
		b.conn = nil
	}
	return b.conn
}

func (b *systemBus) drop(conn *dbus.Conn) {
	b.mu.Lock()
	if b.conn == conn {
		b.conn = nil
	}
	b.mu.Unlock()
	conn.Close()
}

// errOtherPIDNamespace: the bus names processes by the PIDs of another
// namespace, so GetUnitByPID would describe some other process.
var errOtherPIDNamespace = errors.New("the system bus sees the agent under another PID: they are in different PID namespaces, and systemd would describe the wrong processes")

// dial connects to the bus within ctx (or dialTimeout), authenticates as
// the agent's user, and checks that the bus sees the agent's own PID.
func (b *systemBus) dial(ctx context.Context) (*dbus.Conn, error) {
	path, err := unixSocketPath(b.address)
	if err != nil {
		return nil, err
	}
	var d net.Dialer
	nc, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, err
	}
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(dialTimeout)
	}
	_ = nc.SetDeadline(deadline)
	// A cancelled ctx cuts a handshake with a bus that does not answer.
	stop := context.AfterFunc(ctx, func() { _ = nc.SetDeadline(time.Unix(1, 0)) })
	conn, err := dbus.NewConn(bufferedConn{Reader: bufio.NewReader(nc), Conn: nc})
	if err != nil {
		stop()
		nc.Close()
		return nil, err
	}
	err = conn.Auth([]dbus.Auth{dbus.AuthExternal(strconv.Itoa(os.Geteuid()))})
	if err == nil {
		err = conn.Hello()
	}
	if err == nil {
		err = b.checkPIDNamespace(ctx, conn)
	}
	if !stop() && err == nil {
		err = ctx.Err()
	}
	if err != nil {
		conn.Close()
		return nil, err
	}
	_ = nc.SetDeadline(time.Time{})
	return conn, nil
}

// checkPIDNamespace asks the bus which PID our connection has: the
// agent's own unless the two see different PID namespaces (an agent in a
// container given the host's bus socket).
func (b *systemBus) checkPIDNamespace(ctx context.Context, conn *dbus.Conn) error {
	names := conn.Names()
	if len(names) == 0 {
		return errors.New("the bus gave the connection no name")
	}
	var pid uint32
	err := conn.BusObject().CallWithContext(ctx, "org.freedesktop.DBus.GetConnectionUnixProcessID", 0, names[0]).Store(&pid)
	if err != nil {
		return fmt.Errorf("asking the bus for the agent's PID: %w", err)
	}
	if int(pid) != b.getpid() {
		return fmt.Errorf("%w (the bus sees pid %d, the agent is pid %d)", errOtherPIDNamespace, pid, b.getpid())
	}
	return nil
}

// bufferedConn reads the bus through a buffer: a message is read in
// several small parts.
type bufferedConn struct {
	*bufio.Reader
	net.Conn
}

func (c bufferedConn) Read(p []byte) (int, error) { return c.Reader.Read(p) }

// unixSocketPath is the socket of a D-Bus address such as
// unix:path=/run/dbus/system_bus_socket (the first usable one of a list).
func unixSocketPath(address string) (string, error) {
	for _, one := range strings.Split(address, ";") {
		transport, params, ok := strings.Cut(one, ":")
		if !ok || transport != "unix" {
			continue
		}
		for _, kv := range strings.Split(params, ",") {
			key, value, _ := strings.Cut(kv, "=")
			value, err := url.PathUnescape(value)
			if err != nil {
				return "", fmt.Errorf("bus address %q: %w", address, err)
			}
			switch key {
			case "path":
				return value, nil
			case "abstract":
				return "@" + value, nil
			}
		}
	}
	return "", fmt.Errorf("bus address %q names no unix:path= or unix:abstract= socket", address)
}

// The causes that keep systemd from answering anyone, and what to do.
const (
	causeNoSystemd  = "systemd is not on the bus"
	causeDenied     = "the bus policy refuses the agent's calls"
	causeOtherPIDNS = "the bus is in another PID namespace"
)

func (b *systemBus) dialCause(err error) string {
	switch {
	case errors.Is(err, errOtherPIDNamespace):
		return causeOtherPIDNS
	case errors.Is(err, syscall.ENOENT):
		return "no bus socket at " + b.address
	case errors.Is(err, syscall.EACCES):
		return "the agent's user may not open the bus socket at " + b.address
	case errors.Is(err, syscall.ECONNREFUSED):
		return "nothing listens on the bus socket at " + b.address
	}
	return "cannot connect to the bus at " + b.address + ": " + err.Error()
}

// callCause is the cause of a failed call that concerns every caller, ""
// for one that concerns only the process asked about.
func callCause(err error) string {
	var dbusErr dbus.Error
	if !errors.As(err, &dbusErr) {
		return ""
	}
	switch dbusErr.Name {
	case "org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner":
		return causeNoSystemd
	case "org.freedesktop.DBus.Error.AccessDenied":
		return causeDenied
	}
	return ""
}

var causeFixes = map[string]string{
	causeNoSystemd:  "systemd must be PID 1 of this host (in a container, run the agent on the host)",
	causeDenied:     "the agent's user needs GetUnitByPID and Properties.Get on org.freedesktop.systemd1, which systemd's bus policy gives every user: look for a local policy that removes them",
	causeOtherPIDNS: "run the agent in the host's PID namespace",
}

// report logs what keeps systemd from answering when its cause changes,
// and once when it answers again.
func (b *systemBus) report(cause string, err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if cause == b.reported {
		return
	}
	was := b.reported
	b.reported = cause
	if cause == "" {
		b.log.Info("systemd answers over the system bus again", "address", b.address, "was", was)
		return
	}
	fix, ok := causeFixes[cause]
	if !ok {
		fix = "start D-Bus (the dbus package) or point DBUS_SYSTEM_BUS_ADDRESS at the system bus"
	}
	b.log.Error("Cannot ask systemd over the system bus; workloads get no systemd selectors until it answers", "cause", cause, "error", err, "fix", fix)
}
