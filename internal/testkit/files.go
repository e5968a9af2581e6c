package testkit

import (
	"os"
	"testing"
)

// ReplaceFile puts data at path by rename, with the given owner and mode,
// as any writer of the file would: the file at path is never partly
// written.
func ReplaceFile(t testing.TB, path string, data []byte, uid int, mode os.FileMode) {
	t.Helper()
	tmp := path + ".swap"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(tmp, mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(tmp, uid, uid); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// OpenFDs is how many file descriptors this process has open, for tests
// that check nothing leaks one.
func OpenFDs(t testing.TB) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}
