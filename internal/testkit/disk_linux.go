package testkit

import (
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// SmallDisk mounts a 256 KiB tmpfs (mode 0700) on path, which it makes,
// and unmounts it when the test ends (after whatever the test started
// later has stopped). fill takes all of its space, so that every write
// fails with ENOSPC as on a full disk; free gives it back. It needs root.
func SmallDisk(t testing.TB, path string) (fill, free func()) {
	t.Helper()
	RequireRoot(t, "to mount a tmpfs")
	if err := os.Mkdir(path, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", path, "tmpfs", 0, "size=256k,mode=0700"); err != nil {
		t.Fatalf("mounting a 256 KiB tmpfs on %s: %v", path, err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(path, unix.MNT_DETACH); err != nil {
			t.Errorf("unmounting %s: %v", path, err)
		}
	})
	filler := filepath.Join(path, "filler")
	fill = func() {
		t.Helper()
		f, err := os.OpenFile(filler, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		chunk := make([]byte, 4096)
		for range 1024 { // 4 MiB at most: far more than 256 KiB
			if _, err := f.Write(chunk); errors.Is(err, syscall.ENOSPC) {
				return
			} else if err != nil {
				t.Fatal(err)
			}
		}
		t.Fatal("the 256 KiB tmpfs took 4 MiB")
	}
	free = func() {
		t.Helper()
		if err := os.Remove(filler); err != nil {
			t.Fatal(err)
		}
	}
	return fill, free
}
