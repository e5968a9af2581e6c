package agent

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/lanyard-dev/lanyard/internal/testkit"
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

// otherOwner is how an error names otherUID.
var otherOwner = fmt.Sprintf("uid %d", otherUID)

func checkErrNames(t *testing.T, what string, err error, want ...string) {
	t.Helper()
	if err == nil {
		t.Errorf("%s: no error, want one naming %q", what, want)
		return
	}
	for _, w := range want {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("%s: %v; want it to name %q", what, err, w)
		}
	}
}

// A data directory that someone else could change is refused, not
// adopted: its owner (or anyone who can write to it or to a directory
// above it) could replace the CA in it.
func TestEnsureDataDirRefusesUnsafeDirectories(t *testing.T) {
	testkit.RequireRoot(t, "to chown")
	mk := func(t *testing.T, path string, mode os.FileMode, uid int) {
		t.Helper()
		if err := os.MkdirAll(path, 0o700); err != nil {
			t.Fatal(err)
		}
		if mode&0o1000 != 0 {
			mode = mode&^0o1000 | os.ModeSticky
		}
		if err := os.Chmod(path, mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(path, uid, uid); err != nil {
			t.Fatal(err)
		}
	}
	modeOf := func(t *testing.T, path string) os.FileMode {
		t.Helper()
		info, err := os.Lstat(path)
		if err != nil {
			t.Fatal(err)
		}
		return info.Mode()
	}

	t.Run("owned by another user", func(t *testing.T) {
		dir := filepath.Join(t.TempDir(), "data")
		mk(t, dir, 0o755, otherUID)
		checkErrNames(t, "data_dir owned by another uid", EnsureDataDir(dir), dir, otherOwner, "0755")
		if m := modeOf(t, dir); m.Perm() != 0o755 {
			t.Errorf("the refused directory was changed to %v", m)
		}
	})
	t.Run("writable by others", func(t *testing.T) {
		dir := filepath.Join(t.TempDir(), "data")
		mk(t, dir, 0o777, 0)
		checkErrNames(t, "data_dir 0777", EnsureDataDir(dir), dir, "0777")
		mk(t, dir, 0o1777, 0)
		checkErrNames(t, "data_dir 1777", EnsureDataDir(dir), dir, "1777")
		mk(t, dir, 0o770, 0)
		checkErrNames(t, "data_dir 0770", EnsureDataDir(dir), dir, "0770")
	})
	t.Run("symbolic link", func(t *testing.T) {
		base := t.TempDir()
		victim := filepath.Join(base, "victim")
		mk(t, victim, 0o755, 0)
		link := filepath.Join(base, "data")
		if err := os.Symlink(victim, link); err != nil {
			t.Fatal(err)
		}
		checkErrNames(t, "data_dir a symlink", EnsureDataDir(link), link, "symbolic link", victim)
		if m := modeOf(t, victim); m.Perm() != 0o755 {
			t.Errorf("the link's target was changed to %v", m)
		}
	})
	t.Run("parent owned by another user", func(t *testing.T) {
		parent := filepath.Join(t.TempDir(), "home")
		mk(t, parent, 0o755, otherUID)
		dir := filepath.Join(parent, "data")
		checkErrNames(t, "parent owned by another uid", EnsureDataDir(dir), parent, otherOwner, "0755")
		if _, err := os.Lstat(dir); err == nil {
			t.Error("the data directory was created under a parent another user owns")
		}
	})
	t.Run("parent writable by others", func(t *testing.T) {
		parent := filepath.Join(t.TempDir(), "shared")
		mk(t, parent, 0o777, 0)
		checkErrNames(t, "parent 0777", EnsureDataDir(filepath.Join(parent, "data")), parent, "0777", "sticky")
	})
	t.Run("parent a symlink to an unsafe directory", func(t *testing.T) {
		base := t.TempDir()
		unsafe := filepath.Join(base, "unsafe")
		mk(t, unsafe, 0o777, 0)
		if err := os.Symlink(unsafe, filepath.Join(base, "link")); err != nil {
			t.Fatal(err)
		}
		checkErrNames(t, "parent through a link", EnsureDataDir(filepath.Join(base, "link", "data")), unsafe, "0777")
	})
	t.Run("parent through another user's symlink", func(t *testing.T) {
		base := t.TempDir()
		safe := filepath.Join(base, "safe")
		mk(t, safe, 0o755, 0)
		link := filepath.Join(base, "link")
		if err := os.Symlink(safe, link); err != nil {
			t.Fatal(err)
		}
		if err := os.Lchown(link, otherUID, otherUID); err != nil {
			t.Fatal(err)
		}
		checkErrNames(t, "a link owned by another uid", EnsureDataDir(filepath.Join(link, "data")), link, otherOwner)
	})
	t.Run("parent under another user's directory, through a safe link", func(t *testing.T) {
		base := t.TempDir()
		home := filepath.Join(base, "home")
		mk(t, home, 0o755, otherUID)
		if err := os.Symlink(filepath.Join(base, "etc"), filepath.Join(home, "link")); err != nil {
			t.Fatal(err)
		}
		mk(t, filepath.Join(base, "etc"), 0o755, 0)
		checkErrNames(t, "a link in another uid's directory", EnsureDataDir(filepath.Join(home, "link", "data")), home, otherOwner)
	})
	t.Run("root-owned links are followed", func(t *testing.T) {
		base := t.TempDir()
		mk(t, filepath.Join(base, "real"), 0o755, 0)
		if err := os.Symlink("real", filepath.Join(base, "link")); err != nil {
			t.Fatal(err)
		}
		if err := EnsureDataDir(filepath.Join(base, "link", "sub", "..", "data")); err != nil {
			t.Fatal(err)
		}
		if m := modeOf(t, filepath.Join(base, "real", "data")); m.Perm() != 0o700 || !m.IsDir() {
			t.Errorf("data_dir is %v, want a directory with mode 0700", m)
		}
	})
	t.Run("sticky parent and created parents are fine", func(t *testing.T) {
		parent := filepath.Join(t.TempDir(), "tmp")
		mk(t, parent, 0o1777, 0)
		dir := filepath.Join(parent, "a", "b", "data")
		if err := EnsureDataDir(dir); err != nil {
			t.Fatal(err)
		}
		if m := modeOf(t, dir); m.Perm() != 0o700 || !m.IsDir() {
			t.Errorf("data_dir is %v, want a directory with mode 0700", m)
		}
		if m := modeOf(t, filepath.Join(parent, "a")); m.Perm() != 0o755 {
			t.Errorf("a created parent is %v, want 0755", m)
		}
	})
}

func TestReadPrivateFile(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good")
	if err := WriteFileAtomic(good, []byte("secret")); err != nil {
		t.Fatal(err)
	}
	if b, err := ReadPrivateFile(good); err != nil || string(b) != "secret" {
		t.Fatalf("ReadPrivateFile(good) = %q, %v", b, err)
	}
	if _, err := ReadPrivateFile(filepath.Join(dir, "missing")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("a missing file: %v, want ErrNotExist", err)
	}
	unsafe := func(what, path string, want ...string) {
		t.Helper()
		_, err := ReadPrivateFile(path)
		var ue *UnsafeFileError
		if !errors.As(err, &ue) {
			t.Errorf("%s: %v, want an UnsafeFileError", what, err)
			return
		}
		checkErrNames(t, what, err, append(want, path)...)
	}
	link := filepath.Join(dir, "link")
	if err := os.Symlink(good, link); err != nil {
		t.Fatal(err)
	}
	unsafe("a symbolic link", link, "symbolic link", good)
	wide := filepath.Join(dir, "wide")
	if err := os.WriteFile(wide, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(wide, 0o644); err != nil {
		t.Fatal(err)
	}
	unsafe("mode 0644", wide, "0644")
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	unsafe("a FIFO", fifo, "not a regular file")
	if os.Geteuid() == 0 {
		theirs := filepath.Join(dir, "theirs")
		if err := os.WriteFile(theirs, []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(theirs, otherUID, otherUID); err != nil {
			t.Fatal(err)
		}
		unsafe("owned by another uid", theirs, otherOwner)
	}
}

// A file that another program wrote as the agent's user is read when its
// mode has no group or other bits (0600, or 0400 under a stricter umask),
// and refused as ReadPrivateFile refuses otherwise.
func TestReadAdoptedFile(t *testing.T) {
	dir := t.TempDir()
	write := func(name string, mode uint32) string {
		t.Helper()
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, []byte("theirs"), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := syscall.Chmod(path, mode); err != nil {
			t.Fatal(err)
		}
		return path
	}
	for _, mode := range []uint32{0o600, 0o400} {
		if b, err := ReadAdoptedFile(write(fmt.Sprintf("m%o", mode), mode)); err != nil || string(b) != "theirs" {
			t.Errorf("mode %04o: %q, %v", mode, b, err)
		}
	}
	if _, err := ReadAdoptedFile(filepath.Join(dir, "missing")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("a missing file: %v, want ErrNotExist", err)
	}
	unsafe := func(what, path string, want ...string) {
		t.Helper()
		_, err := ReadAdoptedFile(path)
		var ue *UnsafeFileError
		if !errors.As(err, &ue) {
			t.Errorf("%s: %v, want an UnsafeFileError", what, err)
			return
		}
		checkErrNames(t, what, err, append(want, path)...)
	}
	for _, mode := range []uint32{0o640, 0o604, 0o644, 0o4600} {
		octal := fmt.Sprintf("%04o", mode)
		unsafe("mode "+octal, write("bad"+octal, mode), octal)
	}
	good := write("good", 0o600)
	link := filepath.Join(dir, "link")
	if err := os.Symlink(good, link); err != nil {
		t.Fatal(err)
	}
	unsafe("a symbolic link", link, "symbolic link", good)
	if os.Geteuid() == 0 {
		theirs := write("theirs", 0o600)
		if err := os.Chown(theirs, otherUID, otherUID); err != nil {
			t.Fatal(err)
		}
		unsafe("owned by another uid", theirs, otherOwner, "0600")
	}
}

// Temporary files that a crash left (they hold private keys) are removed;
// nothing else is.
func TestRemoveStaleTempFiles(t *testing.T) {
	dir := t.TempDir()
	stale := []string{".local_ca.json.tmp-123456", ".cache.json.tmp-abcdef01"}
	keep := []string{"local_ca.json", "cache.json", ".hidden", "x.tmp-1"}
	for _, name := range append(append([]string{}, stale...), keep...) {
		if err := os.WriteFile(filepath.Join(dir, name), []byte("key"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Mkdir(filepath.Join(dir, ".d.tmp-1"), 0o700); err != nil {
		t.Fatal(err)
	}
	keep = append(keep, ".d.tmp-1")
	removed, err := RemoveStaleTempFiles(dir)
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(removed)
	if want := []string{".cache.json.tmp-abcdef01", ".local_ca.json.tmp-123456"}; !slices.Equal(removed, want) {
		t.Errorf("removed %v, want %v", removed, want)
	}
	for _, name := range keep {
		if _, err := os.Lstat(filepath.Join(dir, name)); err != nil {
			t.Errorf("%s: %v; it is not a temporary file and must stay", name, err)
		}
	}
}

// The temporary file is 0600 from its creation, whatever the umask, so
// that no one can open it while the key is written; it is never created
// through a link.
func TestWriteFileAtomicTempIsPrivate(t *testing.T) {
	dir := t.TempDir()
	old := syscall.Umask(0)
	defer syscall.Umask(old)
	path := filepath.Join(dir, "state.json")
	err := WriteFileAtomicFunc(path, func(w io.Writer) error {
		names, err := os.ReadDir(dir)
		if err != nil || len(names) != 1 || !strings.HasPrefix(names[0].Name(), ".state.json.tmp-") {
			t.Fatalf("during the write the directory holds %v (%v), want one temporary file", names, err)
		}
		info, err := os.Lstat(filepath.Join(dir, names[0].Name()))
		if err != nil {
			t.Fatal(err)
		}
		if !info.Mode().IsRegular() || info.Mode().Perm() != 0o600 {
			t.Errorf("the temporary file is %v, want a regular file with mode 0600", info.Mode())
		}
		_, err = w.Write([]byte("key"))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	// A symbolic link in place of the file is replaced, not followed.
	target := filepath.Join(dir, "target")
	if err := os.WriteFile(target, []byte("victim"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(target, path); err != nil {
		t.Fatal(err)
	}
	if err := WriteFileAtomic(path, []byte("new")); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(target); string(b) != "victim" {
		t.Errorf("the link's target was written: %q", b)
	}
	if info, err := os.Lstat(path); err != nil || !info.Mode().IsRegular() {
		t.Errorf("%s is %v (%v), want a regular file", path, info.Mode(), err)
	}
}

// TestEnsureKeyDir: a key manager's directory is held to data_dir's rules,
// and refusals name its own config key.
func TestEnsureKeyDir(t *testing.T) {
	testkit.RequireRoot(t, "to chown")
	dir := filepath.Join(t.TempDir(), "keys")
	if err := EnsureKeyDir(dir, `KeyManager "disk" directory`); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(dir, otherUID, otherUID); err != nil {
		t.Fatal(err)
	}
	checkErrNames(t, "a key directory of another user", EnsureKeyDir(dir, `KeyManager "disk" directory`), dir, "key directory", `KeyManager "disk" directory`, otherOwner)
}

// TestWriteFileAtomicMode: a file that takes a wider mode (a certificate
// `lanyard api fetch x509 -write` writes) is 0600 while it is written and
// has its mode, whatever the umask, once it is in place.
func TestWriteFileAtomicMode(t *testing.T) {
	dir := t.TempDir()
	old := syscall.Umask(0o077)
	defer syscall.Umask(old)
	path := filepath.Join(dir, "svid.0.pem")
	err := writeFileAtomic(path, 0o644, func(w io.Writer) error {
		names, err := os.ReadDir(dir)
		if err != nil || len(names) != 1 {
			t.Fatalf("during the write the directory holds %v (%v), want one temporary file", names, err)
		}
		if info, err := os.Lstat(filepath.Join(dir, names[0].Name())); err != nil || info.Mode().Perm() != 0o600 {
			t.Errorf("the temporary file is %v (%v), want mode 0600", info.Mode(), err)
		}
		_, err = w.Write([]byte("cert"))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if info, err := os.Stat(path); err != nil || info.Mode().Perm() != 0o644 {
		t.Fatalf("%s is %v (%v), want mode 0644", path, info.Mode(), err)
	}
	if err := WriteFileAtomicMode(path, []byte("cert 2"), 0o640); err != nil {
		t.Fatal(err)
	}
	if info, err := os.Stat(path); err != nil || info.Mode().Perm() != 0o640 {
		t.Fatalf("%s is %v (%v) after a rewrite, want mode 0640", path, info.Mode(), err)
	}
	if b, _ := os.ReadFile(path); string(b) != "cert 2" {
		t.Errorf("%s holds %q", path, b)
	}
}
