// Package procfs parses the files of /proc/<pid> that describe a process's
// credentials and start time. It only parses: its callers read the files
// their own way (the handshake without allocating, the unix attestor with a
// buffer that grows), so it makes no system call and builds anywhere.
package procfs

import (
	"bytes"
	"errors"
	"fmt"
)

// Lines names the lines of a status file that ParseStatus waits for.
type Lines uint8

// The lines of /proc/<pid>/status that hold credentials.
const (
	UIDLine Lines = 1 << iota
	GIDLine
	GroupsLine
)

// Status is what the credential lines of /proc/<pid>/status say.
type Status struct {
	UID, GID IDs
	// Groups is the value of the Groups line (space-separated gids); it
	// points into the parsed buffer.
	Groups []byte
}

// IDs are the first two IDs of a Uid or Gid line, the real and the
// effective ones; Linux prints four (real, effective, saved, filesystem).
type IDs struct {
	Real, Effective uint32
	// Count is how many of the two the line has: 1 or 2.
	Count int
}

// EffectiveOrOnly is the effective ID, or the only ID of a line that has
// one: the ID SPIRE's unix attestor reports.
func (ids IDs) EffectiveOrOnly() uint32 {
	if ids.Count < 2 {
		return ids.Real
	}
	return ids.Effective
}

var (
	uidPrefix    = []byte("Uid:")
	gidPrefix    = []byte("Gid:")
	groupsPrefix = []byte("Groups:")
)

// ParseStatus picks the Uid, Gid and Groups lines out of the start of a
// status file. complete is false until every line in want has been seen
// whole, so a caller that read only part of the file reads more. The Name
// line escapes line breaks, so every line starts with its key. Errors quote
// copies of the input, so that the buffer of a caller that reads without
// allocating stays on its stack.
func ParseStatus(b []byte, want Lines) (st Status, complete bool, err error) {
	var have Lines
	for have&want != want {
		i := bytes.IndexByte(b, '\n')
		if i < 0 {
			return st, false, nil
		}
		line := b[:i]
		b = b[i+1:]
		switch {
		case bytes.HasPrefix(line, uidPrefix):
			if st.UID, err = parseIDs(line[len(uidPrefix):]); err != nil {
				return st, false, fmt.Errorf("bad Uid line %q: %w", string(line), err)
			}
			have |= UIDLine
		case bytes.HasPrefix(line, gidPrefix):
			if st.GID, err = parseIDs(line[len(gidPrefix):]); err != nil {
				return st, false, fmt.Errorf("bad Gid line %q: %w", string(line), err)
			}
			have |= GIDLine
		case bytes.HasPrefix(line, groupsPrefix):
			st.Groups = bytes.TrimSpace(line[len(groupsPrefix):])
			have |= GroupsLine
		}
	}
	return st, true, nil
}

// parseIDs reads the first two IDs of "real effective saved fs".
func parseIDs(v []byte) (IDs, error) {
	first, rest := NextField(v)
	if first == nil {
		return IDs{}, errors.New("no ids")
	}
	var ids IDs
	var ok bool
	if ids.Real, ok = ParseID(first); !ok {
		return IDs{}, fmt.Errorf("%q is not an id", string(first))
	}
	ids.Count = 1
	second, _ := NextField(rest)
	if second == nil {
		return ids, nil
	}
	if ids.Effective, ok = ParseID(second); !ok {
		return IDs{}, fmt.Errorf("%q is not an id", string(second))
	}
	ids.Count = 2
	return ids, nil
}

// NextField splits off the first tab- or space-separated field of b; field
// is nil when none is left.
func NextField(b []byte) (field, rest []byte) {
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

// ParseID parses a decimal uid or gid without the allocation of
// strconv.ParseUint(string(b)).
func ParseID(b []byte) (uint32, bool) {
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

var nspidPrefix = []byte("\nNSpid:")

// NSpidDepth reads the NSpid line of a status file: the process's PID in
// each PID namespace from the reader's down to its own. It returns how
// many namespaces below the reader's the process is in (0: the reader's
// own), and false when the file has no NSpid line (Linux before 4.1).
func NSpidDepth(b []byte) (int, bool) {
	i := bytes.Index(b, nspidPrefix)
	if i < 0 {
		return 0, false
	}
	line := b[i+len(nspidPrefix):]
	if end := bytes.IndexByte(line, '\n'); end >= 0 {
		line = line[:end]
	}
	fields := len(bytes.Fields(line))
	if fields == 0 {
		return 0, false
	}
	return fields - 1, true
}
