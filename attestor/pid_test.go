package attestor

import (
	"os"
	"os/exec"
	"testing"
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

	cmd := exec.Command("true")
	if err := cmd.Run(); err != nil {
		t.Fatal(err)
	}
	// Reaped: its PID names nothing (unless reused at once, then another
	// process is tracked, which is still no error to assert on).
	if c, err := TrackPID(int32(cmd.Process.Pid)); err == nil {
		c.Release()
		t.Skip("the PID was reused at once")
	} else if !IsRefusal(err) {
		t.Errorf("TrackPID of a reaped process: %v, want ErrCallerGone", err)
	}
}
