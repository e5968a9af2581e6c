package unix

import (
	"bytes"
	"errors"
	"fmt"

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

var (
	uidPrefix    = []byte("Uid:")
	gidPrefix    = []byte("Gid:")
	groupsPrefix = []byte("Groups:")
)

// parseStatus picks the Uid, Gid and Groups lines out of status. complete
// is false until all three whole lines have been seen.
func parseStatus(b []byte) (st procStatus, complete bool, err error) {
	const haveUID, haveGID, haveGroups = 1, 2, 4
	have := 0
	for have != haveUID|haveGID|haveGroups {
		i := bytes.IndexByte(b, '\n')
		if i < 0 {
			return st, false, nil
		}
		line := b[:i]
		b = b[i+1:]
		switch {
		case bytes.HasPrefix(line, uidPrefix):
			if st.uid, err = effectiveID(line[len(uidPrefix):]); err != nil {
				return st, false, fmt.Errorf("bad Uid line %q: %w", line, err)
			}
			have |= haveUID
		case bytes.HasPrefix(line, gidPrefix):
			if st.gid, err = effectiveID(line[len(gidPrefix):]); err != nil {
				return st, false, fmt.Errorf("bad Gid line %q: %w", line, err)
			}
			have |= haveGID
		case bytes.HasPrefix(line, groupsPrefix):
			st.groups = bytes.TrimSpace(line[len(groupsPrefix):])
			have |= haveGroups
		}
	}
	return st, true, nil
}

// effectiveID picks the effective id from "real effective saved fs", the id
// SPIRE reports (its second field; the only one if there is just one).
func effectiveID(v []byte) (uint32, error) {
	first, rest := nextField(v)
	second, _ := nextField(rest)
	f := second
	if f == nil {
		f = first
	}
	if f == nil {
		return 0, errors.New("no ids")
	}
	id, ok := parseUint32(f)
	if !ok {
		return 0, fmt.Errorf("%q is not an id", f)
	}
	return id, nil
}

// nextField splits off the first tab- or space-separated field of b; field
// is nil when none is left.
func nextField(b []byte) (field, rest []byte) {
	i := 0
	for i < len(b) && (b[i] == ' ' || b[i] == '\t') {
		i++
	}
	if i == len(b) {
		return nil, nil
	}
	j := i
	for j < len(b) && b[j] != ' ' && b[j] != '\t' {
		j++
	}
	return b[i:j], b[j:]
}

// parseUint32 parses a decimal id without the allocation of
// strconv.ParseUint(string(b)).
func parseUint32(b []byte) (uint32, bool) {
	if len(b) == 0 || len(b) > 10 {
		return 0, false
	}
	var v uint64
	for _, c := range b {
		if c < '0' || c > '9' {
			return 0, false
		}
		v = v*10 + uint64(c-'0')
	}
	if v > 1<<32-1 {
		return 0, false
	}
	return uint32(v), true
}
