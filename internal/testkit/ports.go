package testkit

import (
	"net"
	"testing"
)

// FreePort is a loopback TCP port nothing listens on now, for a daemon
// that cannot be told to pick its own (nginx, HAProxy).
func FreePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}
