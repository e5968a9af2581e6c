package testkit

import (
	"context"
	"os"
	"testing"
	"time"
)

// ShortDir makes a directory under /tmp, removed when the test ends, whose
// path is short enough for Unix sockets in it (their paths are limited to
// 107 bytes, which t.TempDir() can exceed). Every user may traverse it, for
// tests that run clients under other uids.
func ShortDir(t testing.TB, prefix string) string {
	t.Helper()
	dir, err := os.MkdirTemp("", prefix)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// Context is a context that ends after bound or when the test ends.
func Context(t testing.TB, bound time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), bound)
	t.Cleanup(cancel)
	return ctx
}

// WaitFor polls cond until it holds, failing the test after bound.
func WaitFor(t testing.TB, bound time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(bound)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", bound, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Receive waits for a value from ch (a goroutine's result), failing the
// test after bound: what says what was awaited.
func Receive[T any](t testing.TB, ch <-chan T, bound time.Duration, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(bound):
		t.Fatalf("timed out after %s waiting for %s", bound, what)
		var zero T
		return zero
	}
}

// RequireRoot skips a test that needs root (to chown, to run processes
// under other uids, to mount) when it runs as another user, and fails it
// under CI, which runs as root: there a skip would hide a test that must
// run.
func RequireRoot(t testing.TB, why string) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	Missing(t, "needs root (uid %d): %s", os.Geteuid(), why)
}

// Missing reports that something a test needs is not on this machine: it
// skips the test on a developer's machine and fails it under CI, whose
// machine the project's own files set up with everything, so that a skip
// there cannot hide a test that must run.
func Missing(t testing.TB, format string, args ...any) {
	t.Helper()
	if os.Getenv("CI") != "" {
		t.Fatalf("under CI: "+format, args...)
	}
	t.Skipf(format, args...)
}
