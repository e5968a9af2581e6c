package filedelivery

import (
	"errors"
	"strings"
)

// SplitArgs splits cmd_args as spiffe-helper does (a CSV record with a
// space for the comma): arguments are separated by spaces, a double-quoted
// part may hold spaces, and "" inside quotes is one literal quote. There
// is no shell: no $, no backslash escapes, no globs. Unlike spiffe-helper,
// a run of spaces separates once (it passes an empty argument for each
// extra space), tabs and newlines separate too, and a quote may open in
// the middle of an argument (--name="a b"), where spiffe-helper fails.
func SplitArgs(s string) ([]string, error) {
	var args []string
	var cur strings.Builder
	inArg, quoted := false, false
	for i := 0; i < len(s); i++ {
		ch := s[i]
		switch {
		case quoted && ch == '"':
			if i+1 < len(s) && s[i+1] == '"' {
				cur.WriteByte('"')
				i++
				continue
			}
			quoted = false
		case quoted:
			cur.WriteByte(ch)
		case ch == '"':
			quoted, inArg = true, true
		case ch == ' ' || ch == '\t' || ch == '\n' || ch == '\r':
			if inArg {
				args = append(args, cur.String())
				cur.Reset()
				inArg = false
			}
		default:
			cur.WriteByte(ch)
			inArg = true
		}
	}
	if quoted {
		return nil, errors.New("a double quote is not closed")
	}
	if inArg {
		args = append(args, cur.String())
	}
	return args, nil
}
