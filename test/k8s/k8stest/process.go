package k8stest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"
)

// daemon is one long-running process of the cluster, its output in a log
// file under the cluster's dir.
type daemon struct {
	name    string
	logPath string
	cmd     *exec.Cmd
	done    chan struct{}
	err     error // set before done closes
}

// startDaemon starts bin with args, its output to logs/<name>.log. It dies
// with the test binary (Pdeathsig), so a killed test leaves no daemon; what
// the daemons leave (shims, pods, mounts) the next Start sweeps.
func (c *Cluster) startDaemon(name, bin string, args ...string) (*daemon, error) {
	logPath := filepath.Join(c.Dir, "logs", name+".log")
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	defer logFile.Close() // the child holds its own copy
	cmd := exec.Command(bin, args...)
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	cmd.Dir = c.Dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %s: %w", name, err)
	}
	d := &daemon{name: name, logPath: logPath, cmd: cmd, done: make(chan struct{})}
	go func() {
		d.err = cmd.Wait()
		close(d.done)
	}()
	c.daemons = append(c.daemons, d)
	return d, nil
}

// kill stops the daemon at once: the cluster's state is thrown away, so
// there is nothing to shut down gracefully.
func (d *daemon) kill() {
	_ = d.cmd.Process.Kill() // fails only if it already exited
	select {
	case <-d.done:
	case <-time.After(stopTimeout):
		// SIGKILL cannot be ignored; only a process stuck in the kernel
		// gets here, and sweep reports what it leaves.
	}
}

// exited is the daemon's exit error, if it has exited.
func (d *daemon) exited() error {
	select {
	case <-d.done:
		if d.err == nil {
			return fmt.Errorf("%s exited (see %s)", d.name, d.logPath)
		}
		return fmt.Errorf("%s exited: %v (see %s)", d.name, d.err, d.logPath)
	default:
		return nil
	}
}

// waitUntil polls check until it succeeds, the daemon exits or bound
// passes; what names the awaited condition in the error.
func (d *daemon) waitUntil(bound time.Duration, what string, check func(context.Context) error) error {
	deadline := time.Now().Add(bound)
	var last error
	for {
		if err := d.exited(); err != nil {
			return fmt.Errorf("waiting for %s: %w", what, err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		last = check(ctx)
		cancel()
		if last == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: not after %s: %v (see %s)", what, bound, last, d.logPath)
		}
		time.Sleep(pollEvery)
	}
}

// waitTCP waits until addr accepts connections.
func (d *daemon) waitTCP(addr string) error {
	return d.waitUntil(startTimeout, d.name+" listening on "+addr, func(ctx context.Context) error {
		var dialer net.Dialer
		conn, err := dialer.DialContext(ctx, "tcp", addr)
		if err != nil {
			return err
		}
		return conn.Close()
	})
}

// freePorts finds n distinct free TCP ports on 127.0.0.1. The daemons bind
// them a moment later; only another process binding one in between could
// take one, and a daemon that fails to bind fails the start loudly.
func freePorts(n int) ([]int, error) {
	var listeners []net.Listener
	defer func() {
		for _, l := range listeners {
			l.Close()
		}
	}()
	ports := make([]int, 0, n)
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("finding a free port: %w", err)
		}
		listeners = append(listeners, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// runTool runs a short command (ctr, go build, mkimage), bounded.
func runTool(bound time.Duration, dir string, env []string, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), bound)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	if env != nil {
		cmd.Env = append(os.Environ(), env...)
	}
	out, err := cmd.CombinedOutput()
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return string(out), fmt.Errorf("%s %v: not done after %s:\n%s", name, args, bound, out)
	}
	if err != nil {
		return string(out), fmt.Errorf("%s %v: %w:\n%s", name, args, err, out)
	}
	return string(out), nil
}
