package agent

import (
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/internal/testkit"
)

// TestPeerKeyHelperProcess is not a test: it is a peer of the peer key
// tests, run as a child process. LANYARD_PEERKEY_HELPER is the socket,
// LANYARD_PEERKEY_STEPS what to do, in order:
//
//	userns=B     go on in a new user namespace mapping 0 to the current
//	             euid and 1..1000 to B..B+999 (as newuidmap does)
//	connect=U,…  connect once as each euid U (- for the current one)
//
// It prints "connected N" after each connect step and holds every
// connection until its stdin closes.
func TestPeerKeyHelperProcess(t *testing.T) {
	socket := os.Getenv("LANYARD_PEERKEY_HELPER")
	if socket == "" {
		t.Skip("only runs as a child of the peer key tests")
	}
	if err := peerKeyHelper(socket, strings.Fields(os.Getenv("LANYARD_PEERKEY_STEPS"))); err != nil {
		fmt.Fprintln(os.Stderr, "helper:", err)
		os.Exit(1)
	}
	os.Exit(0)
}

func peerKeyHelper(socket string, steps []string) error {
	var conns []net.Conn
	for i, step := range steps {
		name, arg, _ := strings.Cut(step, "=")
		switch name {
		case "userns":
			base, err := strconv.Atoi(arg)
			if err != nil {
				return err
			}
			cmd := testkit.HelperCommand("", "TestPeerKeyHelperProcess", "LANYARD_PEERKEY_STEPS="+strings.Join(steps[i+1:], " "))
			cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
			cmd.SysProcAttr = testkit.UserNamespace(base, 1000)
			// The rest happens in the child; the connections made so
			// far stay open until it exits.
			return cmd.Run()
		case "connect":
			for _, u := range strings.Split(arg, ",") {
				c, err := dialAs(socket, u)
				if err != nil {
					return err
				}
				conns = append(conns, c)
			}
			fmt.Println("connected", len(conns))
		default:
			return fmt.Errorf("unknown step %q", step)
		}
	}
	_, _ = io.Copy(io.Discard, os.Stdin)
	for _, c := range conns {
		c.Close()
	}
	return nil
}

// dialAs connects as euid u ("-": as this process is).
func dialAs(socket, u string) (net.Conn, error) {
	if u == "-" {
		return net.Dial("unix", socket)
	}
	uid, err := strconv.Atoi(u)
	if err != nil {
		return nil, err
	}
	return testkit.DialAs(socket, uid)
}

// peerKeyEnv is a listener on a socket every uid can reach, and a copy of
// the test binary every uid can run (go test's build directory is private).
type peerKeyEnv struct {
	t      *testing.T
	bin    string
	socket string
	l      *limitListener
	log    *testkit.Buffer
	conns  chan *limitConn
}

func newPeerKeyEnv(t *testing.T) *peerKeyEnv {
	testkit.RequireRoot(t, "to make user namespaces that map several uids")
	dir := testkit.ShortDir(t, "peerkey-")
	self, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	e := &peerKeyEnv{t: t, bin: filepath.Join(dir, "agent.test"), socket: filepath.Join(dir, "s"), conns: make(chan *limitConn, 64)}
	if err := os.WriteFile(e.bin, self, 0o755); err != nil {
		t.Fatal(err)
	}
	ul, err := net.Listen("unix", e.socket)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(e.socket, 0o777); err != nil {
		t.Fatal(err)
	}
	var log hclog.Logger
	log, e.log = testkit.NewLogger(hclog.Warn)
	e.l = newLimitListener(ul, 64, log)
	t.Cleanup(func() { e.l.Close() })
	go func() {
		for {
			c, err := e.l.Accept()
			if err != nil {
				return
			}
			t.Cleanup(func() { c.Close() })
			e.conns <- c.(*limitConn)
		}
	}()
	return e
}

// peer runs the helper's steps as uid (with CAP_SETUID and CAP_SETGID, as
// newuidmap has, when not root) and returns the keys of the n connections
// it makes.
func (e *peerKeyEnv) peer(uid int, steps string, n int) []peerKey {
	t := e.t
	cmd := testkit.HelperCommand(e.bin, "TestPeerKeyHelperProcess", "LANYARD_PEERKEY_HELPER="+e.socket, "LANYARD_PEERKEY_STEPS="+steps)
	cmd.Dir = filepath.Dir(e.bin)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if uid != 0 {
		cmd.SysProcAttr.Credential = &syscall.Credential{Uid: uint32(uid), Gid: uint32(uid), NoSetGroups: true}
		cmd.SysProcAttr.AmbientCaps = []uintptr{6 /* CAP_SETGID */, 7 /* CAP_SETUID */}
	}
	child := testkit.StartChild(t, cmd)
	var keys []peerKey
	for len(keys) < n {
		select {
		case c := <-e.conns:
			keys = append(keys, c.key)
		case <-time.After(20 * time.Second):
			t.Fatalf("the peer made %d of %d connections; stderr:\n%s", len(keys), n, child.Stderr.String())
		}
	}
	return keys
}

func sameKeys(t *testing.T, what string, keys []peerKey, want peerKey) {
	t.Helper()
	for i, k := range keys {
		if k != want {
			t.Fatalf("%s: connection %d is keyed %v, want %v (all: %v)", what, i, k.logArgs(), want.logArgs(), keys)
		}
	}
}

// TestPeerKeyRootMadeNamespaceIsOneKey: a container runtime (root) makes a
// user namespace mapping 1,001 host uids; connections as several of them,
// and from a namespace nested inside, count as that one namespace.
func TestPeerKeyRootMadeNamespaceIsOneKey(t *testing.T) {
	e := newPeerKeyEnv(t)
	keys := e.peer(0, "userns=300000 connect=0,1,2,999 userns=1 connect=0,5", 6)
	if keys[0].userns == 0 || keys[0].uid != 0 {
		t.Fatalf("keyed %v, want the namespace, owned by root", keys[0].logArgs())
	}
	sameKeys(t, "one root-made namespace", keys, keys[0])
	// Another container is another key.
	other := e.peer(0, "userns=400000 connect=0,1", 2)
	sameKeys(t, "another root-made namespace", other, other[0])
	if other[0] == keys[0] {
		t.Fatalf("two containers share the key %v", keys[0].logArgs())
	}
	// Peers in the agent's namespace are keyed by uid, as before.
	direct := e.peer(0, "connect=-,47003", 2)
	if direct[0] != uidKey(0) || direct[1] != uidKey(47003) {
		t.Fatalf("peers in the agent's namespace keyed %v and %v", direct[0].logArgs(), direct[1].logArgs())
	}
}

// TestPeerKeyUserNamespacesAreTheirOwner: the finding's attack. A user
// with a subordinate uid range (newuidmap) connects as many uids from a
// namespace of theirs, from a namespace nested in it, from a second
// namespace, and directly: all of it is that user.
func TestPeerKeyUserNamespacesAreTheirOwner(t *testing.T) {
	const user = 47004
	e := newPeerKeyEnv(t)
	keys := e.peer(user, "userns=200000 connect=0,1,2,3,500,999 userns=1 connect=0,7", 8)
	keys = append(keys, e.peer(user, "userns=201000 connect=0,1", 2)...)
	keys = append(keys, e.peer(user, "connect=-", 1)...)
	sameKeys(t, "uid 47004's namespaces", keys, uidKey(user))

	// So with a cap of 64 the user holding all of it cannot keep another
	// out: the share is 64/2, not 64/(uids held + 1).
	for range 64 - len(keys) {
		a, b := net.Pipe()
		t.Cleanup(func() { a.Close(); b.Close() })
		c := &limitConn{Conn: a, l: e.l, key: uidKey(user)}
		if _, ok := e.l.admit(c); !ok {
			t.Fatal("refused under the cap")
		}
	}
	victim := e.peer(0, "connect=47005", 1)
	if victim[0] != uidKey(47005) {
		t.Fatalf("the victim is keyed %v", victim[0].logArgs())
	}
	if !strings.Contains(e.log.String(), "uid=47004") {
		t.Errorf("the user holding the most is not named:\n%s", e.log.String())
	}
}

// TestPeerKeyHiddenNamespaces: an agent that may not open other users'
// namespaces tells peers of its own namespace by their uid_map, and keys
// all the others together.
func TestPeerKeyHiddenNamespaces(t *testing.T) {
	testkit.RequireRoot(t, "to make a user namespace that maps several uids")
	cmd := exec.Command("sleep", "60")
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Cloneflags:  syscall.CLONE_NEWUSER,
		UidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: 300000, Size: 1000}},
		GidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: 300000, Size: 1000}},
		Pdeathsig:   syscall.SIGKILL,
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	log, buf := testkit.NewLogger(hclog.Warn)
	k := newPeerKeyer(log)
	self := int32(os.Getpid())
	if got := k.hiddenKey("/proc/"+strconv.Itoa(int(self)), self, 47006); got != uidKey(47006) {
		t.Fatalf("a peer of the agent's namespace is keyed %v", got.logArgs())
	}
	pid := int32(cmd.Process.Pid)
	for range 2 {
		if got := k.hiddenKey("/proc/"+strconv.Itoa(int(pid)), pid, 300001); got.userns != hiddenUserns {
			t.Fatalf("a peer of another namespace is keyed %v", got.logArgs())
		}
	}
	if n := strings.Count(buf.String(), "cannot see the user namespaces"); n != 1 {
		t.Fatalf("warned %d times, want once:\n%s", n, buf.String())
	}
}
