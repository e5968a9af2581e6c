package attestor

import (
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"syscall"
	"testing"

	"github.com/lanyard-dev/lanyard/internal/testkit"
	"golang.org/x/sys/unix"
)

// TestHandshakeRecordsGroupsAndExecutable: the handshake keeps the
// supplementary groups the kernel recorded at connect and the executable
// the process ran, for the attestors.
func TestHandshakeRecordsGroupsAndExecutable(t *testing.T) {
	testkit.RequireRoot(t, "to start a process with other groups")
	groups := []uint32{64010, 64011, 64012}
	// A copy of the test binary, and a socket, that another user may
	// reach: the test's own directories are private.
	dir := testkit.ShortDir(t, "lanyard-attestor-")
	sock := filepath.Join(dir, "raw.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if err := os.Chmod(sock, 0o777); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "helper")
	data, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, data, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "-test.run=^TestPeerHelperProcess$")
	cmd.Env = append(os.Environ(), helperEnv+"=connect-wait", "LANYARD_PEER_SOCK="+sock, "GORACE=atexit_sleep_ms=0")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 64001, Gid: 64002, Groups: groups}}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// The helper exits if it cannot connect, which ends the Accept.
	exited := make(chan struct{})
	go func() { cmd.Wait(); l.Close(); close(exited) }()
	t.Cleanup(func() { stdin.Close(); cmd.Process.Kill(); <-exited })
	raw, err := l.Accept()
	if err != nil {
		t.Fatalf("the helper did not connect: %v", err)
	}
	conn, c := handshake(t, raw)
	defer conn.Close()

	p := c.Process()
	if p.PID != int32(cmd.Process.Pid) || p.UID != 64001 || p.GID != 64002 {
		t.Errorf("process %+v, want pid %d uid 64001 gid 64002", p, cmd.Process.Pid)
	}
	if !p.GroupsKnown || !slices.Equal(p.Groups, groups) {
		t.Errorf("groups %v (known %v), want %v", p.Groups, p.GroupsKnown, groups)
	}
	var st unix.Stat_t
	if err := unix.Stat(bin, &st); err != nil {
		t.Fatal(err)
	}
	if want := (FileID{Dev: st.Dev, Ino: st.Ino}); p.Exe != want {
		t.Errorf("exe %+v, want %+v (the test binary)", p.Exe, want)
	}
}

// TestRefuseSticks: once refused, a caller stays refused even where Verify
// would pass again (a setuid program that dropped back to the caller's
// credentials), and its fd is released.
func TestRefuseSticks(t *testing.T) {
	sock, accepted := acceptOne(t)
	client, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	conn, c := handshake(t, <-accepted)
	defer conn.Close()
	if err := c.Verify(); err != nil {
		t.Fatal(err)
	}
	why := errors.New("changed credentials")
	if !c.Refuse(why) {
		t.Fatal("first Refuse reported false")
	}
	if c.Refuse(errors.New("again")) {
		t.Error("second Refuse reported true")
	}
	if err := c.Verify(); err != why {
		t.Errorf("Verify after Refuse = %v, want the refusal", err)
	}
	if c.kind != kindNone {
		t.Error("Refuse kept the caller's fd")
	}
	// The connection itself stays usable, so the refusal can be answered.
	if _, err := client.Write([]byte("x")); err != nil {
		t.Errorf("connection closed by Refuse: %v", err)
	}
}
