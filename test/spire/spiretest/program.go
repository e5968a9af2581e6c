package spiretest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"testing"
)

// Program lets a program that is not a test (a benchmark harness) use this
// package, whose functions take a testing.TB. Run calls f with it; Fatal
// and FailNow end f (from f's goroutine only, as in a test), and the
// cleanups registered with Cleanup run, last first, when Run returns.
//
// testing.TB has an unexported method, so Program embeds a nil TB only to
// satisfy the interface; every exported method is implemented here.
type Program struct {
	testing.TB

	name string
	out  io.Writer
	ctx  context.Context

	mu       sync.Mutex
	cleanups []func()
	failed   bool
	skipped  bool
	firstErr string
}

// errFailNow unwinds f's goroutine on FailNow, as runtime.Goexit does in a
// test.
var errFailNow = errors.New("spiretest: FailNow")

// NewProgram returns a Program named name that logs to out.
func NewProgram(name string, out io.Writer) *Program {
	return &Program{name: name, out: out, ctx: context.Background()}
}

// Run calls f, then the registered cleanups. It returns an error when f
// failed (Error, Fatal) or skipped, carrying the first failure message.
func (p *Program) Run(f func(tb testing.TB)) (err error) {
	defer func() {
		if r := recover(); r != nil && r != errFailNow {
			p.runCleanups()
			panic(r)
		}
		p.runCleanups()
		p.mu.Lock()
		defer p.mu.Unlock()
		switch {
		case p.failed:
			err = fmt.Errorf("%s failed: %s", p.name, p.firstErr)
		case p.skipped:
			err = fmt.Errorf("%s skipped: %s", p.name, p.firstErr)
		}
	}()
	f(p)
	return nil
}

func (p *Program) runCleanups() {
	for {
		p.mu.Lock()
		n := len(p.cleanups)
		if n == 0 {
			p.mu.Unlock()
			return
		}
		fn := p.cleanups[n-1]
		p.cleanups = p.cleanups[:n-1]
		p.mu.Unlock()
		fn()
	}
}

func (p *Program) record(msg string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.failed = true
	if p.firstErr == "" {
		p.firstErr = msg
	}
}

// Cleanup registers fn to run when Run returns.
func (p *Program) Cleanup(fn func()) {
	p.mu.Lock()
	p.cleanups = append(p.cleanups, fn)
	p.mu.Unlock()
}

// Error logs and marks the program failed.
func (p *Program) Error(args ...any) { p.Errorf("%s", fmt.Sprint(args...)) }

// Errorf logs and marks the program failed.
func (p *Program) Errorf(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	p.Logf("%s", msg)
	p.record(msg)
}

// Fail marks the program failed.
func (p *Program) Fail() { p.record("failed") }

// FailNow marks the program failed and ends f.
func (p *Program) FailNow() {
	p.record("failed")
	panic(errFailNow)
}

// Failed reports whether the program failed.
func (p *Program) Failed() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.failed
}

// Fatal is Error then FailNow.
func (p *Program) Fatal(args ...any) { p.Fatalf("%s", fmt.Sprint(args...)) }

// Fatalf is Errorf then FailNow.
func (p *Program) Fatalf(format string, args ...any) {
	p.Errorf(format, args...)
	panic(errFailNow)
}

// Helper does nothing: there are no test line numbers to adjust.
func (p *Program) Helper() {}

// Log writes a line to the program's output.
func (p *Program) Log(args ...any) { p.Logf("%s", fmt.Sprint(args...)) }

// Logf writes a line to the program's output.
func (p *Program) Logf(format string, args ...any) {
	fmt.Fprintf(p.out, "%s: %s\n", p.name, fmt.Sprintf(format, args...))
}

// Name returns the program's name.
func (p *Program) Name() string { return p.name }

// Setenv sets an environment variable and restores it on cleanup.
func (p *Program) Setenv(key, value string) {
	old, had := os.LookupEnv(key)
	if err := os.Setenv(key, value); err != nil {
		p.Fatalf("setenv %s: %v", key, err)
	}
	p.Cleanup(func() {
		if had {
			os.Setenv(key, old)
		} else {
			os.Unsetenv(key)
		}
	})
}

// Chdir changes the working directory and restores it on cleanup.
func (p *Program) Chdir(dir string) {
	old, err := os.Getwd()
	if err != nil {
		p.Fatalf("getwd: %v", err)
	}
	if err := os.Chdir(dir); err != nil {
		p.Fatalf("chdir %s: %v", dir, err)
	}
	p.Cleanup(func() { os.Chdir(old) })
}

// Skip logs and ends f, marking the program skipped.
func (p *Program) Skip(args ...any) { p.Skipf("%s", fmt.Sprint(args...)) }

// SkipNow ends f, marking the program skipped.
func (p *Program) SkipNow() { p.Skipf("skipped") }

// Skipf logs and ends f, marking the program skipped.
func (p *Program) Skipf(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	p.Logf("%s", msg)
	p.mu.Lock()
	p.skipped = true
	if p.firstErr == "" {
		p.firstErr = msg
	}
	p.mu.Unlock()
	panic(errFailNow)
}

// Skipped reports whether the program skipped.
func (p *Program) Skipped() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.skipped
}

// TempDir returns a new directory, removed on cleanup.
func (p *Program) TempDir() string {
	dir, err := os.MkdirTemp("", "spiretest-")
	if err != nil {
		p.Fatalf("creating a temp dir: %v", err)
	}
	p.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// ArtifactDir returns a new directory, removed on cleanup.
func (p *Program) ArtifactDir() string { return p.TempDir() }

// Attr logs a key and value.
func (p *Program) Attr(key, value string) { p.Logf("%s=%s", key, value) }

// Context is never cancelled by the Program; its owner bounds the work.
func (p *Program) Context() context.Context { return p.ctx }

// Output is where the program logs.
func (p *Program) Output() io.Writer { return p.out }
