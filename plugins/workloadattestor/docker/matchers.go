package docker

import (
	"fmt"
	"strings"
)

// The legacy locator's pattern language (SPIRE's
// container_id_cgroup_matchers): a pattern is a cgroup path split on "/",
// where "*" matches any one segment, "<id>" (exactly once) matches any one
// segment and is the container ID, and any other segment matches itself.
// A pattern matches a whole path.
const (
	wildcardSegment = "*"
	idSegment       = "<id>"
)

type matcherSet struct {
	patterns [][]string
}

// newMatcherSet checks the patterns as SPIRE does: each has "<id>" once,
// and no two can match the same path.
func newMatcherSet(patterns []string) (*matcherSet, error) {
	m := &matcherSet{}
	for _, p := range patterns {
		segs := strings.Split(p, "/")
		if n := countID(segs); n != 1 {
			return nil, fmt.Errorf("pattern %q must contain the container ID token %q exactly once", p, idSegment)
		}
		for i, q := range m.patterns {
			if overlap(q, segs) {
				return nil, fmt.Errorf("patterns %q and %q are ambiguous: both can match the same cgroup path", patterns[i], p)
			}
		}
		m.patterns = append(m.patterns, segs)
	}
	return m, nil
}

func countID(segs []string) int {
	n := 0
	for _, s := range segs {
		if s == idSegment {
			n++
		}
	}
	return n
}

// overlap reports whether some path matches both a and b.
func overlap(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if !isVariable(a[i]) && !isVariable(b[i]) && a[i] != b[i] {
			return false
		}
	}
	return true
}

func isVariable(seg string) bool { return seg == wildcardSegment || seg == idSegment }

// find returns the container ID the first matching pattern captures, and
// the path up to and including its segment.
func (m *matcherSet) find(path string) (id, prefix string, found bool) {
	segs := strings.Split(path, "/")
next:
	for _, p := range m.patterns {
		if len(p) != len(segs) {
			continue
		}
		at := 0
		for i, want := range p {
			switch want {
			case idSegment:
				at = i
			case wildcardSegment:
			default:
				if want != segs[i] {
					continue next
				}
			}
		}
		return segs[at], strings.Join(segs[:at+1], "/"), true
	}
	return "", "", false
}
