package agent

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// maxSymlinks bounds the symlinks followed while opening the socket
// directory, as the kernel's own limit (MAXSYMLINKS) does.
const maxSymlinks = 40

// openSocketDir opens the directory that holds the socket, creating what
// is missing with mode 0755, and returns an O_PATH descriptor of it.
//
// It walks the path from / one component at a time with
// openat(O_NOFOLLOW), so each check applies to the directory that is then
// used. A directory it did not create, and any symlink on the way, must be
// owned by root or by the agent's user, and a directory must not be
// writable by group or others unless it is sticky (as /tmp is); the
// socket's own directory must not be writable by others even when sticky,
// since anyone who can add a name there can put a socket of their own where
// workloads look for the agent's. A symlink that passes is followed by
// resolving its target the same way, so /var/run -> /run keeps working.
//
// Once every component is checked, nobody but root and the agent can
// rename, replace or add entries along the path: that is what makes the
// path-based bind, dial and unlink in Listen safe, since Go's net package
// cannot bind relative to a descriptor.
func openSocketDir(dir string) (int, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return -1, fmt.Errorf("resolving the socket directory %s: %w", dir, err)
	}
	root, err := unix.Open("/", unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("opening /: %w", err)
	}
	w := &dirWalk{euid: os.Geteuid(), stack: []walkedDir{{fd: root, path: "/"}}}
	defer w.close()
	var st unix.Stat_t
	if err := unix.Fstat(root, &st); err != nil {
		return -1, fmt.Errorf("checking /: %w", err)
	}
	if err := w.check("/", &st, false); err != nil {
		return -1, err
	}
	todo := splitPath(abs)
	links := 0
	for len(todo) > 0 {
		name := todo[0]
		todo = todo[1:]
		switch name {
		case ".":
			continue
		case "..":
			w.pop()
			continue
		}
		cur := w.top()
		path := filepath.Join(cur.path, name)
		fd, err := unix.Openat(cur.fd, name, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		switch {
		case err == nil:
			if err := unix.Fstat(fd, &st); err != nil {
				unix.Close(fd)
				return -1, fmt.Errorf("checking %s: %w", path, err)
			}
			w.push(fd, path)
			if err := w.check(path, &st, false); err != nil {
				return -1, err
			}
		case errors.Is(err, unix.ENOENT):
			fd, err := w.mkdir(cur.fd, name, path)
			if err != nil {
				return -1, err
			}
			w.push(fd, path)
		case errors.Is(err, unix.ENOTDIR), errors.Is(err, unix.ELOOP):
			// A symlink, or not a directory at all.
			if err := unix.Fstatat(cur.fd, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
				return -1, fmt.Errorf("checking %s: %w", path, err)
			}
			if st.Mode&unix.S_IFMT != unix.S_IFLNK {
				return -1, fmt.Errorf("%s is not a directory: choose another socket_path", path)
			}
			if !w.trustedOwner(st.Uid) {
				return -1, fmt.Errorf("the symlink %s on the way to the socket is owned by %s: whoever owns it could point workloads at a socket of their own; remove it, or choose a socket_path whose directories and symlinks belong to root", path, describeOwner(st.Uid))
			}
			if links++; links > maxSymlinks {
				return -1, fmt.Errorf("too many symlinks on the way to the socket directory %s", abs)
			}
			target, err := readlinkat(cur.fd, name)
			if err != nil {
				return -1, fmt.Errorf("reading the symlink %s: %w", path, err)
			}
			if filepath.IsAbs(target) {
				w.toRoot()
			}
			todo = append(splitPath(target), todo...)
		default:
			return -1, fmt.Errorf("opening %s: %w", path, err)
		}
	}
	// The socket's own directory, however it was reached, is checked once
	// more under the stricter rule for it.
	last := w.top()
	if err := unix.Fstat(last.fd, &st); err != nil {
		return -1, fmt.Errorf("checking %s: %w", last.path, err)
	}
	if err := w.check(last.path, &st, true); err != nil {
		return -1, err
	}
	return w.take(), nil
}

type walkedDir struct {
	fd   int
	path string
}

// dirWalk is the stack of directories opened so far, so that ".." in a
// symlink's target goes back to the directory actually walked through.
type dirWalk struct {
	euid  int
	stack []walkedDir
}

func (w *dirWalk) top() walkedDir { return w.stack[len(w.stack)-1] }

func (w *dirWalk) push(fd int, path string) { w.stack = append(w.stack, walkedDir{fd, path}) }

func (w *dirWalk) pop() {
	if len(w.stack) > 1 {
		unix.Close(w.top().fd)
		w.stack = w.stack[:len(w.stack)-1]
	}
}

func (w *dirWalk) toRoot() {
	for len(w.stack) > 1 {
		w.pop()
	}
}

// take hands the last directory to the caller.
func (w *dirWalk) take() int {
	fd := w.top().fd
	w.stack = w.stack[:len(w.stack)-1]
	return fd
}

func (w *dirWalk) close() {
	for _, d := range w.stack {
		unix.Close(d.fd)
	}
	w.stack = nil
}

func (w *dirWalk) trustedOwner(uid uint32) bool { return uid == 0 || int(uid) == w.euid }

// check refuses a directory that someone other than root and the agent can
// change: see openSocketDir.
func (w *dirWalk) check(path string, st *unix.Stat_t, final bool) error {
	mode := fileMode(st)
	if !w.trustedOwner(st.Uid) {
		return fmt.Errorf("the socket directory %s is owned by %s with mode %s, not by root or the agent's user: its owner could replace the socket with one of their own; remove it (or chown it to root and chmod it 0755), or choose another socket_path", path, describeOwner(st.Uid), mode)
	}
	if st.Mode&0o022 == 0 {
		return nil
	}
	if st.Mode&unix.S_ISVTX == 0 {
		return fmt.Errorf("the socket directory %s (owned by %s) has mode %s: group or others can write to it and replace the socket; chmod it 0755, or choose another socket_path", path, describeOwner(st.Uid), mode)
	}
	if final {
		return fmt.Errorf("the socket directory %s (owned by %s) has mode %s: anyone can create a socket there under the agent's name; put the socket in a directory of its own, such as %s", path, describeOwner(st.Uid), mode, filepath.Join(path, "lanyard", "public"))
	}
	return nil
}

// mkdir creates a missing directory with mode 0755 whatever the umask, so
// that workloads can reach the socket and only the agent can change it.
func (w *dirWalk) mkdir(parent int, name, path string) (int, error) {
	if err := unix.Mkdirat(parent, name, 0o700); err != nil {
		if errors.Is(err, unix.EEXIST) {
			// Someone made it between our look and our mkdir: check theirs.
			return w.openExisting(parent, name, path)
		}
		return -1, fmt.Errorf("creating the socket directory %s: %w", path, err)
	}
	fd, err := unix.Openat(parent, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("opening the socket directory %s: %w", path, err)
	}
	if err := unix.Fchmod(fd, 0o755); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("setting the mode of the socket directory %s: %w", path, err)
	}
	return fd, nil
}

func (w *dirWalk) openExisting(parent int, name, path string) (int, error) {
	fd, err := unix.Openat(parent, name, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("opening the socket directory %s: %w", path, err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("checking %s: %w", path, err)
	}
	if err := w.check(path, &st, false); err != nil {
		unix.Close(fd)
		return -1, err
	}
	return fd, nil
}

func splitPath(p string) []string {
	return strings.FieldsFunc(p, func(r rune) bool { return r == '/' })
}

func readlinkat(dirfd int, name string) (string, error) {
	for size := 256; size <= 1<<16; size *= 4 {
		buf := make([]byte, size)
		n, err := unix.Readlinkat(dirfd, name, buf)
		if err != nil {
			return "", err
		}
		if n < size {
			return string(buf[:n]), nil
		}
	}
	return "", unix.ENAMETOOLONG
}

// describeOwner names a uid, and its user when there is one.
func describeOwner(uid uint32) string {
	id := strconv.FormatUint(uint64(uid), 10)
	if u, err := user.LookupId(id); err == nil && u.Username != "" {
		return "uid " + id + " (" + u.Username + ")"
	}
	return "uid " + id
}

// fileMode renders a stat mode as ls does (drwxr-xr-x).
func fileMode(st *unix.Stat_t) fs.FileMode {
	m := fs.FileMode(st.Mode & 0o777)
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFDIR:
		m |= fs.ModeDir
	case unix.S_IFLNK:
		m |= fs.ModeSymlink
	case unix.S_IFSOCK:
		m |= fs.ModeSocket
	}
	if st.Mode&unix.S_ISVTX != 0 {
		m |= fs.ModeSticky
	}
	if st.Mode&unix.S_ISGID != 0 {
		m |= fs.ModeSetgid
	}
	if st.Mode&unix.S_ISUID != 0 {
		m |= fs.ModeSetuid
	}
	return m
}
