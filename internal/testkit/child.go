package testkit

import (
	"bufio"
	"io"
	"os"
	"os/exec"
	"testing"
	"time"
)

// HelperCommand runs one test of a test binary (bin, or this one when bin
// is ""), with env added to the environment: the way a test puts a peer in
// another process, under another uid or in another namespace.
func HelperCommand(bin, test string, env ...string) *exec.Cmd {
	if bin == "" {
		bin = os.Args[0]
	}
	cmd := exec.Command(bin, "-test.run=^"+test+"$")
	cmd.Env = append(os.Environ(), env...)
	return cmd
}

// Child is a process a test started and reads line by line.
type Child struct {
	Cmd    *exec.Cmd
	Stdin  io.WriteCloser
	Stderr *Buffer
	// Lines are its output lines; closed when its output ends.
	Lines <-chan string
	// Exited is closed once it has exited and was waited for.
	Exited <-chan struct{}
}

// StartChild starts cmd with its stdin, stdout and stderr (unless set)
// piped to the test; when the test ends, its stdin closes and it is killed
// and waited for.
func StartChild(t testing.TB, cmd *exec.Cmd) *Child {
	t.Helper()
	c := &Child{Cmd: cmd, Stderr: &Buffer{}}
	if cmd.Stderr == nil {
		cmd.Stderr = c.Stderr
	}
	var err error
	if c.Stdin, err = cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	lines, exited, stop := make(chan string, 1024), make(chan struct{}), make(chan struct{})
	c.Lines, c.Exited = lines, exited
	go func() {
		defer close(exited)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			select {
			case lines <- sc.Text():
			case <-stop: // nobody reads any more: drain so that it can exit
			}
		}
		close(lines)
		_ = cmd.Wait()
	}()
	t.Cleanup(func() {
		close(stop)
		c.Stdin.Close()
		_ = cmd.Process.Kill()
		<-exited
	})
	return c
}

// Next is the child's next output line (false once its output ended),
// failing the test after bound.
func (c *Child) Next(t testing.TB, bound time.Duration) (string, bool) {
	t.Helper()
	select {
	case line, ok := <-c.Lines:
		return line, ok
	case <-time.After(bound):
		t.Fatalf("%s said nothing for %s; stderr:\n%s", c.Cmd.Path, bound, c.Stderr.String())
		return "", false
	}
}
