package systemd

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/godbus/dbus/v5"
	"github.com/godbus/dbus/v5/prop"
	"github.com/lanyard-dev/lanyard/internal/testkit"
)

// waitLimit bounds every wait for something that must happen.
const waitLimit = 15 * time.Second

// systemdPolicy is the bus policy systemd ships for its name: who may own
// it and which of its methods each user may call.
const systemdPolicy = "/usr/share/dbus-1/system.d/org.freedesktop.systemd1.conf"

// busConfig is a system bus as Debian's system.conf makes it (method calls
// denied unless a policy allows them), on a socket of the test's, with
// systemd's own policy for org.freedesktop.systemd1.
const busConfig = `<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path=%s</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
  </policy>
  <include>%s</include>
</busconfig>
`

// testBus is a private dbus-daemon, the real one, that the test starts
// and stops.
type testBus struct {
	t       *testing.T
	daemon  string
	config  string
	socket  string
	address string
	cmd     *exec.Cmd
	exited  chan struct{}
}

// newTestBus prepares a bus whose socket is in a directory of its own;
// start runs it.
func newTestBus(t *testing.T) *testBus {
	t.Helper()
	testkit.RequireRoot(t, "systemd's bus policy lets only root own org.freedesktop.systemd1")
	daemon := requireDBusDaemon(t)
	if _, err := os.Stat(systemdPolicy); err != nil {
		msg := fmt.Sprintf("systemd's bus policy is missing (%v): install systemd", err)
		if os.Getenv("CI") != "" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	dir := testkit.ShortDir(t, "bus-")
	b := &testBus{t: t, daemon: daemon, socket: filepath.Join(dir, "bus.sock"), config: filepath.Join(dir, "bus.conf")}
	b.address = "unix:path=" + b.socket
	if err := os.WriteFile(b.config, []byte(fmt.Sprintf(busConfig, b.socket, systemdPolicy)), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(b.stop)
	return b
}

// requireDBusDaemon finds dbus-daemon, installing it from Debian when
// missing; without it the test skips, or fails under CI.
func requireDBusDaemon(t *testing.T) string {
	t.Helper()
	if path, err := exec.LookPath("dbus-daemon"); err == nil {
		return path
	}
	out, err := exec.Command("../../../scripts/install-debian.sh", "dbus-daemon:dbus-daemon").CombinedOutput()
	if path, lookErr := exec.LookPath("dbus-daemon"); lookErr == nil {
		return path
	}
	if os.Getenv("CI") != "" {
		t.Fatalf("dbus-daemon is missing and scripts/install-debian.sh did not install it: %v\n%s", err, out)
	}
	t.Skipf("dbus-daemon is missing: %v\n%s", err, out)
	return ""
}

// start runs the daemon and returns once it listens (it prints its
// address then).
func (b *testBus) start() {
	b.t.Helper()
	b.cmd = exec.Command(b.daemon, "--config-file="+b.config, "--nofork", "--print-address=1")
	b.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out, err := b.cmd.StdoutPipe()
	if err != nil {
		b.t.Fatal(err)
	}
	logs := &testkit.Buffer{}
	b.cmd.Stderr = logs
	if err := b.cmd.Start(); err != nil {
		b.t.Fatal(err)
	}
	b.exited = make(chan struct{})
	printed := make(chan string, 1)
	go func() {
		line, _ := bufio.NewReader(out).ReadString('\n')
		printed <- line
		_ = b.cmd.Wait()
		close(b.exited)
	}()
	if line := testkit.Receive(b.t, printed, waitLimit, "dbus-daemon to listen"); !strings.HasPrefix(line, b.address) {
		b.t.Fatalf("dbus-daemon printed %q, want its address %s; its log:\n%s", line, b.address, logs)
	}
}

// stop ends the daemon (SIGTERM: it removes its socket) and waits for it.
func (b *testBus) stop() {
	if b.exited == nil {
		return
	}
	_ = b.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-b.exited:
	case <-time.After(waitLimit):
		_ = b.cmd.Process.Kill()
		<-b.exited
	}
	b.exited = nil
}

// unit is what the fake systemd says of one unit.
type unit struct {
	id, fragmentPath string
}

// fakeSystemd owns org.freedesktop.systemd1 on a bus and answers as
// systemd does: Manager.GetUnitByPID gives the unit's object path (or the
// NoUnitForPID error), and the unit object has the properties Id and
// FragmentPath on org.freedesktop.systemd1.Unit.
type fakeSystemd struct {
	units map[uint32]unit
	// block, when not nil, holds every GetUnitByPID until it is closed.
	block chan struct{}

	mu    sync.Mutex
	calls int
}

// GetUnitByPID is the D-Bus method of org.freedesktop.systemd1.Manager.
func (f *fakeSystemd) GetUnitByPID(pid uint32) (dbus.ObjectPath, *dbus.Error) {
	f.mu.Lock()
	f.calls++
	f.mu.Unlock()
	if f.block != nil {
		<-f.block
	}
	u, ok := f.units[pid]
	if !ok {
		return "", dbus.NewError("org.freedesktop.systemd1.NoUnitForPID", []any{fmt.Sprintf("PID %d does not belong to any loaded unit.", pid)})
	}
	return unitPath(u.id), nil
}

// unitPath is the object path systemd gives a unit: its name with every
// byte but letters and digits escaped as _xx.
func unitPath(id string) dbus.ObjectPath {
	var b strings.Builder
	for _, c := range []byte(id) {
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' {
			b.WriteByte(c)
		} else {
			fmt.Fprintf(&b, "_%02x", c)
		}
	}
	return dbus.ObjectPath("/org/freedesktop/systemd1/unit/" + b.String())
}

// serve connects f to the bus and takes systemd's name, until the test
// ends.
func (f *fakeSystemd) serve(t *testing.T, b *testBus) {
	t.Helper()
	conn, err := dbus.Connect(b.address)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	if err := conn.Export(f, systemdPath, "org.freedesktop.systemd1.Manager"); err != nil {
		t.Fatal(err)
	}
	for _, u := range f.units {
		_, err := prop.Export(conn, unitPath(u.id), prop.Map{unitInterface: {
			"Id":           {Value: u.id, Emit: prop.EmitFalse},
			"FragmentPath": {Value: u.fragmentPath, Emit: prop.EmitFalse},
		}})
		if err != nil {
			t.Fatal(err)
		}
	}
	reply, err := conn.RequestName(systemdName, dbus.NameFlagDoNotQueue)
	if err != nil || reply != dbus.RequestNameReplyPrimaryOwner {
		t.Fatalf("taking %s on the bus: reply %v, %v", systemdName, reply, err)
	}
}
