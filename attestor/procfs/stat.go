package procfs

import (
	"bytes"
	"errors"
	"fmt"
)

// ParseStartTime returns field 22 of a /proc/<pid>/stat line. Field 2 (comm)
// is in parentheses and may itself hold spaces and ')', but no later field
// holds ')', so fields are counted from the last ')'.
func ParseStartTime(stat []byte) (uint64, error) {
	end := bytes.LastIndexByte(stat, ')')
	if end < 0 || bytes.IndexByte(stat, '(') < 0 {
		return 0, errors.New("stat has no parenthesized command name")
	}
	rest := stat[end+1:]
	// rest is " <field 3> <field 4> ..."; skip to the space before field 22.
	for field := 3; field <= 22; field++ {
		if len(rest) == 0 || rest[0] != ' ' {
			return 0, fmt.Errorf("stat ends before field %d", field)
		}
		rest = rest[1:]
		if field < 22 {
			sp := bytes.IndexByte(rest, ' ')
			if sp < 0 {
				return 0, fmt.Errorf("stat ends before field %d", field+1)
			}
			rest = rest[sp:]
		}
	}
	v, n, err := parseUint(rest)
	if err != nil {
		return 0, fmt.Errorf("stat field 22 (start time): %w", err)
	}
	// A number cut off by the end of the buffer would compare wrongly.
	if n == len(rest) || (rest[n] != ' ' && rest[n] != '\n') {
		return 0, errors.New("stat field 22 (start time) is not followed by a separator")
	}
	return v, nil
}

// parseUint reads leading decimal digits; strconv would need a string.
func parseUint(b []byte) (v uint64, n int, err error) {
	for n < len(b) && b[n] >= '0' && b[n] <= '9' {
		d := uint64(b[n] - '0')
		if v > (1<<64-1-d)/10 {
			return 0, 0, errors.New("number overflows 64 bits")
		}
		v = v*10 + d
		n++
	}
	if n == 0 {
		return 0, 0, errors.New("not a number")
	}
	return v, n, nil
}
