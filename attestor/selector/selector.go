// Package selector holds the selector, one fact about a workload such as
// unix:uid:1000, and its parsing: what attestors produce and registration
// entries require. It makes no system calls, so any part can use it.
package selector

import (
	"fmt"
	"sort"
	"strings"
)

// Selector is one fact about a workload, such as unix:uid:1000. Type names
// the attestor that produced it; Value may itself contain colons.
type Selector struct {
	Type  string
	Value string
}

// maxSelectorLen bounds one selector; registration entries and attestors
// never need more, and it keeps hostile input from growing the index.
const maxSelectorLen = 4096

// Parse parses "type:value" as written in registration entries.
func Parse(s string) (Selector, error) {
	if len(s) > maxSelectorLen {
		return Selector{}, fmt.Errorf("selector is %d bytes long, the limit is %d", len(s), maxSelectorLen)
	}
	typ, value, ok := strings.Cut(s, ":")
	switch {
	case !ok:
		return Selector{}, fmt.Errorf("selector %q has no type: write it as type:value, e.g. unix:uid:1000", s)
	case typ == "":
		return Selector{}, fmt.Errorf("selector %q has an empty type: write it as type:value, e.g. unix:uid:1000", s)
	case value == "":
		return Selector{}, fmt.Errorf("selector %q has an empty value: write it as type:value, e.g. unix:uid:1000", s)
	case strings.ContainsAny(typ, " \t\n"):
		return Selector{}, fmt.Errorf("selector %q has whitespace in its type", s)
	}
	return Selector{Type: typ, Value: value}, nil
}

func (s Selector) String() string { return s.Type + ":" + s.Value }

// Sort orders selectors by type, then value, and drops duplicates.
func Sort(sels []Selector) []Selector {
	sort.Slice(sels, func(i, j int) bool {
		if sels[i].Type != sels[j].Type {
			return sels[i].Type < sels[j].Type
		}
		return sels[i].Value < sels[j].Value
	})
	out := sels[:0]
	for i, s := range sels {
		if i > 0 && s == sels[i-1] {
			continue
		}
		out = append(out, s)
	}
	return out
}
