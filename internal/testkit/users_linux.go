package testkit

import (
	"fmt"
	"net"
	"os"
	"sync"
	"syscall"
)

// UserNamespace is the SysProcAttr of a child in a new user namespace that
// maps 0 to this process's euid and egid and 1..n to host uids first..,
// as newuidmap does for an /etc/subuid range. The child is killed if this
// process dies.
func UserNamespace(first, n int) *syscall.SysProcAttr {
	return &syscall.SysProcAttr{
		Cloneflags: syscall.CLONE_NEWUSER,
		UidMappings: []syscall.SysProcIDMap{
			{ContainerID: 0, HostID: os.Geteuid(), Size: 1},
			{ContainerID: 1, HostID: first, Size: n},
		},
		GidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: os.Getegid(), Size: 1}},
		Pdeathsig:   syscall.SIGKILL,
	}
}

// seteuidMu serializes DialAs: seteuid changes every thread of the process.
var seteuidMu sync.Mutex

// DialAs connects to a Unix socket as euid uid, then goes back to euid 0:
// SO_PEERCRED records the connecting thread's credentials at connect. It
// needs root (or CAP_SETUID in a user namespace), and panics if it cannot
// become root again: nothing else may run as the wrong uid.
func DialAs(socket string, uid int) (net.Conn, error) {
	seteuidMu.Lock()
	defer seteuidMu.Unlock()
	if err := syscall.Seteuid(uid); err != nil {
		return nil, fmt.Errorf("seteuid(%d): %w", uid, err)
	}
	c, err := net.Dial("unix", socket)
	if err := syscall.Seteuid(0); err != nil {
		panic(fmt.Sprintf("seteuid(0): %v", err))
	}
	return c, err
}
