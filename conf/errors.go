package conf

import (
	"fmt"
	"sort"
	"strings"
)

// Pos is a position in a config file. Line and Column start at 1.
type Pos struct {
	File   string
	Line   int
	Column int
}

// String formats the position as "file:line:col", the form editors jump to.
func (p Pos) String() string {
	return fmt.Sprintf("%s:%d:%d", p.File, p.Line, p.Column)
}

// Error is one positioned config error.
type Error struct {
	Pos Pos
	Key string // full key path, e.g. `agent.trust_domain`; may be empty
	Msg string
}

// Error formats the error as "file:line:col: key: msg".
func (e *Error) Error() string {
	if e.Key == "" {
		return e.Pos.String() + ": " + e.Msg
	}
	return e.Pos.String() + ": " + e.Key + ": " + e.Msg
}

// Errors is a list of config errors; Parse reports all it finds so a user
// can fix a file in one pass.
type Errors []*Error

// Error prints one error a line.
func (e Errors) Error() string {
	lines := make([]string, len(e))
	for i, err := range e {
		lines[i] = err.Error()
	}
	return strings.Join(lines, "\n")
}

// Unwrap lets errors.As find the individual *Error values.
func (e Errors) Unwrap() []error {
	errs := make([]error, len(e))
	for i, err := range e {
		errs[i] = err
	}
	return errs
}

// maxErrors bounds a report: past it, more lines help nobody.
const maxErrors = 50

// errList collects errors while a file is walked.
type errList struct {
	errs Errors
	keys map[string]bool
}

func (l *errList) add(pos Pos, key, format string, args ...any) {
	l.push(&Error{Pos: pos, Key: key, Msg: fmt.Sprintf(format, args...)})
}

func (l *errList) push(e *Error) {
	if l.keys == nil {
		l.keys = map[string]bool{}
	}
	l.keys[e.Key] = true
	l.errs = append(l.errs, e)
}

func (l *errList) addAll(err error) {
	switch e := err.(type) {
	case nil:
	case Errors:
		for _, x := range e {
			l.push(x)
		}
	case *Error:
		l.push(e)
	default:
		l.push(&Error{Msg: err.Error()})
	}
}

// has reports whether an error about key was already reported; checks of a
// value that failed to decode would only repeat it.
func (l *errList) has(key string) bool {
	return l.keys[key]
}

// err returns the collected errors in file order, or nil (never a typed nil).
func (l *errList) err() error {
	if len(l.errs) == 0 {
		return nil
	}
	sort.SliceStable(l.errs, func(i, j int) bool {
		a, b := l.errs[i].Pos, l.errs[j].Pos
		if a.Line != b.Line {
			return a.Line < b.Line
		}
		return a.Column < b.Column
	})
	if n := len(l.errs); n > maxErrors {
		more := &Error{Pos: l.errs[maxErrors].Pos, Msg: fmt.Sprintf("and %d more errors; fix the ones above first", n-maxErrors)}
		l.errs = append(l.errs[:maxErrors:maxErrors], more)
	}
	return l.errs
}

// unknownKeyMsg explains an unknown key, suggesting the known key it most
// likely misspells.
func unknownKeyMsg(key string, known []string) string {
	msg := "unknown key"
	if s := suggest(key, known); s != "" {
		msg += fmt.Sprintf("; did you mean %q?", s)
	}
	if len(known) > 0 {
		msg += " (known keys: " + strings.Join(known, ", ") + ")"
	}
	return msg
}

// suggest returns the one known word within edit distance 2 of word, or ""
// when none or several are equally close.
func suggest(word string, known []string) string {
	lw := strings.ToLower(word)
	best, bestDist, tie := "", 3, false
	for _, k := range known {
		d := editDistance(lw, strings.ToLower(k))
		switch {
		case d < bestDist:
			best, bestDist, tie = k, d, false
		case d == bestDist:
			tie = true
		}
	}
	// A distance as long as the word itself means nothing is shared.
	if best == "" || tie || bestDist >= len([]rune(word)) {
		return ""
	}
	return best
}

// editDistance is the Levenshtein distance between a and b.
func editDistance(a, b string) int {
	ra, rb := []rune(a), []rune(b)
	prev := make([]int, len(rb)+1)
	cur := make([]int, len(rb)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(ra); i++ {
		cur[0] = i
		for j := 1; j <= len(rb); j++ {
			cost := 1
			if ra[i-1] == rb[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(rb)]
}
