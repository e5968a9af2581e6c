package systemd

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/attestor"
	"github.com/lanyard-dev/lanyard/attestor/selector"
	"github.com/lanyard-dev/lanyard/conf"
	"github.com/lanyard-dev/lanyard/internal/testkit"
)

// newTestAttestor builds the attestor on address, with plugin_data body,
// logging into the returned buffer.
func newTestAttestor(t *testing.T, address, body string) (*Attestor, *testkit.Buffer, error) {
	t.Helper()
	data, err := conf.NewSection("agent.conf", body)
	if err != nil {
		t.Fatal(err)
	}
	log, logs := testkit.NewLogger(hclog.Info)
	a, err := newAttestor(attestor.PluginConfig{Name: PluginName, Data: data, Log: log}, address)
	return a, logs, err
}

// onBus starts a bus with fake on it, and an attestor that dials it.
func onBus(t *testing.T, fake *fakeSystemd) (*Attestor, *testBus, *testkit.Buffer) {
	t.Helper()
	bus := newTestBus(t)
	bus.start()
	fake.serve(t, bus)
	a, logs, err := newTestAttestor(t, bus.address, "")
	if err != nil {
		t.Fatal(err)
	}
	return a, bus, logs
}

// selectorStrings is sels sorted, as type:value separated by spaces.
func selectorStrings(sels []selector.Selector) string {
	var out []string
	for _, s := range selector.Sort(sels) {
		out = append(out, s.String())
	}
	return strings.Join(out, " ")
}

func attest(t *testing.T, a *Attestor, pid int) ([]selector.Selector, error) {
	t.Helper()
	return a.Attest(testkit.Context(t, waitLimit), attestor.Process{PID: int32(pid)})
}

func TestConfig(t *testing.T) {
	if _, _, err := newTestAttestor(t, "unix:path=/nonexistent/bus", ""); err != nil {
		t.Errorf("no plugin_data: %v", err)
	}
	_, _, err := newTestAttestor(t, "unix:path=/nonexistent/bus", "\nsocket_path = \"/run/dbus\"\n")
	if err == nil || !strings.Contains(err.Error(), "agent.conf:2:") || !strings.Contains(err.Error(), "socket_path") {
		t.Errorf("an unknown key: %v, want an error at agent.conf:2 naming it", err)
	}
}

func TestRegistered(t *testing.T) {
	r, ok := attestor.Lookup(PluginName)
	if !ok || r.InProcess {
		t.Fatalf("%s: registered %v, in process %v: want registered to run on a worker", PluginName, ok, r.InProcess)
	}
}

func TestUnixSocketPath(t *testing.T) {
	for address, want := range map[string]string{
		"unix:path=/run/dbus/system_bus_socket":           "/run/dbus/system_bus_socket",
		"unix:path=/tmp/a%20b,guid=0123":                  "/tmp/a b",
		"tcp:host=localhost,port=1;unix:abstract=/x/bus1": "@/x/bus1",
	} {
		if got, err := unixSocketPath(address); err != nil || got != want {
			t.Errorf("unixSocketPath(%q) = %q, %v; want %q", address, got, err, want)
		}
	}
	for _, address := range []string{"", "tcp:host=localhost,port=1", "unix:tmpdir=/tmp"} {
		if got, err := unixSocketPath(address); err == nil {
			t.Errorf("unixSocketPath(%q) = %q, want an error", address, got)
		}
	}
}

// TestAttest: systemd's answers become SPIRE's selectors, through a real
// bus whose policy is systemd's own.
func TestAttest(t *testing.T) {
	service, scope, missing := os.Getpid(), os.Getppid(), 1<<22+1
	a, _, logs := onBus(t, &fakeSystemd{units: map[uint32]unit{
		uint32(service): {id: "web-api.service", fragmentPath: "/etc/systemd/system/web-api.service"},
		uint32(scope):   {id: "session-3.scope"},
	}})
	for pid, want := range map[int]string{
		service: "systemd:fragment_path:/etc/systemd/system/web-api.service systemd:id:web-api.service",
		// A scope has no unit file: an empty path, as SPIRE gives it.
		scope: "systemd:fragment_path: systemd:id:session-3.scope",
	} {
		sels, err := attest(t, a, pid)
		if err != nil {
			t.Fatalf("pid %d: %v", pid, err)
		}
		if got := selectorStrings(sels); got != want {
			t.Errorf("pid %d: %s, want %s", pid, got, want)
		}
	}
	_, err := attest(t, a, missing)
	if err == nil || !strings.Contains(err.Error(), "systemd has no unit for pid") {
		t.Errorf("a pid in no unit: %v", err)
	}
	if logs.String() != "" {
		t.Errorf("logged with systemd answering:\n%s", logs)
	}
}

// TestNoBusLoggedOnce: without a bus every attestation fails with the
// reason, which is logged once; once the bus and systemd are there, the
// next attestation dials and succeeds, and that is logged once.
func TestNoBusLoggedOnce(t *testing.T) {
	bus := newTestBus(t)
	a, logs, err := newTestAttestor(t, bus.address, "")
	if err != nil {
		t.Fatal(err)
	}
	for range 3 {
		_, err := attest(t, a, os.Getpid())
		if err == nil || !strings.Contains(err.Error(), bus.address) {
			t.Fatalf("with no bus: %v, want an error naming its address", err)
		}
	}
	if n := strings.Count(logs.String(), "[ERROR]"); n != 1 || !strings.Contains(logs.String(), "no bus socket at "+bus.address) {
		t.Fatalf("logged %d errors for three attestations without a bus, want 1 with its cause:\n%s", n, logs)
	}

	bus.start()
	for range 2 {
		_, err := attest(t, a, os.Getpid())
		if err == nil || !strings.Contains(err.Error(), causeNoSystemd) {
			t.Fatalf("with no systemd on the bus: %v", err)
		}
	}
	if n := strings.Count(logs.String(), causeNoSystemd); n != 1 {
		t.Fatalf("logged %q %d times, want once:\n%s", causeNoSystemd, n, logs)
	}

	(&fakeSystemd{units: map[uint32]unit{uint32(os.Getpid()): {id: "a.service"}}}).serve(t, bus)
	logs.Reset()
	for range 2 {
		if _, err := attest(t, a, os.Getpid()); err != nil {
			t.Fatal(err)
		}
	}
	if n := strings.Count(logs.String(), "answers over the system bus again"); n != 1 {
		t.Errorf("logged the recovery %d times, want once:\n%s", n, logs)
	}
}

// TestBusRestart: a bus that goes away and comes back is dialled again.
func TestBusRestart(t *testing.T) {
	units := map[uint32]unit{uint32(os.Getpid()): {id: "a.service", fragmentPath: "/lib/systemd/system/a.service"}}
	a, bus, _ := onBus(t, &fakeSystemd{units: units})
	if _, err := attest(t, a, os.Getpid()); err != nil {
		t.Fatal(err)
	}
	first := a.bus.current()

	bus.stop()
	if _, err := attest(t, a, os.Getpid()); err == nil {
		t.Fatal("attested with the bus stopped")
	}
	bus.start()
	(&fakeSystemd{units: units}).serve(t, bus)
	if _, err := attest(t, a, os.Getpid()); err != nil {
		t.Fatalf("after the bus restarted: %v", err)
	}
	if a.bus.current() == first {
		t.Error("the connection to the stopped bus is still in use")
	}
}

// TestAttestHonoursCtx: a systemd that does not answer holds the
// attestation only until its ctx ends.
func TestAttestHonoursCtx(t *testing.T) {
	fake := &fakeSystemd{units: map[uint32]unit{}, block: make(chan struct{})}
	t.Cleanup(func() { close(fake.block) })
	a, _, logs := onBus(t, fake)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		_, err := a.Attest(ctx, attestor.Process{PID: int32(os.Getpid())})
		done <- err
	}()
	testkit.WaitFor(t, waitLimit, "the call to reach systemd", func() bool {
		fake.mu.Lock()
		defer fake.mu.Unlock()
		return fake.calls == 1
	})
	cancel()
	if err := testkit.Receive(t, done, waitLimit, "the attestation to end with its ctx"); !errors.Is(err, context.Canceled) {
		t.Errorf("got %v, want context.Canceled", err)
	}
	if logs.String() != "" {
		t.Errorf("a caller that gave up was logged:\n%s", logs)
	}
}

// TestOtherPIDNamespace: a bus that sees the agent under another PID
// (another PID namespace) is refused, since systemd would describe other
// processes than the callers.
func TestOtherPIDNamespace(t *testing.T) {
	a, _, logs := onBus(t, &fakeSystemd{units: map[uint32]unit{uint32(os.Getpid()): {id: "a.service"}}})
	a.bus.getpid = func() int { return os.Getpid() + 1 }
	for range 2 {
		if _, err := attest(t, a, os.Getpid()); !errors.Is(err, errOtherPIDNamespace) {
			t.Fatalf("got %v, want errOtherPIDNamespace", err)
		}
	}
	if n := strings.Count(logs.String(), causeOtherPIDNS); n != 1 {
		t.Errorf("logged %d times, want once:\n%s", n, logs)
	}
}

// TestUnprivilegedAgent: the agent runs as a user of its own
// (deploy/systemd), and systemd's bus policy lets any user make the calls
// the attestor makes. A copy of this test binary runs as nobody and
// attests this process.
func TestUnprivilegedAgent(t *testing.T) {
	bus := newTestBus(t)
	bus.start()
	(&fakeSystemd{units: map[uint32]unit{
		uint32(os.Getpid()): {id: "web-api.service", fragmentPath: "/etc/systemd/system/web-api.service"},
	}}).serve(t, bus)
	bin := filepath.Join(testkit.ShortDir(t, "bin-"), "systemd.test")
	exe, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, exe, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := testkit.HelperCommand(bin, "TestHelperAttestParent", "LANYARD_TEST_BUS="+bus.address)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobody, Gid: nobody}}
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "selectors: systemd:fragment_path:/etc/systemd/system/web-api.service systemd:id:web-api.service\n") {
		t.Fatalf("attesting as uid %d: %v\n%s", nobody, err, out)
	}
}

const nobody = 65534

// TestHelperAttestParent is TestUnprivilegedAgent's child: it attests its
// parent through the bus at LANYARD_TEST_BUS.
func TestHelperAttestParent(t *testing.T) {
	address := os.Getenv("LANYARD_TEST_BUS")
	if address == "" {
		t.Skip("run by TestUnprivilegedAgent")
	}
	if os.Geteuid() != nobody {
		t.Fatalf("runs as uid %d, want %d", os.Geteuid(), nobody)
	}
	a, _, err := newTestAttestor(t, address, "")
	if err != nil {
		t.Fatal(err)
	}
	sels, err := attest(t, a, os.Getppid())
	if err != nil {
		t.Fatal(err)
	}
	fmt.Printf("selectors: %s\n", selectorStrings(sels))
}

// TestConnectionClosedWithAttestor: an attestor dropped on reload takes
// its connection with it.
func TestConnectionClosedWithAttestor(t *testing.T) {
	a, _, _ := onBus(t, &fakeSystemd{units: map[uint32]unit{uint32(os.Getpid()): {id: "a.service"}}})
	if _, err := attest(t, a, os.Getpid()); err != nil {
		t.Fatal(err)
	}
	conn := a.bus.current()
	a = nil
	testkit.WaitFor(t, waitLimit, "the connection to close once the attestor is unreachable", func() bool {
		runtime.GC()
		return !conn.Connected()
	})
}
