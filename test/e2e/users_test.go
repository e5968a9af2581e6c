package e2e

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"golang.org/x/sys/unix"
)

// Other users on the node. They need no passwd entry.
const (
	attackerUID = 47001 // a shell on the node, no registration entry
	victimUID   = 47002 // a workload with an entry
)

// roleArg makes the test binary play a role instead of running tests: a
// process under another uid (a process's uid is what the agent sees), or
// the agent started under a lower open-file limit.
const roleArg = "-e2e.role"

// roleBin is the test binary where every user can run it.
var roleBin string

// placeRoleBin links (or copies) the test binary into dir, which every user
// may read: go test's own build directory is private.
func placeRoleBin(dir string) error {
	self, err := os.Executable()
	if err != nil {
		return err
	}
	roleBin = filepath.Join(dir, "e2e-role")
	if err := os.Link(self, roleBin); err == nil {
		return os.Chmod(roleBin, 0o755)
	}
	data, err := os.ReadFile(self)
	if err != nil {
		return err
	}
	return os.WriteFile(roleBin, data, 0o755)
}

// runRole plays the role named by args[0]; it returns the exit code.
func runRole(args []string) int {
	if len(args) == 0 {
		fmt.Fprintln(os.Stderr, "no role")
		return 2
	}
	var err error
	switch role, rest := args[0], args[1:]; role {
	case "nofile":
		err = execWithNofile(rest)
	case "hold":
		err = holdConnections(rest, func(int) (net.Conn, error) { return net.Dial("unix", rest[0]) })
	case "userns-hold":
		err = usernsHold(rest)
	case "userns-hold-inside":
		// Its parent-death signal is gone (it changed credentials):
		// it goes when the pipe from its parent closes.
		go func() {
			_, _ = io.Copy(io.Discard, os.Stdin)
			os.Exit(0)
		}()
		err = holdConnections(rest, dialAsUID(rest[0]))
	case "fetch":
		err = fetchRepeatedly(rest)
	case "swap":
		err = swapSocket(rest)
	case "connect-then-become":
		err = connectThenBecome(rest)
	case "peer-child":
		err = peerChild(rest)
	case "setuid-window":
		err = setuidWindow()
	default:
		err = fmt.Errorf("unknown role %q", role)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// execWithNofile lowers RLIMIT_NOFILE to args[0] and execs args[1:], so
// that the agent sizes its connection limit from it as it would under
// systemd's LimitNOFILE.
func execWithNofile(args []string) error {
	n, err := strconv.ParseUint(args[0], 10, 64)
	if err != nil {
		return err
	}
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &unix.Rlimit{Cur: n, Max: n}); err != nil {
		return err
	}
	return syscall.Exec(args[1], args[1:], os.Environ())
}

// roleLifetime bounds a role process in case the test never stops it.
const roleLifetime = 3 * time.Minute

// holdConnections is the attacker of the flood tests: it keeps args[1]
// connections open on the socket args[0], the odd ones with a gRPC health
// Watch stream open (anyone may call it), the even ones idle after the
// HTTP/2 handshake, and opens a new one whenever the agent closes one. It
// prints "held N" when the number the agent serves changes. Connection i
// is made by dial(i).
func holdConnections(args []string, dial func(i int) (net.Conn, error)) error {
	n, err := strconv.Atoi(args[1])
	if err != nil {
		return err
	}
	var held atomic.Int64
	changed := make(chan struct{}, 1)
	note := func(d int64) {
		held.Add(d)
		select {
		case changed <- struct{}{}:
		default:
		}
	}
	for i := range n {
		go func() {
			for {
				if c, err := dial(i); err == nil {
					if openHTTP2(c, i%2 == 1) {
						note(1)
						_, _ = io.Copy(io.Discard, c)
						note(-1)
					}
					c.Close()
				}
				// Paced, so that a refused attacker does not take the
				// machine's two cores from the agent.
				time.Sleep(50 * time.Millisecond)
			}
		}()
	}
	end := time.After(roleLifetime)
	last := int64(-1)
	for {
		select {
		case <-changed:
			if now := held.Load(); now != last {
				fmt.Println("held", now)
				last = now
			}
		case <-end:
			return nil
		}
	}
}

// usernsMapBase is where the attacker's subordinate uids start on the
// host, as /etc/subuid gives (100000 there, clear of the test's uids here).
const usernsMapBase = 300000

// usernsHold is the attacker of a user namespace of their own: run as a
// user with CAP_SETUID and CAP_SETGID (what the setuid newuidmap and
// newgidmap use on their behalf), it makes a user namespace mapping 0 to
// itself and 1..65535 to usernsMapBase+1.., as newuidmap does for an
// /etc/subuid range, and holds connections from inside it as in
// holdConnections, connection i as inner uid i+1: each from its own host
// uid.
func usernsHold(args []string) error {
	self, err := os.Executable()
	if err != nil {
		return err
	}
	cmd := exec.Command(self, append([]string{roleArg, "userns-hold-inside"}, args...)...)
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	// Held open until this process dies, to tell the child.
	if _, err := cmd.StdinPipe(); err != nil {
		return err
	}
	cmd.SysProcAttr = testkit.UserNamespace(usernsMapBase+1, 65535)
	return cmd.Run()
}

// dialAsUID dials socket as euid i+1.
func dialAsUID(socket string) func(i int) (net.Conn, error) {
	return func(i int) (net.Conn, error) { return testkit.DialAs(socket, i+1) }
}

// openHTTP2 sends the HTTP/2 preface, and a health Watch call when stream,
// and reports whether the server answered with its first frame: the
// connection was served, not refused.
func openHTTP2(c net.Conn, stream bool) bool {
	if _, err := io.WriteString(c, http2.ClientPreface); err != nil {
		return false
	}
	fr := http2.NewFramer(c, bufio.NewReader(c))
	if err := fr.WriteSettings(); err != nil {
		return false
	}
	if stream {
		var hdr bytes.Buffer
		enc := hpack.NewEncoder(&hdr)
		for _, f := range [][2]string{
			{":method", "POST"}, {":scheme", "http"}, {":path", "/grpc.health.v1.Health/Watch"},
			{":authority", "localhost"}, {"content-type", "application/grpc"}, {"te", "trailers"},
		} {
			_ = enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
		}
		if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: hdr.Bytes(), EndHeaders: true}); err != nil {
			return false
		}
		// An empty HealthCheckRequest: the whole server's status.
		if err := fr.WriteData(1, true, []byte{0, 0, 0, 0, 0}); err != nil {
			return false
		}
	}
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := fr.ReadFrame(); err != nil {
		return false
	}
	_ = c.SetReadDeadline(time.Time{})
	return true
}

// fetchRepeatedly is the victim: args[1] times, a new client on the socket
// args[0] fetches its X509-SVID. It prints "ok" or "fail: <error>" for each.
func fetchRepeatedly(args []string) error {
	socket := args[0]
	n, err := strconv.Atoi(args[1])
	if err != nil {
		return err
	}
	for range n {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err := workloadapi.FetchX509SVID(ctx, workloadapi.WithAddr("unix://"+socket))
		cancel()
		if err != nil {
			fmt.Println("fail:", err)
		} else {
			fmt.Println("ok")
		}
	}
	return nil
}

// swapSocket is the attacker of a socket directory they own: it moves the
// agent's socket args[0] aside, listens in its place, prints "swapped", and
// prints "connected" for the first workload that connects.
func swapSocket(args []string) error {
	socket := args[0]
	if err := os.Rename(socket, socket+".agent"); err != nil {
		return err
	}
	l, err := net.Listen("unix", socket)
	if err != nil {
		return err
	}
	defer l.Close()
	if err := os.Chmod(socket, 0o777); err != nil {
		return err
	}
	fmt.Println("swapped")
	if ul, ok := l.(*net.UnixListener); ok {
		_ = ul.SetDeadline(time.Now().Add(roleLifetime))
	}
	c, err := l.Accept()
	if err != nil {
		return err
	}
	c.Close()
	fmt.Println("connected")
	return nil
}

// startRole runs a role under uid. It is killed when the test ends.
func startRole(t *testing.T, uid int, args ...string) *testkit.Child {
	t.Helper()
	return startRoleCaps(t, uid, nil, args...)
}

// startRoleCaps runs a role under uid with the capabilities caps.
func startRoleCaps(t *testing.T, uid int, caps []uintptr, args ...string) *testkit.Child {
	t.Helper()
	cmd := exec.Command(roleBin, append([]string{roleArg}, args...)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Credential:  &syscall.Credential{Uid: uint32(uid), Gid: uint32(uid), NoSetGroups: true},
		AmbientCaps: caps,
		Pdeathsig:   syscall.SIGKILL,
	}
	return testkit.StartChild(t, cmd)
}

// heldCount parses the attacker's "held N".
func heldCount(line string) (int, bool) {
	rest, ok := strings.CutPrefix(line, "held ")
	if !ok {
		return 0, false
	}
	n, err := strconv.Atoi(rest)
	return n, err == nil
}
