package main

import (
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"

	"github.com/lanyard-dev/lanyard/internal/testkit"
)

// notifySocket is a NOTIFY_SOCKET as systemd makes one: a datagram socket
// that receives the service's state changes.
type notifySocket struct {
	path string
	msgs chan string
}

func listenNotify(t *testing.T, dir string) *notifySocket {
	t.Helper()
	path := filepath.Join(dir, "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	n := &notifySocket{path: path, msgs: make(chan string, 64)}
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 4096)
		for {
			k, err := conn.Read(buf)
			if err != nil {
				return
			}
			n.msgs <- string(buf[:k])
		}
	}()
	t.Cleanup(func() {
		conn.Close()
		<-done
	})
	return n
}

// next is the next message, which must begin with state.
func (n *notifySocket) next(t *testing.T, state string) string {
	t.Helper()
	msg := testkit.Receive(t, n.msgs, waitLimit, state)
	if !strings.HasPrefix(msg, state+"\n") {
		t.Fatalf("systemd was told %q, want %s first", msg, state)
	}
	return msg
}

var monotonicUsec = regexp.MustCompile(`\nMONOTONIC_USEC=[0-9]+\n`)

// TestSystemdNotify: under a Type=notify unit, the agent says READY=1 when
// a client finds its socket serving, RELOADING=1 then READY=1 around a
// SIGHUP (a failed reload too: the previous config serves on), and
// STOPPING=1 on SIGTERM, all from the one process.
func TestSystemdNotify(t *testing.T) {
	bin := buildLanyard(t)
	dir := testkit.ShortDir(t, "notify-")
	notify := listenNotify(t, dir)
	t.Setenv("NOTIFY_SOCKET", notify.path)
	config := filepath.Join(dir, "agent.conf")
	body, socket := localConfig(dir)
	if err := os.WriteFile(config, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	p, err := testkit.Start(t, bin, "run", "-config", config)
	if err != nil {
		t.Fatal(err)
	}

	ready := notify.next(t, "READY=1")
	if !testkit.Serving(socket) {
		t.Fatalf("READY=1 (%q) came before the socket %s served", ready, socket)
	}
	if !strings.Contains(ready, "\nSTATUS=serving the Workload API on "+socket) {
		t.Errorf("READY=1 without the socket in its status: %q", ready)
	}

	if err := p.Cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	if msg := notify.next(t, "RELOADING=1"); !monotonicUsec.MatchString(msg) {
		t.Errorf("RELOADING=1 without MONOTONIC_USEC: %q", msg)
	}
	if msg := notify.next(t, "READY=1"); strings.Contains(msg, "failed") {
		t.Errorf("a good reload reported as failed: %q", msg)
	}

	if err := os.WriteFile(config, []byte("agent {"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := p.Cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	notify.next(t, "RELOADING=1")
	if msg := notify.next(t, "READY=1"); !strings.Contains(msg, "the last reload failed") {
		t.Errorf("a failed reload not in the status: %q", msg)
	}
	if !testkit.Serving(socket) {
		t.Fatal("the agent stopped serving after a failed reload")
	}

	p.Stop()
	notify.next(t, "STOPPING=1")
	select {
	case msg := <-notify.msgs:
		t.Errorf("systemd was told %q after STOPPING=1", msg)
	default:
	}
}
