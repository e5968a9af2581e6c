package agent

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

func TestEnsureDataDir(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "a", "b", "data")
	if err := EnsureDataDir(dir); err != nil {
		t.Fatal(err)
	}
	checkMode := func(want os.FileMode) {
		t.Helper()
		info, err := os.Stat(dir)
		if err != nil {
			t.Fatal(err)
		}
		if !info.IsDir() || info.Mode().Perm() != want {
			t.Errorf("data dir is %v, want a directory with mode %o", info.Mode(), want)
		}
	}
	checkMode(0o700)
	if err := EnsureDataDir(dir); err != nil {
		t.Errorf("a second call: %v", err)
	}
	checkMode(0o700)

	// An existing directory others can read is tightened.
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := EnsureDataDir(dir); err != nil {
		t.Fatal(err)
	}
	checkMode(0o700)

	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	err := EnsureDataDir(file)
	if err == nil || !strings.Contains(err.Error(), file) {
		t.Errorf("a file as data dir: %v, want an error naming it", err)
	}
}

func TestWriteFileAtomic(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "state.json")
	if err := WriteFileAtomic(path, []byte("one")); err != nil {
		t.Fatal(err)
	}
	check := func(want string) {
		t.Helper()
		b, err := os.ReadFile(path)
		if err != nil || string(b) != want {
			t.Errorf("content %q (%v), want %q", b, err, want)
		}
		info, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if info.Mode().Perm() != 0o600 {
			t.Errorf("mode %o, want 600", info.Mode().Perm())
		}
		names, err := os.ReadDir(dir)
		if err != nil {
			t.Fatal(err)
		}
		if len(names) != 1 || names[0].Name() != "state.json" {
			var ns []string
			for _, n := range names {
				ns = append(ns, n.Name())
			}
			t.Errorf("directory holds %v, want only state.json (no temporary files)", ns)
		}
	}
	check("one")

	// An existing, wider file is replaced and tightened.
	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := WriteFileAtomic(path, []byte("two, longer than one")); err != nil {
		t.Fatal(err)
	}
	check("two, longer than one")
	if err := WriteFileAtomic(path, nil); err != nil {
		t.Fatal(err)
	}
	check("")

	// A missing directory fails with the path named and leaves nothing.
	missing := filepath.Join(dir, "nope", "state.json")
	if err := WriteFileAtomic(missing, []byte("x")); err == nil || !strings.Contains(err.Error(), missing) {
		t.Errorf("writing into a missing directory: %v", err)
	}
	check("")
}

// A reader never sees a mix of the old and the new content.
func TestWriteFileAtomicReaders(t *testing.T) {
	path := filepath.Join(t.TempDir(), "big")
	a := bytes.Repeat([]byte("a"), 1<<20)
	b := bytes.Repeat([]byte("b"), 1<<19)
	if err := WriteFileAtomic(path, a); err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var bad error
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			got, err := os.ReadFile(path)
			if err != nil {
				bad = err
				return
			}
			if !bytes.Equal(got, a) && !bytes.Equal(got, b) {
				bad = errTorn
				return
			}
		}
	}()
	for i := range 40 {
		data := a
		if i%2 == 0 {
			data = b
		}
		if err := WriteFileAtomic(path, data); err != nil {
			t.Fatal(err)
		}
	}
	close(stop)
	wg.Wait()
	if bad != nil {
		t.Errorf("a reader saw: %v", bad)
	}
}

var errTorn = tornError{}

type tornError struct{}

func (tornError) Error() string { return "a partly written file" }
