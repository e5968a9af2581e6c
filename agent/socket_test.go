package agent

import (
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/internal/testkit"
	"golang.org/x/sys/unix"
)

func listen(path string) (net.Listener, error) {
	return Listen(path, 64, hclog.NewNullLogger())
}

// serve writes msg to every connection on l until l is closed.
func serve(l net.Listener, msg string) {
	go func() {
		for {
			conn, err := l.Accept()
			if err != nil {
				return
			}
			_, _ = io.WriteString(conn, msg)
			conn.Close()
		}
	}()
}

// readFrom dials path and returns what the server writes.
func readFrom(t *testing.T, path string) string {
	t.Helper()
	conn, err := net.DialTimeout("unix", path, 5*time.Second)
	if err != nil {
		t.Fatalf("dial %s: %v", path, err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(conn)
	if err != nil {
		t.Fatalf("read %s: %v", path, err)
	}
	return string(b)
}

func TestListenCreatesDirAndOpensSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "run", "spire", "agent.sock")
	l, err := listen(path)
	if err != nil {
		t.Fatalf("Listen: %v", err)
	}
	defer l.Close()
	info, err := os.Stat(filepath.Dir(path))
	if err != nil || !info.IsDir() {
		t.Fatalf("socket directory not created: %v", err)
	}
	info, err = os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	if info.Mode()&os.ModeSocket == 0 {
		t.Errorf("%s is %v, not a socket", path, info.Mode())
	}
	if info.Mode().Perm() != 0o777 {
		t.Errorf("socket mode %o, want 777 so that every workload can connect", info.Mode().Perm())
	}
	serve(l, "hello")
	if got := readFrom(t, path); got != "hello" {
		t.Errorf("read %q through the socket", got)
	}
}

func TestListenReplacesStaleSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "agent.sock")
	// A socket file nobody listens on, as a crash leaves it.
	old, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	old.SetUnlinkOnClose(false)
	old.Close()
	if _, err := os.Lstat(path); err != nil {
		t.Fatalf("the stale socket is gone before the test: %v", err)
	}
	l, err := listen(path)
	if err != nil {
		t.Fatalf("Listen over a stale socket: %v", err)
	}
	defer l.Close()
	serve(l, "new")
	if got := readFrom(t, path); got != "new" {
		t.Errorf("read %q through the replaced socket", got)
	}
}

func TestListenRefusesLiveSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "agent.sock")
	// Another program (no lock file) serves the path.
	live, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer live.Close()
	l, err := listen(path)
	if err == nil {
		l.Close()
		t.Fatal("Listen took over a socket that is in use")
	}
	if !strings.Contains(err.Error(), "in use") || !strings.Contains(err.Error(), path) {
		t.Errorf("error %q does not say the socket %s is in use", err, path)
	}
	// The running server is untouched.
	serve(live, "still here")
	if got := readFrom(t, path); got != "still here" {
		t.Errorf("the live server answered %q", got)
	}
}

func TestListenRefusesRegularFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "agent.sock")
	if err := os.WriteFile(path, []byte("keep me"), 0o644); err != nil {
		t.Fatal(err)
	}
	l, err := listen(path)
	if err == nil {
		l.Close()
		t.Fatal("Listen replaced a regular file")
	}
	if !strings.Contains(err.Error(), "not a socket") || !strings.Contains(err.Error(), path) {
		t.Errorf("error %q does not say %s is not a socket", err, path)
	}
	if b, _ := os.ReadFile(path); string(b) != "keep me" {
		t.Error("the regular file was changed")
	}
	// Nor a directory.
	dirPath := filepath.Join(t.TempDir(), "dir.sock")
	if err := os.Mkdir(dirPath, 0o755); err != nil {
		t.Fatal(err)
	}
	if l, err := listen(dirPath); err == nil || !strings.Contains(err.Error(), "not a socket") {
		if l != nil {
			l.Close()
		}
		t.Errorf("Listen on a directory: %v", err)
	}
}

func TestListenTwice(t *testing.T) {
	path := filepath.Join(t.TempDir(), "agent.sock")
	l1, err := listen(path)
	if err != nil {
		t.Fatal(err)
	}
	l2, err := listen(path)
	if err == nil {
		l2.Close()
		l1.Close()
		t.Fatal("a second Listen on the same path succeeded")
	}
	if !strings.Contains(err.Error(), "in use by another running agent") || !strings.Contains(err.Error(), path) {
		t.Errorf("error %q is not clear about the other agent", err)
	}
	// The first listener still serves.
	serve(l1, "first")
	if got := readFrom(t, path); got != "first" {
		t.Errorf("read %q from the first listener", got)
	}
	if err := l1.Close(); err != nil {
		t.Fatal(err)
	}
	// Once closed, the path is free again.
	l3, err := listen(path)
	if err != nil {
		t.Fatalf("Listen after the first closed: %v", err)
	}
	l3.Close()
}

// TestListenHelperProcess is not a test: it is the other agent of
// TestListenAcrossProcesses, run as a child process.
func TestListenHelperProcess(t *testing.T) {
	path := os.Getenv("LANYARD_LISTEN_HELPER")
	if path == "" {
		t.Skip("only runs as a child of TestListenAcrossProcesses")
	}
	l, err := listen(path)
	if err != nil {
		fmt.Println("error:", err)
		os.Exit(1)
	}
	_ = l
	fmt.Println("ready")
	// Hold the socket until killed.
	time.Sleep(time.Minute)
	os.Exit(0)
}

func TestListenAcrossProcesses(t *testing.T) {
	path := filepath.Join(t.TempDir(), "agent.sock")
	helper := testkit.StartChild(t, testkit.HelperCommand("", "TestListenHelperProcess", "LANYARD_LISTEN_HELPER="+path))
	if line, _ := helper.Next(t, 30*time.Second); line != "ready" {
		t.Fatalf("the helper said %q", line)
	}

	if l, err := listen(path); err == nil {
		l.Close()
		t.Fatal("Listen took the socket of another running agent")
	} else if !strings.Contains(err.Error(), "in use") {
		t.Errorf("error %q does not say the socket is in use", err)
	}

	// The other agent crashes: its socket file stays, its lock goes.
	if err := helper.Cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	testkit.Receive(t, helper.Exited, 30*time.Second, "the helper to exit after SIGKILL")
	if info, err := os.Lstat(path); err != nil || info.Mode()&os.ModeSocket == 0 {
		t.Fatalf("the crashed agent's socket is not left behind (%v); the test cannot check stale-socket recovery", err)
	}
	l, err := listen(path)
	if err != nil {
		t.Fatalf("Listen after the other agent crashed: %v", err)
	}
	defer l.Close()
	serve(l, "recovered")
	if got := readFrom(t, path); got != "recovered" {
		t.Errorf("read %q after recovery", got)
	}
}

func TestListenLimitsConnections(t *testing.T) {
	path := filepath.Join(t.TempDir(), "agent.sock")
	l, err := Listen(path, 2, hclog.NewNullLogger())
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	accepted := make(chan net.Conn, 8)
	go func() {
		for {
			conn, err := l.Accept()
			if err != nil {
				close(accepted)
				return
			}
			accepted <- conn
		}
	}()
	dial := func() net.Conn {
		t.Helper()
		c, err := net.DialTimeout("unix", path, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	next := func() net.Conn {
		t.Helper()
		return testkit.Receive(t, accepted, 10*time.Second, "a connection under the limit to be accepted")
	}
	dial()
	dial()
	s1, s2 := next(), next()
	defer s2.Close()

	// Over the limit: the agent closes the connection at once.
	over := dial()
	_ = over.SetReadDeadline(time.Now().Add(10 * time.Second))
	if n, err := over.Read(make([]byte, 1)); err != io.EOF {
		t.Errorf("a connection over the limit read %d bytes, %v; want EOF", n, err)
	}
	select {
	case c := <-accepted:
		t.Fatalf("a connection over the limit was handed out: %v", c.RemoteAddr())
	default:
	}

	// The accepted connection exposes its socket, for peer credentials.
	if _, ok := s1.(syscall.Conn); !ok {
		t.Error("an accepted connection does not expose its socket")
	} else if _, err := s1.(syscall.Conn).SyscallConn(); err != nil {
		t.Errorf("SyscallConn: %v", err)
	}

	// Closing one (twice: the slot is freed once) makes room for one more.
	s1.Close()
	s1.Close()
	client := dial()
	s3 := next()
	defer s3.Close()
	if _, err := io.WriteString(s3, "ok"); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 2)
	_ = client.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(client, buf); err != nil || string(buf) != "ok" {
		t.Errorf("read %q, %v through the freed slot", buf, err)
	}
	// Still full: one more is refused.
	extra := dial()
	_ = extra.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := extra.Read(make([]byte, 1)); err != io.EOF {
		t.Errorf("with the limit reached again: %v, want EOF", err)
	}
}

func TestDefaultMaxConnections(t *testing.T) {
	if n := DefaultMaxConnections(); n < 64 || n > 16384 {
		t.Errorf("DefaultMaxConnections = %d, want within [64, 16384]", n)
	}
}

// otherUID stands for an unprivileged user on the node: it needs no passwd
// entry to own files.
const otherUID = 47001

func needRoot(t *testing.T) {
	t.Helper()
	testkit.RequireRoot(t, "to give files to another user")
}

// listenRefused runs Listen on path and requires a refusal that says each
// of want.
func listenRefused(t *testing.T, path string, want ...string) {
	t.Helper()
	l, err := listen(path)
	if err == nil {
		l.Close()
		t.Fatalf("Listen(%s) succeeded", path)
	}
	t.Log(err)
	for _, w := range want {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("the error does not say %q:\n%v", w, err)
		}
	}
}

func mkdirMode(t *testing.T, path string, mode os.FileMode, uid int) {
	t.Helper()
	if err := os.Mkdir(path, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(path, uid, uid); err != nil {
		t.Fatal(err)
	}
}

func TestListenRefusesSocketDirOfAnotherUser(t *testing.T) {
	needRoot(t)
	dir := filepath.Join(t.TempDir(), "public")
	mkdirMode(t, dir, 0o755, otherUID)
	listenRefused(t, filepath.Join(dir, "api.sock"), dir, "uid 47001", "drwxr-xr-x")
	if names, _ := os.ReadDir(dir); len(names) != 0 {
		t.Errorf("Listen left %v in the refused directory", names)
	}

	// A parent the agent did not create counts as much as the directory.
	parent := filepath.Join(t.TempDir(), "lanyard")
	mkdirMode(t, parent, 0o755, otherUID)
	listenRefused(t, filepath.Join(parent, "public", "api.sock"), parent, "uid 47001")
	if _, err := os.Lstat(filepath.Join(parent, "public")); err == nil {
		t.Error("Listen created a directory inside the refused one")
	}
}

func TestListenRefusesWritableSocketDir(t *testing.T) {
	for _, mode := range []os.FileMode{0o777, 0o775, 0o757} {
		dir := filepath.Join(t.TempDir(), "public")
		mkdirMode(t, dir, mode, os.Getuid())
		listenRefused(t, filepath.Join(dir, "api.sock"), dir, "group or others can write")
	}
	// Sticky is fine on the way (it is /tmp), but not for the socket's own
	// directory: anyone could put a socket there under the agent's name.
	tmp := filepath.Join(t.TempDir(), "tmp")
	mkdirMode(t, tmp, 0o777|os.ModeSticky, os.Getuid())
	listenRefused(t, filepath.Join(tmp, "api.sock"), tmp, "directory of its own")
}

func TestListenCreatesSafeDirsUnderStickyTmp(t *testing.T) {
	needRoot(t)
	tmp := filepath.Join(t.TempDir(), "tmp")
	mkdirMode(t, tmp, 0o777|os.ModeSticky, 0)
	path := filepath.Join(tmp, "lanyard", "public", "api.sock")
	l, err := listen(path)
	if err != nil {
		t.Fatalf("Listen under a sticky world-writable directory: %v", err)
	}
	defer l.Close()
	for _, d := range []string{filepath.Join(tmp, "lanyard"), filepath.Dir(path)} {
		info, err := os.Lstat(d)
		if err != nil {
			t.Fatal(err)
		}
		if info.Mode() != os.ModeDir|0o755 || info.Sys().(*syscall.Stat_t).Uid != 0 {
			t.Errorf("%s was created with mode %v, uid %d; want drwxr-xr-x, root", d, info.Mode(), info.Sys().(*syscall.Stat_t).Uid)
		}
	}
	serve(l, "hello")
	if got := readFrom(t, path); got != "hello" {
		t.Errorf("read %q through the socket", got)
	}

	// Another user got there first.
	tmp2 := filepath.Join(t.TempDir(), "tmp")
	mkdirMode(t, tmp2, 0o777|os.ModeSticky, 0)
	mkdirMode(t, filepath.Join(tmp2, "lanyard"), 0o755, otherUID)
	listenRefused(t, filepath.Join(tmp2, "lanyard", "public", "api.sock"), filepath.Join(tmp2, "lanyard"), "uid 47001")
}

func TestListenFollowsOnlyTrustedSymlinks(t *testing.T) {
	needRoot(t)
	base := t.TempDir()
	real := filepath.Join(base, "real")
	if err := os.MkdirAll(filepath.Join(real, "public"), 0o755); err != nil {
		t.Fatal(err)
	}
	// /var/run -> /run: root's symlinks, absolute or relative, keep working.
	for i, target := range []string{real, "./real", "real/public/.."} {
		link := filepath.Join(base, "run"+strconv.Itoa(i))
		if err := os.Symlink(target, link); err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(link, "public", "api.sock")
		l, err := listen(path)
		if err != nil {
			t.Fatalf("Listen through root's symlink %s -> %s: %v", link, target, err)
		}
		serve(l, "via "+target)
		if got := readFrom(t, path); got != "via "+target {
			t.Errorf("read %q", got)
		}
		l.Close()
	}

	// Another user's symlink could be pointed anywhere later.
	tmp := filepath.Join(base, "tmp")
	mkdirMode(t, tmp, 0o777|os.ModeSticky, 0)
	link := filepath.Join(tmp, "lanyard")
	if err := os.Symlink(real, link); err != nil {
		t.Fatal(err)
	}
	if err := os.Lchown(link, otherUID, otherUID); err != nil {
		t.Fatal(err)
	}
	listenRefused(t, filepath.Join(link, "public", "api.sock"), "symlink "+link, "uid 47001")
}

func TestListenFollowsNoSymlinkForSocketOrLock(t *testing.T) {
	dir := t.TempDir()
	target := filepath.Join(t.TempDir(), "target")
	if err := os.WriteFile(target, []byte("keep me"), 0o600); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "api.sock")

	// The lock: a symlink to a file, and to a file that does not exist yet.
	missing := filepath.Join(t.TempDir(), "created-by-root")
	for _, to := range []string{target, missing} {
		if err := os.Symlink(to, path+".lock"); err != nil {
			t.Fatal(err)
		}
		listenRefused(t, path, path+".lock", "symlink")
		os.Remove(path + ".lock")
	}
	if _, err := os.Lstat(missing); err == nil {
		t.Error("Listen created a file through the lock's symlink")
	}

	// The socket: a symlink is not a socket, and is not removed or followed.
	if err := os.Symlink(target, path); err != nil {
		t.Fatal(err)
	}
	listenRefused(t, path, path, "not a socket")
	if info, err := os.Lstat(path); err != nil || info.Mode()&os.ModeSymlink == 0 {
		t.Errorf("the symlink was removed: %v", err)
	}
	if info, _ := os.Stat(target); info.Mode().Perm() != 0o600 {
		t.Errorf("the symlink's target has mode %v", info.Mode())
	}

	// chmodSocket, given a symlink where the socket was bound, changes nothing.
	d, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(d)
	if err := chmodSocket(d, "api.sock", 0o777); err == nil {
		t.Error("chmodSocket accepted a symlink")
	}
	if info, _ := os.Stat(target); info.Mode().Perm() != 0o600 {
		t.Errorf("chmodSocket changed the symlink's target to %v", info.Mode())
	}
}

func TestListenRefusesLockOfAnotherUser(t *testing.T) {
	needRoot(t)
	path := filepath.Join(t.TempDir(), "api.sock")
	if err := os.WriteFile(path+".lock", nil, 0o666); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(path+".lock", otherUID, otherUID); err != nil {
		t.Fatal(err)
	}
	listenRefused(t, path, path+".lock", "uid 47001")
}

// TestListenRefusesDotDot: the walker checks the cleaned path, the kernel
// would resolve ".." after a symlink; a path with ".." is refused.
func TestListenRefusesDotDot(t *testing.T) {
	dir := t.TempDir()
	listenRefused(t, filepath.Join(dir, "a")+"/../b/api.sock", `".."`, "socket_path")
	if err := EnsureDataDir(dir + "/x/../data"); err == nil || !strings.Contains(err.Error(), "data_dir") {
		t.Errorf("EnsureDataDir with \"..\": %v, want it refused naming data_dir", err)
	}
}

func TestListenAdminModes(t *testing.T) {
	base := t.TempDir()
	path := filepath.Join(base, "private", "admin", "admin.sock")
	l, err := ListenAdmin(path, 8, hclog.NewNullLogger())
	if err != nil {
		t.Fatalf("ListenAdmin: %v", err)
	}
	defer l.Close()
	for _, dir := range []string{filepath.Join(base, "private"), filepath.Dir(path)} {
		info, err := os.Stat(dir)
		if err != nil {
			t.Fatal(err)
		}
		if info.Mode().Perm() != 0o750 {
			t.Errorf("%s has mode %o, want 750", dir, info.Mode().Perm())
		}
	}
	info, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	if info.Mode()&os.ModeSocket == 0 || info.Mode().Perm() != 0o770 {
		t.Errorf("admin socket is %v, want a socket with mode 770", info.Mode())
	}
	serve(l, "admin")
	if got := readFrom(t, path); got != "admin" {
		t.Errorf("read %q through the admin socket", got)
	}
}

func TestListenAdminRefusesStickyDir(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "shared")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o1777); err != nil {
		t.Fatal(err)
	}
	_, err := ListenAdmin(filepath.Join(dir, "admin.sock"), 8, hclog.NewNullLogger())
	if err == nil || !strings.Contains(err.Error(), "admin socket directory") || !strings.Contains(err.Error(), "replace the admin socket") {
		t.Fatalf("ListenAdmin in a sticky world-writable directory: %v", err)
	}
}
