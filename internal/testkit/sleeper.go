package testkit

import (
	"os/exec"
	"sync"
	"syscall"
	"testing"
)

// StartSleeper starts a real process of the test's user that only sleeps,
// for tests that name a workload by PID; it is killed and reaped when the
// test ends, or earlier by stop.
func StartSleeper(t testing.TB) (pid int32, stop func()) {
	t.Helper()
	cmd := exec.Command("sleep", "600")
	// Killed with the test binary too, should a timeout end it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	stop = sync.OnceFunc(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	t.Cleanup(stop)
	return int32(cmd.Process.Pid), stop
}

// FirstRecv is the error of opening a gRPC stream (err) or, when it
// opened, of its first message.
func FirstRecv[T any](s interface{ Recv() (T, error) }, err error) error {
	if err != nil {
		return err
	}
	_, err = s.Recv()
	return err
}
