package attestor

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testkit"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/peer"
)

// The test binary doubles as the child process these tests need; the mode
// is chosen by this environment variable.
const helperEnv = "LANYARD_PEER_HELPER"

// TestPeerHelperProcess is not a test: it is the body of the child processes
// started by startHelper.
func TestPeerHelperProcess(t *testing.T) {
	mode := os.Getenv(helperEnv)
	if mode == "" {
		t.Skip("only runs as a child process of the other tests")
	}
	sock := os.Getenv("LANYARD_PEER_SOCK")
	switch mode {
	case "wait":
		// Live until the parent closes stdin (or kills us), at most 60 s.
		go func() { io.Copy(io.Discard, os.Stdin); os.Exit(0) }()
		time.Sleep(60 * time.Second)
	case "connect-wait":
		// Connect and hold the connection until stdin closes.
		c, err := net.Dial("unix", sock)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		io.Copy(io.Discard, os.Stdin)
		c.Close()
	case "connect":
		// Connect and exit without waiting for the server to accept.
		c, err := net.Dial("unix", sock)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		c.Write([]byte{1})
	case "serve":
		// Accept one connection and print what Verify says about it.
		l, err := net.Listen("unix", sock)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		fmt.Println("listening")
		conn, err := l.Accept()
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		_, ai, err := Credentials().ServerHandshake(conn)
		if err != nil {
			fmt.Println("handshake:", err)
			os.Exit(0)
		}
		c := ai.(*AuthInfo).Caller
		fmt.Printf("pid=%d verify=%v notvisible=%v\n", c.PID, c.Verify(), errors.Is(c.Verify(), ErrCallerNotVisible))
	}
	os.Exit(0)
}

// startHelper runs the test binary (or a link to it at path, to give the
// process another name) in the given mode; the kit kills and reaps it at
// cleanup.
func startHelper(t *testing.T, path, mode string, env ...string) *testkit.Child {
	t.Helper()
	// GORACE: a -race binary otherwise sleeps a second before exiting.
	cmd := testkit.HelperCommand(path, "TestPeerHelperProcess", append([]string{helperEnv + "=" + mode, "GORACE=atexit_sleep_ms=0"}, env...)...)
	cmd.Stderr = os.Stderr
	return testkit.StartChild(t, cmd)
}

// reaped waits until the child has exited and was waited for (its PID is
// free for reuse) and says whether it failed.
func reaped(c *testkit.Child) error {
	<-c.Exited
	if st := c.Cmd.ProcessState; !st.Success() {
		return errors.New(st.String())
	}
	return nil
}

func startServer(t *testing.T, interceptor grpc.UnaryServerInterceptor) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "api.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	opts := []grpc.ServerOption{grpc.Creds(Credentials())}
	if interceptor != nil {
		opts = append(opts, grpc.UnaryInterceptor(interceptor))
	}
	srv := grpc.NewServer(opts...)
	healthpb.RegisterHealthServer(srv, health.NewServer())
	done := make(chan struct{})
	go func() { defer close(done); srv.Serve(l) }()
	t.Cleanup(func() { srv.Stop(); <-done })
	return sock
}

func dial(t *testing.T, sock string) *grpc.ClientConn {
	t.Helper()
	cc, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(Credentials()))
	if err != nil {
		t.Fatal(err)
	}
	return cc
}

func check(t *testing.T, cc *grpc.ClientConn) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := healthpb.NewHealthClient(cc).Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
		t.Fatalf("health check over the Unix socket: %v", err)
	}
}

func TestCredentialsIdentifyCaller(t *testing.T) {
	type seen struct {
		ok       bool
		pid      int32
		uid, gid uint32
		verify   error
		authType string
	}
	var mu sync.Mutex
	var calls []seen
	sock := startServer(t, func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		c, ok := CallerFromContext(ctx)
		s := seen{ok: ok}
		if ok {
			s.pid, s.uid, s.gid, s.verify = c.PID, c.UID, c.GID, c.Verify()
		}
		if p, ok := peer.FromContext(ctx); ok && p.AuthInfo != nil {
			s.authType = p.AuthInfo.AuthType()
		}
		mu.Lock()
		calls = append(calls, s)
		mu.Unlock()
		return h(ctx, req)
	})
	cc := dial(t, sock)
	defer cc.Close()
	check(t, cc)
	check(t, cc) // a second call on the same connection sees the same caller

	mu.Lock()
	defer mu.Unlock()
	if len(calls) != 2 {
		t.Fatalf("interceptor ran %d times, want 2", len(calls))
	}
	for _, s := range calls {
		if !s.ok {
			t.Fatal("CallerFromContext found no caller")
		}
		if s.pid != int32(os.Getpid()) || s.uid != uint32(os.Getuid()) || s.gid != uint32(os.Getgid()) {
			t.Errorf("caller pid=%d uid=%d gid=%d, want pid=%d uid=%d gid=%d", s.pid, s.uid, s.gid, os.Getpid(), os.Getuid(), os.Getgid())
		}
		if s.verify != nil {
			t.Errorf("Verify of a live caller: %v", s.verify)
		}
		if s.authType != "lanyard-peercred" {
			t.Errorf("AuthType = %q", s.authType)
		}
	}
}

func TestCallerFromContextWithoutPeer(t *testing.T) {
	if c, ok := CallerFromContext(context.Background()); ok || c != nil {
		t.Fatalf("CallerFromContext of a bare context = %v, %v", c, ok)
	}
}

// trackers are the two ways of pinning a process: a pidfd, and the /proc
// directory fd used when pidfd_open is unavailable.
var trackers = []struct {
	name    string
	procDir bool
	want    fdKind
}{
	{"pidfd", false, kindPidfd},
	{"procdir", true, kindProcDir},
}

func trackedCaller(t *testing.T, pid int, procDir bool, want fdKind) *Caller {
	t.Helper()
	c := &Caller{}
	c.init(int32(pid), uint32(os.Getuid()), uint32(os.Getgid()), -1, procDir)
	t.Cleanup(c.CloseConn)
	if c.err != nil {
		t.Fatalf("tracking pid %d: %v", pid, c.err)
	}
	if want == kindPidfd && c.kind == kindProcDir && noPidfdOpen.Load() {
		t.Skip("pidfd_open is unavailable here (kernel before 5.3 or seccomp)")
	}
	if c.kind != want {
		t.Fatalf("tracking pid %d with fd kind %d, want %d", pid, c.kind, want)
	}
	if err := c.Verify(); err != nil {
		t.Fatalf("Verify of live pid %d: %v", pid, err)
	}
	flags, err := unix.FcntlInt(uintptr(c.fd), unix.F_GETFD, 0)
	if err != nil || flags&unix.FD_CLOEXEC == 0 {
		t.Fatalf("caller fd flags = %#x, %v; want close-on-exec", flags, err)
	}
	return c
}

func TestVerifyAfterChildExitsAndIsReaped(t *testing.T) {
	for _, tr := range trackers {
		t.Run(tr.name, func(t *testing.T) {
			child := startHelper(t, "", "wait")
			c := trackedCaller(t, child.Cmd.Process.Pid, tr.procDir, tr.want)
			if err := child.Cmd.Process.Kill(); err != nil {
				t.Fatal(err)
			}
			_ = reaped(child) // the PID is free for reuse
			err := c.Verify()
			if !errors.Is(err, ErrCallerGone) {
				t.Fatalf("Verify after the child was reaped = %v, want ErrCallerGone", err)
			}
		})
	}
}

func TestVerifyStartTimeMismatch(t *testing.T) {
	for _, tr := range trackers {
		t.Run(tr.name, func(t *testing.T) {
			check := func() {
				child := startHelper(t, "", "wait")
				c := trackedCaller(t, child.Cmd.Process.Pid, tr.procDir, tr.want)
				// As if the PID now belonged to a process started later.
				c.start++
				err := c.Verify()
				if !errors.Is(err, ErrCallerGone) || !strings.Contains(err.Error(), "started at tick") {
					t.Fatalf("Verify with another start time = %v, want ErrCallerGone about the start time", err)
				}
			}
			// With PIDFD_GET_INFO a pidfd needs no start time (PID reuse
			// cannot fool it); the start time guards the /proc path that
			// pidfds take on kernels without it.
			if tr.want == kindPidfd {
				withoutPidfdInfo(t, check)
			} else {
				check()
			}
		})
	}
}

func TestVerifyCredentialsChanged(t *testing.T) {
	c := trackedCaller(t, os.Getpid(), false, kindPidfd)
	c.UID++ // as if SO_PEERCRED had reported another user at connect time
	err := c.Verify()
	if err == nil || errors.Is(err, ErrCallerGone) || !strings.Contains(err.Error(), "changed credentials") {
		t.Fatalf("Verify with other credentials = %v", err)
	}
}

func TestVerifyAfterCloseConn(t *testing.T) {
	c := trackedCaller(t, os.Getpid(), false, kindPidfd)
	c.CloseConn()
	if err := c.Verify(); !errors.Is(err, ErrCallerGone) {
		t.Fatalf("Verify after CloseConn = %v, want ErrCallerGone", err)
	}
	c.CloseConn() // idempotent
}

func TestNewCallerOfMissingProcess(t *testing.T) {
	child := startHelper(t, "", "wait")
	pid := child.Cmd.Process.Pid
	child.Cmd.Process.Kill()
	_ = reaped(child)
	for _, tr := range trackers {
		c := &Caller{}
		c.init(int32(pid), 0, 0, -1, tr.procDir)
		if err := c.Verify(); !errors.Is(err, ErrCallerGone) {
			t.Errorf("%s: Verify of a reaped pid = %v, want ErrCallerGone", tr.name, err)
		}
		if c.kind != kindNone {
			t.Errorf("%s: fd %d left open for a missing process", tr.name, c.fd)
		}
	}
}

func TestPIDZeroIsNotVisible(t *testing.T) {
	c := newCaller(0, 1, 1)
	err := c.Verify()
	if !errors.Is(err, ErrCallerNotVisible) || !strings.Contains(err.Error(), "hostPID: true") {
		t.Fatalf("Verify of pid 0 = %v", err)
	}
}

// TestHandshakeFromOtherPIDNamespace runs the server side in a new PID
// namespace, where this process's PID does not exist, so SO_PEERCRED gives 0.
func TestHandshakeFromOtherPIDNamespace(t *testing.T) {
	testkit.RequireRoot(t, "to create a PID namespace")
	sock := filepath.Join(t.TempDir(), "ns.sock")
	cmd := testkit.HelperCommand("", "TestPeerHelperProcess", helperEnv+"=serve", "LANYARD_PEER_SOCK="+sock, "GORACE=atexit_sleep_ms=0")
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWPID}
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Skipf("cannot create a PID namespace here: %v", err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	r := bufio.NewReader(out)
	if line, err := r.ReadString('\n'); err != nil || line != "listening\n" {
		t.Fatalf("server child said %q, %v", line, err)
	}
	conn, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	line, err := r.ReadString('\n')
	if err != nil {
		t.Fatal(err)
	}
	want := "pid=0 verify=" + ErrCallerNotVisible.Error() + " notvisible=true\n"
	if line != want {
		t.Fatalf("server in another PID namespace saw %q, want %q", line, want)
	}
}

// acceptOne listens on a fresh socket and returns it with a channel that
// yields the first accepted connection.
func acceptOne(t *testing.T) (string, <-chan net.Conn) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "raw.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	ch := make(chan net.Conn, 1)
	go func() {
		c, err := l.Accept()
		if err == nil {
			ch <- c
		}
		close(ch)
	}()
	return sock, ch
}

// connectSelf connects this process to itself over a new Unix socket:
// the client's end and the server's accepted end. The client's end closes
// when the test ends.
func connectSelf(t *testing.T) (client, server net.Conn) {
	t.Helper()
	sock, accepted := acceptOne(t)
	client, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	return client, <-accepted
}

func handshake(t *testing.T, conn net.Conn) (net.Conn, *Caller) {
	t.Helper()
	wrapped, ai, err := Credentials().ServerHandshake(conn)
	if err != nil {
		t.Fatalf("handshake: %v", err)
	}
	t.Cleanup(func() { wrapped.Close() })
	info, ok := ai.(*AuthInfo)
	if !ok || info.Caller == nil {
		t.Fatalf("handshake AuthInfo = %#v", ai)
	}
	return wrapped, info.Caller
}

// TestHandshakeAfterCallerExited: the peer connected, exited and was reaped
// before the server looked at it; SO_PEERCRED still names its old PID.
func TestHandshakeAfterCallerExited(t *testing.T) {
	sock, accepted := acceptOne(t)
	child := startHelper(t, "", "connect", "LANYARD_PEER_SOCK="+sock)
	if err := reaped(child); err != nil {
		t.Fatalf("connecting child: %v", err)
	}
	conn := <-accepted
	if conn == nil {
		t.Fatal("accept failed")
	}
	_, c := handshake(t, conn)
	if c.PID != int32(child.Cmd.Process.Pid) {
		t.Fatalf("caller pid %d, want the child's %d", c.PID, child.Cmd.Process.Pid)
	}
	if err := c.Verify(); !errors.Is(err, ErrCallerGone) {
		t.Fatalf("Verify of a caller that exited before accept = %v, want ErrCallerGone", err)
	}
}

// TestHandshakeAfterPIDReused makes a new process take the PID of a caller
// that connected and exited, the race a PID check alone cannot see. It needs
// root (to steer the next PID) and SO_PEERPIDFD (Linux 6.5).
func TestHandshakeAfterPIDReused(t *testing.T) {
	testkit.RequireRoot(t, "to steer PID allocation through ns_last_pid")
	if noPeerPidfd.Load() {
		t.Skip("the kernel has no SO_PEERPIDFD; a reused PID before accept cannot be detected")
	}
	for attempt := 0; attempt < 20; attempt++ {
		sock, accepted := acceptOne(t)
		child := startHelper(t, "", "connect", "LANYARD_PEER_SOCK="+sock)
		if err := reaped(child); err != nil {
			t.Fatalf("connecting child: %v", err)
		}
		oldPID := child.Cmd.Process.Pid
		if err := os.WriteFile("/proc/sys/kernel/ns_last_pid", []byte(strconv.Itoa(oldPID-1)), 0); err != nil {
			t.Skipf("cannot steer PID allocation: %v", err)
		}
		reuser := startHelper(t, "", "wait").Cmd
		conn := <-accepted
		if conn == nil {
			t.Fatal("accept failed")
		}
		if reuser.Process.Pid != oldPID {
			conn.Close()
			continue // another process took the PID first; try again
		}
		_, c := handshake(t, conn)
		if noPeerPidfd.Load() {
			t.Skip("the kernel has no SO_PEERPIDFD")
		}
		if c.PID != int32(oldPID) {
			t.Fatalf("caller pid %d, want %d", c.PID, oldPID)
		}
		if err := c.Verify(); !errors.Is(err, ErrCallerGone) {
			t.Fatalf("Verify after pid %d was reused by another process = %v, want ErrCallerGone", oldPID, err)
		}
		return
	}
	t.Skip("other processes kept taking the PID; could not arrange its reuse")
}

func TestHandshakeWithoutPeerCredentials(t *testing.T) {
	_, conn := connectSelf(t)
	conn.Close() // the socket is gone, so SO_PEERCRED cannot be read
	_, _, err := Credentials().ServerHandshake(conn)
	if err == nil || !strings.Contains(err.Error(), "SO_PEERCRED") {
		t.Fatalf("handshake on a closed socket = %v, want an SO_PEERCRED error", err)
	}
}

func TestHandshakeRejectsTCP(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	client, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	conn, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_, _, err = Credentials().ServerHandshake(conn)
	if err == nil || !strings.Contains(err.Error(), "Unix socket") {
		t.Fatalf("handshake on TCP = %v, want a Unix socket error", err)
	}
}

func TestCloseConnDropsConnection(t *testing.T) {
	client, server := connectSelf(t)
	_, c := handshake(t, server)
	if err := c.Verify(); err != nil {
		t.Fatalf("Verify of this process: %v", err)
	}
	c.CloseConn()
	client.SetReadDeadline(time.Now().Add(10 * time.Second))
	if n, err := client.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("client read after CloseConn = %d, %v; want EOF", n, err)
	}
	if err := c.Verify(); !errors.Is(err, ErrCallerGone) {
		t.Fatalf("Verify after CloseConn = %v, want ErrCallerGone", err)
	}
}

// TestCallerWithOddName tracks a real process whose command name holds
// spaces and parentheses, which naive /proc/<pid>/stat parsing gets wrong.
func TestCallerWithOddName(t *testing.T) {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	const name = "x) (y z)) 1 2"
	link := filepath.Join(t.TempDir(), name)
	if err := os.Symlink(exe, link); err != nil {
		t.Fatal(err)
	}
	pid := startHelper(t, link, "wait").Cmd.Process.Pid
	// The name is set at exec; wait (bounded) for it.
	var comm []byte
	for i := 0; i < 200; i++ {
		comm, _ = os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
		if string(comm) == name+"\n" {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if string(comm) != name+"\n" {
		t.Fatalf("child comm = %q, want %q", comm, name)
	}
	for _, tr := range trackers {
		c := trackedCaller(t, pid, tr.procDir, tr.want)
		self := trackedCaller(t, os.Getpid(), tr.procDir, tr.want)
		// The child started after this process and before now: neither
		// a neighbouring field (0, or a size in bytes) would fit.
		if c.start < self.start || c.start > uptimeTicks(t) {
			t.Fatalf("%s: child start time %d, want between %d and now (%d)", tr.name, c.start, self.start, uptimeTicks(t))
		}
	}
}

// uptimeTicks is the time since boot in clock ticks (USER_HZ is 100 on
// Linux), rounded up.
func uptimeTicks(t *testing.T) uint64 {
	b, err := os.ReadFile("/proc/uptime")
	if err != nil {
		t.Fatal(err)
	}
	up, err := strconv.ParseFloat(strings.Fields(string(b))[0], 64)
	if err != nil {
		t.Fatal(err)
	}
	return uint64(up*100) + 1
}

func TestParseEffectiveIDs(t *testing.T) {
	status := []byte("Name:\tx\\nUid:\t9\t9\nUmask:\t0022\nState:\tS (sleeping)\nUid:\t1000\t1001\t1002\t1003\nGid:\t2000\t2001\t2002\t2003\nFDSize:\t64\n")
	uid, gid, err := parseEffectiveIDs(status)
	if err != nil || uid != 1001 || gid != 2001 {
		t.Fatalf("parseEffectiveIDs = %d, %d, %v; want 1001, 2001", uid, gid, err)
	}
	for name, bad := range map[string]string{
		"no Gid":        "Name:\tx\nUid:\t1\t2\t3\t4\n",
		"cut Gid":       "Name:\tx\nUid:\t1\t2\t3\t4\nGid:\t1\t2",
		"one Uid field": "Name:\tx\nUid:\t1\nGid:\t1\t2\t3\t4\n",
		"too big":       "Name:\tx\nUid:\t1\t4294967296\t3\t4\nGid:\t1\t2\t3\t4\n",
	} {
		if u, g, err := parseEffectiveIDs([]byte(bad)); err == nil {
			t.Errorf("%s: got %d, %d, want an error", name, u, g)
		}
	}
	// The real file of this process.
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	uid, gid, err = parseEffectiveIDs(b)
	if err != nil || uid != uint32(os.Geteuid()) || gid != uint32(os.Getegid()) {
		t.Fatalf("own status: %d, %d, %v; want %d, %d", uid, gid, err, os.Geteuid(), os.Getegid())
	}
}

func TestProcPath(t *testing.T) {
	var p [procPathSize]byte
	for _, tc := range []struct {
		pid  int32
		name []byte
		want string
	}{
		{1, nil, "/proc/1\x00"},
		{4194304, statusName, "/proc/4194304/status\x00"},
		{2147483647, statusName, "/proc/2147483647/status\x00"},
		{10, statName, "/proc/10/stat\x00"},
	} {
		procPath(&p, tc.pid, tc.name)
		if got := string(p[:len(tc.want)]); got != tc.want {
			t.Errorf("procPath(%d, %q) = %q, want %q", tc.pid, tc.name, got, tc.want)
		}
	}
}

// TestFDsReleased opens and closes 50 Workload API connections and checks
// that the caller fds go away with them.
func TestFDsReleased(t *testing.T) {
	sock := startServer(t, nil)
	base := testkit.OpenFDs(t)
	const n = 50
	conns := make([]*grpc.ClientConn, n)
	for i := range conns {
		conns[i] = dial(t, sock)
		check(t, conns[i])
	}
	// Each connection holds a client socket, a server socket and a pidfd.
	if open := testkit.OpenFDs(t); open < base+3*n {
		t.Fatalf("%d fds open with %d connections, want at least %d", open, n, base+3*n)
	}
	for _, cc := range conns {
		cc.Close()
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		open := testkit.OpenFDs(t)
		if open <= base {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d fds open after closing %d connections, %d before", open, n, base)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestVerifyDoesNotAllocate(t *testing.T) {
	for _, tr := range trackers {
		c := trackedCaller(t, os.Getpid(), tr.procDir, tr.want)
		if a := testing.AllocsPerRun(100, func() {
			if err := c.Verify(); err != nil {
				t.Fatal(err)
			}
		}); a != 0 {
			t.Errorf("%s: Verify allocates %v times per call", tr.name, a)
		}
	}
}

// TestHandshakeAllocations bounds the garbage of a handshake, which runs for
// every new connection: the wrapper (with Caller and AuthInfo inside), the
// Control callback, net's RawConn and unix.GetsockoptUcred's result.
func TestHandshakeAllocations(t *testing.T) {
	_, conn := connectSelf(t)
	defer conn.Close()
	creds := Credentials()
	a := testing.AllocsPerRun(50, func() {
		wrapped, _, err := creds.ServerHandshake(conn)
		if err != nil {
			t.Fatal(err)
		}
		// Release the pidfd but keep the socket for the next run.
		wrapped.(*peerConn).caller.releaseFD()
	})
	if a > 4 {
		t.Errorf("a handshake allocates %v times, want at most 4", a)
	}
}

// TestVerifyRacesClose runs Verify while the connection closes: the fd must
// not be closed (and its number reused) under a running Verify.
func TestVerifyRacesClose(t *testing.T) {
	_, server := connectSelf(t)
	wrapped, c := handshake(t, server)
	var wg sync.WaitGroup
	errs := make([]error, 4)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := 0; j < 200; j++ {
				if errs[i] = c.Verify(); errs[i] != nil {
					return
				}
			}
		}()
	}
	wrapped.Close()
	wg.Wait()
	for _, err := range errs {
		if err != nil && !errors.Is(err, ErrCallerGone) {
			t.Errorf("Verify during close = %v, want nil or ErrCallerGone", err)
		}
	}
	if err := c.Verify(); !errors.Is(err, ErrCallerGone) {
		t.Fatalf("Verify after close = %v, want ErrCallerGone", err)
	}
}

// TestZeroCaller: a Caller not made by a handshake tracks nothing and must
// not touch fd 0.
func TestZeroCaller(t *testing.T) {
	if _, err := unix.FcntlInt(0, unix.F_GETFD, 0); err != nil {
		t.Skipf("fd 0 is not open in this test process: %v", err)
	}
	var c Caller
	c.PID = int32(os.Getpid())
	if err := c.Verify(); !errors.Is(err, ErrCallerGone) {
		t.Fatalf("Verify of a zero Caller = %v, want ErrCallerGone", err)
	}
	c.CloseConn()
	if _, err := unix.FcntlInt(0, unix.F_GETFD, 0); err != nil {
		t.Fatalf("fd 0 after CloseConn of a zero Caller: %v", err)
	}
}
