package agent

import (
	"bytes"
	"errors"
	"os"
	"strconv"
	"sync/atomic"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
)

// peerKey is whom a connection counts against in the connection cap: one
// user of the agent's user namespace, or one container (user namespace)
// created by root.
//
// Keying by the peer's uid alone is not enough: a user with an /etc/subuid
// range (newuidmap is setuid root) makes a user namespace that maps 65,536
// real host uids, and as root inside it connects once from each; a
// Kubernetes pod with hostUsers: false has a range of its own too. So a
// peer in another user namespace is keyed by the namespace below the
// agent's that contains it (nested namespaces are free to make, so the key
// is the top one), and that namespace by its creator when the creator is
// not root: an unprivileged user can make as many namespaces as
// user.max_user_namespaces allows, and all of them are still that user.
// Namespaces root made (container runtimes, systemd's PrivateUsers) are
// one key each.
type peerKey struct {
	// userns is the inode of the namespace the peer is keyed by, or 0 for
	// a user of the agent's namespace (nsfs inodes are never 0).
	userns uint64
	// uid is the user (in the agent's namespace) when userns is 0, and
	// the namespace's owner otherwise.
	uid uint32
}

// hiddenUserns keys together the peers in other user namespaces whose
// namespace the agent may not see (it is not root and lacks
// CAP_SYS_PTRACE): better one share for all of them than a share for each
// uid they map.
const hiddenUserns = ^uint64(0)

func uidKey(uid uint32) peerKey { return peerKey{uid: uid} }

// less orders keys for picking among equally heavy ones: users by uid
// first, then namespaces.
func (k peerKey) less(o peerKey) bool {
	if k.userns != o.userns {
		return k.userns < o.userns
	}
	return k.uid < o.uid
}

// logArgs names the key in a log line.
func (k peerKey) logArgs() []any {
	switch k.userns {
	case 0:
		return []any{"uid", k.uid}
	case hiddenUserns:
		return []any{"userns", "other user namespaces, not visible to the agent"}
	default:
		return []any{"userns", k.userns, "owner_uid", k.uid}
	}
}

// ioctls on a namespace fd (linux/nsfs.h).
const (
	nsGetParent   = 0xb702 // _IO(0xb7, 0x2)
	nsGetOwnerUID = 0xb704 // _IO(0xb7, 0x4)
)

// maxUsernsDepth bounds the walk up: the kernel nests user namespaces 32
// deep at most.
const maxUsernsDepth = 33

// peerKeyer finds the key of a peer from its SO_PEERCRED pid and uid.
type peerKeyer struct {
	log hclog.Logger
	// off: the agent's own namespace could not be read (no /proc), so
	// peers are keyed by uid.
	off bool
	// dev and ino name the agent's user namespace.
	dev, ino uint64
	// uidMap is the agent's /proc/self/uid_map, for telling peers in the
	// agent's namespace from others when their namespace is hidden.
	uidMap []byte
	// hiddenWarned: the warning about hidden namespaces was logged.
	hiddenWarned atomic.Bool
}

func newPeerKeyer(log hclog.Logger) *peerKeyer {
	k := &peerKeyer{log: log}
	var st unix.Stat_t
	err := unix.Stat("/proc/self/ns/user", &st)
	if err == nil {
		k.uidMap, err = os.ReadFile("/proc/self/uid_map")
	}
	if err != nil {
		k.off = true
		if log != nil {
			log.Warn("Connection fairness is per uid only: the agent cannot read its own user namespace, so a user mapping many uids in a user namespace gets a share for each", "error", err)
		}
		return k
	}
	k.dev, k.ino = st.Dev, st.Ino
	return k
}

// key is the peer's key. A peer in the agent's namespace costs one stat.
//
// The namespace is read through /proc/<pid>: if the process exited and its
// PID was reused before this, the connection is counted against the new
// process's key. That only moves accounting, and needs the PID space to
// wrap while the connection waits to be accepted; attestation itself pins
// the process with a pidfd.
func (k *peerKeyer) key(pid int32, uid uint32) peerKey {
	if k.off || pid <= 0 {
		// pid 0: the peer is in a PID namespace the agent cannot see.
		return uidKey(uid)
	}
	proc := "/proc/" + strconv.Itoa(int(pid))
	var st unix.Stat_t
	switch err := unix.Stat(proc+"/ns/user", &st); {
	case err == nil:
		if st.Dev == k.dev && st.Ino == k.ino {
			return uidKey(uid)
		}
		return k.namespaceKey(proc+"/ns/user", uid)
	case err == unix.EACCES || err == unix.EPERM:
		return k.hiddenKey(proc, pid, uid)
	default:
		// The peer exited: its connection is closed or soon will be.
		return uidKey(uid)
	}
}

// namespaceKey walks up from the peer's namespace to the one whose parent
// is the agent's.
func (k *peerKeyer) namespaceKey(path string, uid uint32) peerKey {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return uidKey(uid)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return uidKey(uid)
	}
	for range maxUsernsDepth {
		parent, err := unix.IoctlRetInt(fd, nsGetParent)
		if err != nil {
			// EPERM: the namespace is not below the agent's (the agent
			// runs in a user namespace and the peer outside it), so
			// the peer cannot have made it; its uid is as seen here.
			unix.Close(fd)
			return uidKey(uid)
		}
		var pst unix.Stat_t
		if err := unix.Fstat(parent, &pst); err != nil {
			unix.Close(parent)
			unix.Close(fd)
			return uidKey(uid)
		}
		if pst.Dev == k.dev && pst.Ino == k.ino {
			unix.Close(parent)
			break
		}
		unix.Close(fd)
		fd, st = parent, pst
	}
	owner, err := unix.IoctlGetUint32(fd, nsGetOwnerUID)
	unix.Close(fd)
	if err != nil {
		return uidKey(uid)
	}
	if owner != 0 {
		return uidKey(owner)
	}
	return peerKey{userns: st.Ino}
}

// hiddenKey keys a peer whose namespace the agent may not open. Its
// uid_map is readable by anyone: the same map as the agent's means the
// same namespace (or one root mapped identically).
func (k *peerKeyer) hiddenKey(proc string, pid int32, uid uint32) peerKey {
	m, err := os.ReadFile(proc + "/uid_map")
	if err != nil || bytes.Equal(m, k.uidMap) {
		return uidKey(uid)
	}
	if k.log != nil && !k.hiddenWarned.Swap(true) {
		k.log.Warn("The agent cannot see the user namespaces of other users' processes (it is not root and lacks CAP_SYS_PTRACE): connections from all other user namespaces share one share of the connection limit", "pid", pid, "uid", uid)
	}
	return peerKey{userns: hiddenUserns}
}

// errNotSocket: the connection is not a socket, so its peer is unknown.
var errNotSocket = errors.New("not a socket connection")
