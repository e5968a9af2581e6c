package main

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testkit"
)

// TestSIGHUPDuringStartIsNotFatal: a SIGHUP that reaches lanyard run while
// it starts, before it serves, neither ends it nor is lost: it reloads the
// config once running. The config file is a FIFO, so that the start waits
// at a known point, reading it, until the test writes it.
func TestSIGHUPDuringStartIsNotFatal(t *testing.T) {
	bin := buildLanyard(t)
	dir := testkit.ShortDir(t, "hup-")
	config := filepath.Join(dir, "agent.conf")
	body, socket := localConfig(dir)
	if err := syscall.Mkfifo(config, 0o600); err != nil {
		t.Fatal(err)
	}
	p, err := testkit.Start(t, bin, "run", "-config", config)
	if err != nil {
		t.Fatal(err)
	}

	// Opened for writing once lanyard is reading it: it is starting.
	w := openConfigWriter(t, config, p)
	if err := p.Cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	testkit.WaitFor(t, waitLimit, "lanyard to take the SIGHUP", func() bool { return !sighupPending(t, p) })
	if _, err := w.WriteString(body); err != nil {
		select {
		case <-p.Exited:
			t.Fatalf("lanyard exited on a SIGHUP during its start: %v", p.ExitErr)
		case <-time.After(waitLimit):
			t.Fatalf("writing the config: %v", err)
		}
	}
	w.Close()
	if err := p.WaitServing(socket, 30*time.Second); err != nil {
		t.Fatal(err)
	}

	// The SIGHUP waited for the reloader, which reads the config again.
	w = openConfigWriter(t, config, p)
	if _, err := w.WriteString(body); err != nil {
		t.Fatal(err)
	}
	w.Close()
	testkit.WaitFor(t, waitLimit, "the reload the SIGHUP asked for", func() bool {
		return strings.Contains(p.Logs.String(), "Reloaded the config")
	})
}

// buildLanyard builds the binary for a test that runs it, which -short
// skips.
func buildLanyard(t *testing.T) string {
	t.Helper()
	if testing.Short() {
		t.Skip("builds and runs the lanyard binary")
	}
	bin, cleanup, err := testkit.BuildLanyard()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cleanup)
	return bin
}

// localConfig is a config for an agent in dir on the embedded CA that
// gives the test's user an identity, and the socket it serves.
func localConfig(dir string) (body, socket string) {
	socket = filepath.Join(dir, "public", "api.sock")
	body = fmt.Sprintf(`agent {
  trust_domain = "example.org"
  data_dir     = %q
  socket_path  = %q
}
plugins {
  WorkloadAttestor "unix" { plugin_data {} }
  UpstreamAuthority "local" {
    plugin_data {
      entry {
        spiffe_id = "spiffe://example.org/user/%d"
        selectors = ["unix:uid:%d"]
      }
    }
  }
}
`, filepath.Join(dir, "data"), socket, os.Getuid(), os.Getuid())
	return body, socket
}

// waitLimit bounds every wait for something that must happen.
const waitLimit = 15 * time.Second

// openConfigWriter opens the FIFO at path for writing once the process
// has it open for reading; it fails the test if the process exits first.
func openConfigWriter(t *testing.T, path string, p *testkit.Process) *os.File {
	t.Helper()
	var w *os.File
	testkit.WaitFor(t, waitLimit, "lanyard to read its config", func() bool {
		select {
		case <-p.Exited:
			t.Fatalf("lanyard exited: %v\n%s", p.ExitErr, p.Logs.String())
		default:
		}
		// Without a reader, a non-blocking open for writing fails (ENXIO).
		fd, err := syscall.Open(path, syscall.O_WRONLY|syscall.O_NONBLOCK|syscall.O_CLOEXEC, 0)
		if errors.Is(err, syscall.ENXIO) {
			return false
		}
		if err != nil {
			t.Fatal(err)
		}
		w = os.NewFile(uintptr(fd), path)
		return true
	})
	return w
}

// sighupPending reports whether a SIGHUP sent to the process waits to be
// delivered (ShdPnd of its status, bit 0); false once it exited.
func sighupPending(t *testing.T, p *testkit.Process) bool {
	t.Helper()
	f, err := os.Open("/proc/" + strconv.Itoa(p.Cmd.Process.Pid) + "/status")
	if err != nil {
		return false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if mask, ok := strings.CutPrefix(sc.Text(), "ShdPnd:"); ok {
			v, err := strconv.ParseUint(strings.TrimSpace(mask), 16, 64)
			if err != nil {
				t.Fatal(err)
			}
			return v&(1<<(syscall.SIGHUP-1)) != 0
		}
	}
	return false
}
