package agent

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// maxSymlinks bounds the symlinks followed while walking to a directory,
// as the kernel's own limit (MAXSYMLINKS) does.
const maxSymlinks = 40

// dirUse says what a walked directory is for: the checks and the words of
// a refusal depend on it.
type dirUse struct {
	what string // "socket directory", "data directory"
	key  string // the config key that names it
	risk string // what whoever controls it could do
	// strictLast refuses a last directory that others can write even when
	// it is sticky.
	strictLast bool
	// dirMode is the mode of the directories it creates; 0 means 0755.
	dirMode uint32
}

var (
	socketDirUse = dirUse{
		what:       "socket directory",
		key:        "socket_path",
		risk:       "replace the socket with one of their own",
		strictLast: true,
	}
	// adminDirUse is for the admin socket: reached by the agent's user and
	// group only, so the directories made for it are 0750, as the admin
	// socket's mode (0770) asks.
	adminDirUse = dirUse{
		what:       "admin socket directory",
		key:        "admin_socket_path",
		risk:       "replace the admin socket with one of their own",
		strictLast: true,
		dirMode:    0o750,
	}
	// brokerDirUse is for the SPIFFE Broker Endpoint's socket: as the
	// admin socket's, since SPIRE makes both 0770.
	brokerDirUse = dirUse{
		what:       "broker socket directory",
		key:        "experimental.broker.socket_path",
		risk:       "replace the broker socket with one of their own",
		strictLast: true,
		dirMode:    0o750,
	}
	dataDirUse = dirUse{
		what: "data directory",
		key:  "data_dir",
		risk: "replace the data directory, and the CA and keys in it",
	}
)

// openSocketDir opens the directory that holds a socket, creating what
// is missing with mode 0755 (use's dirMode), and returns an O_PATH descriptor of it. The
// socket's own directory must not be writable by others even when sticky,
// since anyone who can add a name there can put a socket of their own
// where workloads look for the agent's.
//
// Once every component is checked, nobody but root and the agent can
// rename, replace or add entries along the path: that is what makes the
// path-based bind, dial and unlink in Listen safe, since Go's net package
// cannot bind relative to a descriptor.
func openSocketDir(dir string, use dirUse) (int, error) { return openTrustedDir(dir, dir, use) }

// refuseDotDot refuses a configured path with a ".." component: the
// checks walk the path cleaned (filepath.Dir and Abs drop ".." as text),
// while the kernel resolves ".." after following a symlink, so the path
// checked and the path used could differ.
func refuseDotDot(path string, use dirUse) error {
	if slices.Contains(strings.Split(path, "/"), "..") {
		return fmt.Errorf("%s = %q has a \"..\" component: give the path without one", use.key, path)
	}
	return nil
}

// openTrustedDir opens dir, creating what is missing with mode 0755, and
// returns an O_PATH descriptor of it. It walks the path from / one
// component at a time with openat(O_NOFOLLOW), so each check applies to
// the directory that is then used. A directory it did not create, and any
// symlink on the way, must be owned by root or by the agent's user, and a
// directory must not be writable by group or others unless it is sticky
// (as /tmp is). A symlink that passes is followed by resolving its target
// the same way, so /var/run -> /run keeps working. Refusals name dir as on
// the way to target (the directory it is for, or dir itself).
func openTrustedDir(dir, target string, use dirUse) (int, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return -1, fmt.Errorf("resolving the %s %s: %w", use.what, dir, err)
	}
	if target, err = filepath.Abs(target); err != nil {
		return -1, fmt.Errorf("resolving the %s %s: %w", use.what, target, err)
	}
	root, err := unix.Open("/", unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("opening /: %w", err)
	}
	w := &dirWalk{euid: os.Geteuid(), use: use, target: target, stack: []walkedDir{{fd: root, path: "/"}}}
	defer w.close()
	var st unix.Stat_t
	if err := unix.Fstat(root, &st); err != nil {
		return -1, fmt.Errorf("checking /: %w", err)
	}
	if err := w.check("/", &st, false); err != nil {
		return -1, err
	}
	pending := splitPath(abs)
	links := 0
	for len(pending) > 0 {
		name := pending[0]
		pending = pending[1:]
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
				return -1, fmt.Errorf("%s, on the way to the %s %s, is not a directory: choose another %s", path, use.what, abs, use.key)
			}
			if !w.trustedOwner(st.Uid) {
				return -1, fmt.Errorf("the symlink %s on the way to the %s %s is owned by %s: whoever owns it could point it elsewhere and %s; remove it, or choose a %s whose directories and symlinks belong to root or the agent's user", path, use.what, abs, describeOwner(st.Uid), use.risk, use.key)
			}
			if links++; links > maxSymlinks {
				return -1, fmt.Errorf("too many symlinks on the way to the %s %s", use.what, abs)
			}
			target, err := readlinkat(cur.fd, name)
			if err != nil {
				return -1, fmt.Errorf("reading the symlink %s: %w", path, err)
			}
			if filepath.IsAbs(target) {
				w.toRoot()
			}
			pending = append(splitPath(target), pending...)
		default:
			return -1, fmt.Errorf("opening %s: %w", path, err)
		}
	}
	// The last directory, however it was reached, is checked once more
	// under the rule for it.
	last := w.top()
	if err := unix.Fstat(last.fd, &st); err != nil {
		return -1, fmt.Errorf("checking %s: %w", last.path, err)
	}
	if err := w.check(last.path, &st, use.strictLast); err != nil {
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
	euid   int
	use    dirUse
	target string // the directory walked to, for messages
	stack  []walkedDir
}

// name says which directory path is, for a refusal.
func (w *dirWalk) name(path string) string {
	if path == w.target {
		return "the " + w.use.what + " " + path
	}
	return path + ", on the way to the " + w.use.what + " " + w.target + ","
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
// change: see openTrustedDir.
func (w *dirWalk) check(path string, st *unix.Stat_t, strict bool) error {
	use := w.use
	if !w.trustedOwner(st.Uid) {
		return fmt.Errorf("%s is owned by %s with mode %s, not by root or the agent's user: its owner could %s; remove it (or chown it to root and chmod it 0755), or choose another %s", w.name(path), describeOwner(st.Uid), describeMode(st), use.risk, use.key)
	}
	if st.Mode&0o022 == 0 {
		return nil
	}
	if st.Mode&unix.S_ISVTX == 0 {
		return fmt.Errorf("%s (owned by %s) has mode %s: group or others can write to it without the sticky bit and could %s; chmod go-w it, or choose another %s", w.name(path), describeOwner(st.Uid), describeMode(st), use.risk, use.key)
	}
	if strict {
		return fmt.Errorf("the %s %s (owned by %s) has mode %s: anyone can create a name there and %s; put it in a directory of its own, such as %s", use.what, path, describeOwner(st.Uid), describeMode(st), use.risk, filepath.Join(path, "lanyard", "public"))
	}
	return nil
}

// mkdir creates a missing directory with mode 0755 (or the use's dirMode)
// whatever the umask: only the agent can change it, and workloads can
// reach what is below.
func (w *dirWalk) mkdir(parent int, name, path string) (int, error) {
	if err := unix.Mkdirat(parent, name, 0o700); err != nil {
		if errors.Is(err, unix.EEXIST) {
			// Someone made it between our look and our mkdir: check theirs.
			return w.openExisting(parent, name, path)
		}
		return -1, fmt.Errorf("creating %s, on the way to the %s: %w", path, w.use.what, err)
	}
	fd, err := unix.Openat(parent, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("opening %s, on the way to the %s: %w", path, w.use.what, err)
	}
	mode := w.use.dirMode
	if mode == 0 {
		mode = 0o755
	}
	if err := unix.Fchmod(fd, mode); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("setting the mode of %s, on the way to the %s: %w", path, w.use.what, err)
	}
	return fd, nil
}

func (w *dirWalk) openExisting(parent int, name, path string) (int, error) {
	fd, err := unix.Openat(parent, name, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("opening %s, on the way to the %s: %w", path, w.use.what, err)
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

// describeMode gives a stat mode both as chmod takes it and as ls shows it:
// "0755 (drwxr-xr-x)".
func describeMode(st *unix.Stat_t) string {
	return octalMode(st.Mode) + " (" + fileMode(st).String() + ")"
}

// octalMode formats permission bits as chmod takes them: 0700, 1777.
func octalMode(mode uint32) string { return fmt.Sprintf("%04o", mode&0o7777) }

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
