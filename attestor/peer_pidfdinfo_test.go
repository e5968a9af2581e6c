package attestor

import (
	"errors"
	"os"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// pidfdInfoWorks reports whether this kernel answers PIDFD_GET_INFO.
func pidfdInfoWorks(t *testing.T) bool {
	t.Helper()
	fd, err := unix.PidfdOpen(os.Getpid(), 0)
	if err != nil {
		return false
	}
	defer unix.Close(fd)
	info := unix.PidfdInfo{Mask: unix.PIDFD_INFO_CREDS}
	return unix.IoctlPidfdInfo(fd, &info) == nil && info.Mask&unix.PIDFD_INFO_CREDS != 0
}

// withoutPidfdInfo runs f as on a kernel without PIDFD_GET_INFO.
func withoutPidfdInfo(t *testing.T, f func()) {
	t.Helper()
	was := noPidfdInfo.Load()
	noPidfdInfo.Store(true)
	defer noPidfdInfo.Store(was)
	f()
}

// TestVerifyPidfdFallbackReadsProc checks the /proc path that kernels
// before 6.13 take for a pidfd: start time, credentials, and exit.
func TestVerifyPidfdFallbackReadsProc(t *testing.T) {
	withoutPidfdInfo(t, func() {
		child := startHelper(t, "", "wait")
		c := trackedCaller(t, child.Cmd.Process.Pid, false, kindPidfd)
		if err := c.Verify(); err != nil {
			t.Fatalf("Verify of a live caller = %v", err)
		}
		c.start++
		if err := c.Verify(); !errors.Is(err, ErrCallerGone) || !strings.Contains(err.Error(), "started at tick") {
			t.Fatalf("Verify with another start time = %v, want ErrCallerGone about the start time", err)
		}
		c.start--
		c.UID++
		if err := c.Verify(); err == nil || !strings.Contains(err.Error(), "changed credentials") {
			t.Fatalf("Verify with other credentials = %v", err)
		}
		c.UID--
		if err := child.Cmd.Process.Kill(); err != nil {
			t.Fatal(err)
		}
		_ = reaped(child)
		if err := c.Verify(); !errors.Is(err, ErrCallerGone) {
			t.Fatalf("Verify after the child was reaped = %v, want ErrCallerGone", err)
		}
	})
}

// TestVerifyPidfdInfo checks the PIDFD_GET_INFO path where the kernel has
// it: a live caller passes, a changed uid or gid fails, a reaped one is gone.
func TestVerifyPidfdInfo(t *testing.T) {
	if !pidfdInfoWorks(t) {
		t.Skip("this kernel has no PIDFD_GET_INFO (Linux 6.13)")
	}
	child := startHelper(t, "", "wait")
	c := trackedCaller(t, child.Cmd.Process.Pid, false, kindPidfd)
	if done, err := c.verifyPidfdInfo(); !done || err != nil {
		t.Fatalf("verifyPidfdInfo of a live caller = %v, %v", done, err)
	}
	c.GID++
	if done, err := c.verifyPidfdInfo(); !done || err == nil || !strings.Contains(err.Error(), "changed credentials") {
		t.Fatalf("verifyPidfdInfo with another gid = %v, %v", done, err)
	}
	c.GID--
	if err := child.Cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = reaped(child)
	if done, err := c.verifyPidfdInfo(); !done || !errors.Is(err, ErrCallerGone) {
		t.Fatalf("verifyPidfdInfo after the child was reaped = %v, %v; want ErrCallerGone", done, err)
	}
}
