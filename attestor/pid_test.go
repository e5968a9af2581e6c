package attestor

import (
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testkit"
)

func TestTrackPID(t *testing.T) {
	c, err := TrackPID(int32(os.Getpid()))
	if err != nil {
		t.Fatal(err)
	}
	if p := c.Process(); p.UID != uint32(os.Geteuid()) || p.GID != uint32(os.Getegid()) || p.Exe.IsZero() {
		t.Errorf("Process() = %+v, want this process's effective IDs and executable", p)
	}
	if err := c.Verify(); err != nil {
		t.Errorf("Verify of a live process: %v", err)
	}
	c.Release()
	if err := c.Verify(); !IsRefusal(err) {
		t.Errorf("Verify after Release: %v, want a refusal", err)
	}

	for _, pid := range []int32{0, -1} {
		if _, err := TrackPID(pid); !IsRefusal(err) {
			t.Errorf("TrackPID(%d): %v, want a refusal", pid, err)
		}
	}

	// Reaped: its PID names nothing. The kernel may hand the PID to another
	// process at once; then that one is tracked, which is no error, so try
	// again with another reaped process (a few tries; reuse at once is rare).
	for try := 0; ; try++ {
		cmd := exec.Command("true")
		if err := cmd.Run(); err != nil {
			t.Fatal(err)
		}
		c, err := TrackPID(int32(cmd.Process.Pid))
		if err != nil {
			if !IsRefusal(err) {
				t.Errorf("TrackPID of a reaped process: %v, want ErrCallerGone", err)
			}
			return
		}
		c.Release()
		if try == 4 {
			t.Fatal("the PID of a reaped process named a live one five times in a row")
		}
	}
}

// A named process that exits but is not reaped (a zombie keeps its /proc
// entry, credentials and start time) fails Verify: its pidfd says so.
func TestTrackPIDSeesAZombie(t *testing.T) {
	cmd := exec.Command("sleep", "600")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	c, err := TrackPID(int32(cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Release()
	if c.kind != kindPidfd {
		testkit.Missing(t, "no pidfd on this kernel (Linux 5.3+): a zombie looks alive through /proc")
	}
	if err := c.Verify(); err != nil {
		t.Fatalf("Verify of a live process: %v", err)
	}
	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	// Not reaped until Cleanup's Wait: a zombie. The kernel's exit is not
	// instant after the signal; wait for it rather than for a time.
	testkit.WaitFor(t, 10*time.Second, "the zombie to fail Verify", func() bool { return IsRefusal(c.Verify()) })
	if state := procState(t, cmd.Process.Pid); state != "Z" {
		t.Errorf("the process is in state %q, want a zombie (Z): the test did not test one", state)
	}
}

func procState(t *testing.T, pid int) string {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return "gone"
	}
	s := string(b)
	if i := strings.LastIndexByte(s, ')'); i >= 0 && i+2 < len(s) {
		return s[i+2 : i+3]
	}
	return "?"
}
