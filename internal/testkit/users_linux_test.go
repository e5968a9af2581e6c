package testkit

import (
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestDialAs(t *testing.T) {
	RequireRoot(t, "to connect as another uid")
	socket := filepath.Join(ShortDir(t, "dialas-"), "s")
	l, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if err := os.Chmod(socket, 0o777); err != nil {
		t.Fatal(err)
	}
	c, err := DialAs(socket, 47010)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if os.Geteuid() != 0 {
		t.Fatalf("euid %d after DialAs, want 0", os.Geteuid())
	}
	l.(*net.UnixListener).SetDeadline(time.Now().Add(5 * time.Second))
	server, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer server.Close()
	raw, err := server.(*net.UnixConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var cred *unix.Ucred
	var credErr error
	_ = raw.Control(func(fd uintptr) { cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED) })
	if credErr != nil || cred.Uid != 47010 {
		t.Fatalf("peer credentials %+v, %v; want uid 47010", cred, credErr)
	}
}
