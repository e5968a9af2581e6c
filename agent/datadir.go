package agent

import (
	"bufio"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// The data directory holds the agent's keys: the local CA's, the cached
// SVIDs', the agent SVID's. Whoever can write to it, or to a directory
// above it, can replace them (and so the CA that workloads trust), so the
// agent refuses a data directory that anyone but itself and root could
// change, and opens nothing in it through a symbolic link.

// EnsureDataDir makes dir ready to hold keys. Missing directories are
// created: dir with mode 0700, its missing parents 0755, all owned by the
// agent. An existing dir must be the agent's own directory (not a symbolic
// link, owned by the agent's uid, writable by no one else); one that others
// can read is tightened to 0700 through its descriptor. The directories
// above it are walked and checked as the socket's are (openTrustedDir):
// owned by root or the agent, writable by no one else unless sticky (as
// /tmp is), symlinks only of root or the agent. Anything else is an error
// naming the path, its owner and its mode: the agent must not start.
func EnsureDataDir(dir string) error { return ensurePrivateDir(dir, dataDirUse) }

// EnsureKeyDir is EnsureDataDir for another directory that holds keys,
// named by configKey in refusals (a key manager's directory).
func EnsureKeyDir(dir, configKey string) error {
	return ensurePrivateDir(dir, dirUse{what: "key directory", key: configKey, risk: "replace the keys in it"})
}

func ensurePrivateDir(dir string, use dirUse) error {
	if err := refuseDotDot(dir, use); err != nil {
		return err
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return fmt.Errorf("the %s %s: %w", use.what, dir, err)
	}
	parent, err := openTrustedDir(filepath.Dir(abs), abs, use)
	if err != nil {
		return err
	}
	defer unix.Close(parent)
	name := filepath.Base(abs)
	if err := unix.Mkdirat(parent, name, 0o700); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("creating the %s %s: %w", use.what, abs, err)
	}
	// O_NOFOLLOW|O_DIRECTORY refuses a link (ELOOP or ENOTDIR); the fstatat
	// only makes the message precise.
	fd, err := unix.Openat(parent, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		var lst unix.Stat_t
		if unix.Fstatat(parent, name, &lst, unix.AT_SYMLINK_NOFOLLOW) == nil && lst.Mode&unix.S_IFMT == unix.S_IFLNK {
			target, _ := readlinkat(parent, name)
			return fmt.Errorf("the %s %s is a symbolic link (to %s): set %s to the real directory", use.what, abs, target, use.key)
		}
		if errors.Is(err, unix.ENOTDIR) || errors.Is(err, unix.ELOOP) {
			return fmt.Errorf("the %s %s is not a directory", use.what, abs)
		}
		return fmt.Errorf("opening the %s %s: %w", use.what, abs, err)
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("checking the %s %s: %w", use.what, abs, err)
	}
	euid := uint32(os.Geteuid())
	if st.Uid != euid {
		return fmt.Errorf("the %s %s is owned by %s, mode %s, not by the agent (%s): whoever owns it can replace the keys in it; "+
			"check what is in it, then chown it to the agent's user or choose another %s", use.what, abs, describeOwner(st.Uid), describeMode(&st), describeOwner(euid), use.key)
	}
	if st.Mode&0o022 != 0 {
		return fmt.Errorf("the %s %s (owner %s) has mode %s: others can write to it and may have replaced the keys in it; "+
			"check what is in it, then chmod 0700 it", use.what, abs, describeOwner(st.Uid), describeMode(&st))
	}
	if st.Mode&0o7777 != 0o700 {
		if err := unix.Fchmod(fd, 0o700); err != nil {
			return fmt.Errorf("setting the mode of the %s %s to 0700: %w", use.what, abs, err)
		}
	}
	return nil
}

// UnsafeFileError is a file in the data directory that the agent refuses
// to read: not a regular file, or owned by someone else, or open to others.
// Reading it would let whoever made it choose the agent's keys.
type UnsafeFileError struct {
	Path   string
	Reason string
}

func (e *UnsafeFileError) Error() string { return e.Path + ": " + e.Reason }

// ReadPrivateFile reads a file the agent wrote with WriteFileAtomic: it
// opens it without following a symbolic link and checks, on the open
// descriptor, that it is a regular file owned by the agent's uid with mode
// 0600. Otherwise it returns an *UnsafeFileError saying what is wrong. A
// missing file is an error satisfying errors.Is(err, fs.ErrNotExist).
func ReadPrivateFile(path string) ([]byte, error) {
	return readOwnFile(path, 0o7777, "not 0600")
}

// ReadAdoptedFile reads a private file that another program wrote as the
// agent's user and the agent takes over (spire-agent's agent-data.json and
// keys.json). It checks what ReadPrivateFile checks, but accepts any mode
// without group or other permissions: that program chose the mode, and its
// umask may have narrowed 0600 to 0400.
func ReadAdoptedFile(path string) ([]byte, error) {
	return readOwnFile(path, 0o7077, "readable or writable by others than its owner")
}

// readOwnFile is ReadPrivateFile with the mode rule as a parameter: the
// bits of mask must be those of 0600.
func readOwnFile(path string, mask uint32, badMode string) ([]byte, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.ELOOP) {
		return nil, &UnsafeFileError{Path: path, Reason: describeLink(path)}
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return nil, err
	}
	euid := uint32(os.Geteuid())
	switch {
	case st.Mode&unix.S_IFMT != unix.S_IFREG:
		return nil, &UnsafeFileError{Path: path, Reason: "is not a regular file"}
	case st.Uid != euid:
		return nil, &UnsafeFileError{Path: path, Reason: fmt.Sprintf("is owned by %s (mode %s), not by the agent (%s)", describeOwner(st.Uid), octalMode(st.Mode), describeOwner(euid))}
	case st.Mode&mask != 0o600&mask:
		return nil, &UnsafeFileError{Path: path, Reason: fmt.Sprintf("has mode %s (owner %s), %s", octalMode(st.Mode), describeOwner(st.Uid), badMode)}
	}
	return io.ReadAll(f)
}

// describeLink says what the symbolic link at path points to, and who
// could have pointed it there.
func describeLink(path string) string {
	var st unix.Stat_t
	target, err := os.Readlink(path)
	if err != nil || unix.Lstat(path, &st) != nil {
		return "is a symbolic link"
	}
	return fmt.Sprintf("is a symbolic link to %s (the link owned by %s)", target, describeOwner(st.Uid))
}

// A temporary file of WriteFileAtomic is named ".<name>.tmp-<random>", in
// the directory of <name>.
const tempInfix = ".tmp-"

// RemoveStaleTempFiles deletes the temporary files that writes interrupted
// by a crash left in dir (they may hold private keys), and returns their
// names. Call it at start, before anything writes to dir.
func RemoveStaleTempFiles(dir string) ([]string, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("listing the data directory %s: %w", dir, err)
	}
	var removed []string
	for _, e := range entries {
		name := e.Name()
		if !strings.HasPrefix(name, ".") || !strings.Contains(name, tempInfix) || !e.Type().IsRegular() {
			continue
		}
		if err := os.Remove(filepath.Join(dir, name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return removed, fmt.Errorf("removing the stale temporary file %s: %w", filepath.Join(dir, name), err)
		}
		removed = append(removed, name)
	}
	return removed, nil
}

// WriteFileAtomic writes data to path with mode 0600 so that a reader, or a
// crash, sees the old file or the new one and never a part: it writes a
// temporary file in the same directory, syncs it, renames it over path and
// syncs the directory. It is the one writer of every file the agent and
// the CLI write.
func WriteFileAtomic(path string, data []byte) error {
	return WriteFileAtomicMode(path, data, 0o600)
}

// WriteFileAtomicMode is WriteFileAtomic for a file that takes mode (a
// certificate others may read): the file is 0600 while it is written, and
// takes mode on its descriptor just before the rename, so its content is
// never readable under a wider mode before it is whole.
func WriteFileAtomicMode(path string, data []byte, mode fs.FileMode) error {
	return writeFileAtomic(path, mode, func(w io.Writer) error {
		_, err := w.Write(data)
		return err
	})
}

// WriteFileAtomicFunc is WriteFileAtomic for content that write streams
// (buffered), so that a large file never has to be held in memory whole.
func WriteFileAtomicFunc(path string, write func(w io.Writer) error) error {
	return writeFileAtomic(path, 0o600, write)
}

func writeFileAtomic(path string, mode fs.FileMode, write func(w io.Writer) error) error {
	dir := filepath.Dir(path)
	tmp, err := createTemp(dir, "."+filepath.Base(path)+tempInfix)
	if err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	defer os.Remove(tmp.Name()) // a no-op once renamed
	bw := bufio.NewWriterSize(tmp, 64<<10)
	err = write(bw)
	if err == nil {
		err = bw.Flush()
	}
	if err == nil && mode != 0o600 {
		// Before the sync, which then covers the mode too.
		err = tmp.Chmod(mode)
	}
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	// rename replaces path itself, never what a symbolic link there
	// points to.
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("syncing %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("syncing %s: %w", dir, err)
	}
	return nil
}

// createTemp creates a new file named prefix plus a random suffix, mode
// 0600 from its creation (O_EXCL: never an existing file, O_NOFOLLOW: never
// through a link). The mode is set again on the descriptor, as the umask
// may only narrow it and an ACL default may widen it.
func createTemp(dir, prefix string) (*os.File, error) {
	for range 10 {
		var b [8]byte
		if _, err := rand.Read(b[:]); err != nil {
			return nil, err
		}
		name := filepath.Join(dir, prefix+hex.EncodeToString(b[:]))
		f, err := os.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
		if errors.Is(err, fs.ErrExist) {
			continue
		}
		if err != nil {
			return nil, err
		}
		if err := f.Chmod(0o600); err != nil {
			f.Close()
			os.Remove(name)
			return nil, err
		}
		return f, nil
	}
	return nil, fmt.Errorf("creating a temporary file in %s: ten random names were taken", dir)
}
