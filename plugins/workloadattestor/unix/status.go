package unix

import (
	"bytes"
	"errors"
	"fmt"

	"github.com/lanyard-dev/lanyard/attestor/procfs"
	sysunix "golang.org/x/sys/unix"
)

// maxStatusSize bounds /proc/<pid>/status: 65536 supplementary groups of up
// to 10 digits each fit with room to spare.
const maxStatusSize = 2 << 20

// procStatus is what the attestor needs from /proc/<pid>/status.
type procStatus struct {
	uid, gid uint32
	// groups is the raw Groups value (space-separated gids); it points into
	// the read buffer.
	groups []byte
}

func (s *procStatus) numGroups() int {
	if len(s.groups) == 0 {
		return 0
	}
	return bytes.Count(s.groups, []byte{' '}) + 1
}

// readStatus reads status into *bufp (growing it when needed) and parses
// it. It stops reading once the Uid, Gid and Groups lines are in: they come
// early, so one read usually suffices.
func readStatus(path string, bufp *[]byte) (procStatus, error) {
	fd, err := openRetry(path)
	if err != nil {
		return procStatus{}, err
	}
	defer sysunix.Close(fd)

	buf := (*bufp)[:cap(*bufp)]
	n := 0
	for {
		if n == len(buf) {
			if len(buf) >= maxStatusSize {
				return procStatus{}, fmt.Errorf("status is larger than %d bytes", maxStatusSize)
			}
			grown := make([]byte, 2*len(buf))
			copy(grown, buf[:n])
			buf = grown
			*bufp = buf
		}
		m, err := sysunix.Read(fd, buf[n:])
		if errors.Is(err, sysunix.EINTR) {
			continue
		}
		if err != nil {
			return procStatus{}, err
		}
		n += m
		st, complete, err := parseStatus(buf[:n])
		if err != nil {
			return procStatus{}, err
		}
		if complete {
			return st, nil
		}
		if m == 0 {
			return procStatus{}, errors.New("no Uid, Gid and Groups lines in status")
		}
	}
}

func openRetry(path string) (int, error) {
	for {
		fd, err := sysunix.Open(path, sysunix.O_RDONLY|sysunix.O_CLOEXEC, 0)
		if errors.Is(err, sysunix.EINTR) {
			continue
		}
		return fd, err
	}
}

// parseStatus picks the Uid, Gid and Groups lines out of status. complete
// is false until all three whole lines have been seen.
func parseStatus(b []byte) (st procStatus, complete bool, err error) {
	ps, complete, err := procfs.ParseStatus(b, procfs.UIDLine|procfs.GIDLine|procfs.GroupsLine)
	if err != nil || !complete {
		return procStatus{}, false, err
	}
	return procStatus{uid: ps.UID.EffectiveOrOnly(), gid: ps.GID.EffectiveOrOnly(), groups: ps.Groups}, true, nil
}
