package filedelivery

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
)

// childStopGrace is how long a child has to exit after SIGTERM before it
// is killed; Kubernetes gives a pod 30s in all, so the helper must finish
// well within it.
const childStopGrace = 10 * time.Second

// child is cmd: started after the first write, sent the renew signal after
// every update, started again at the next update if it has exited.
type child struct {
	path   string
	args   []string
	signal unix.Signal
	log    hclog.Logger

	mu     sync.Mutex
	cmd    *exec.Cmd
	exited chan struct{} // closed when cmd has exited
}

func (c *child) running() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.isRunningLocked()
}

func (c *child) isRunningLocked() bool {
	if c.cmd == nil {
		return false
	}
	select {
	case <-c.exited:
		return false
	default:
		return true
	}
}

func (c *child) startOrSignal() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.isRunningLocked() {
		if c.signal == 0 {
			return nil
		}
		return c.cmd.Process.Signal(c.signal)
	}
	cmd := exec.Command(c.path, c.args...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	if err := cmd.Start(); err != nil {
		return err
	}
	exited := make(chan struct{})
	c.cmd, c.exited = cmd, exited
	c.log.Info("cmd started", "cmd", c.path, "pid", cmd.Process.Pid)
	go func() {
		err := cmd.Wait()
		c.log.Info("cmd exited", "cmd", c.path, "status", exitStatus(err))
		close(exited)
	}()
	return nil
}

// stop ends the child with SIGTERM, then SIGKILL after childStopGrace:
// unlike spiffe-helper, which leaves it running, the helper never leaves
// an orphan holding stale certificates.
func (c *child) stop() {
	c.mu.Lock()
	cmd, exited := c.cmd, c.exited
	c.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-exited:
	case <-time.After(childStopGrace):
		c.log.Warn("cmd did not exit after SIGTERM; killing it", "cmd", c.path, "grace", childStopGrace)
		_ = cmd.Process.Kill()
		<-exited
	}
}

func exitStatus(err error) string {
	if err == nil {
		return "0"
	}
	return err.Error()
}

// pidFileTries bounds the retries while a pid file is missing or being
// rewritten (a server restarting): about 3s in all.
const pidFileTries = 5

// signalPIDFile reads the pid file afresh (the process may have been
// restarted since the last update) and signals that process.
func signalPIDFile(path string, sig unix.Signal) error {
	wait := 100 * time.Millisecond
	var err error
	for range pidFileTries {
		if err = signalPIDFileOnce(path, sig); err == nil {
			return nil
		}
		time.Sleep(wait)
		wait *= 2
	}
	return err
}

func signalPIDFileOnce(path string, sig unix.Signal) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	pid, err := strconv.Atoi(string(bytes.TrimSpace(data)))
	if err != nil || pid <= 0 {
		return fmt.Errorf("%s does not hold a process id", path)
	}
	if err := unix.Kill(pid, sig); err != nil {
		if errors.Is(err, unix.ESRCH) {
			return fmt.Errorf("no process %d (from %s)", pid, path)
		}
		return fmt.Errorf("signalling process %d (from %s): %w", pid, path, err)
	}
	return nil
}
