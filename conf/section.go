package conf

import (
	"fmt"
	"reflect"
	"strconv"
	"strings"
	"time"
)

// Section is one block of HCL whose schema is owned by a plugin (or by the
// agent, for the built-in blocks). It remembers where each key was written
// so that errors found later, while a plugin validates values, still point
// at the right line.
type Section struct {
	file   string
	prefix string // key path of the block, e.g. `plugins.UpstreamAuthority "local".plugin_data`
	pos    Pos    // where the block starts
	body   *node  // an object node
	// refuse maps a lower-case key path inside the section, then a
	// lower-case key, to the message given for that key instead of
	// "unknown key".
	refuse map[string]map[string]string
}

// NewSection builds a Section from HCL text, for tests of plugins:
// NewSection("test.conf", `x509_svid_ttl = "1h"`).
func NewSection(file, hclBody string) (*Section, error) {
	root, err := parseTree(file, trimBOM([]byte(hclBody)))
	if err != nil {
		return nil, err
	}
	return &Section{file: file, pos: Pos{File: file, Line: 1, Column: 1}, body: root}, nil
}

// Empty reports whether the section has no keys.
func (s *Section) Empty() bool {
	return s == nil || s.body == nil || len(s.body.entries) == 0
}

// Errorf returns a positioned error for a key of this section, e.g.
// s.Errorf("entry[1].selectors", "selector %q has no type", x). Indexes count
// repeated blocks and list elements from 0; key "" means the section itself.
// When the key is not in the file, the error points at its nearest
// enclosing key that is, or else at the section.
func (s *Section) Errorf(key string, format string, args ...any) error {
	msg := fmt.Sprintf(format, args...)
	if s == nil {
		return &Error{Key: key, Msg: msg}
	}
	return &Error{Pos: s.lookup(key), Key: s.fullKey(key), Msg: msg}
}

// Duration parses a duration written as a string such as "1h" or "90s",
// for the value of key. Zero and negative durations are refused: every
// duration Lanyard reads is a TTL or an interval.
func (s *Section) Duration(key, value string) (time.Duration, error) {
	d, err := time.ParseDuration(value)
	if err != nil {
		return 0, s.Errorf(key, "bad duration %q: write it like \"1h\" or \"90s\"", value)
	}
	if d <= 0 {
		return 0, s.Errorf(key, "bad duration %q: it must be more than zero, like \"1h\" or \"90s\"", value)
	}
	return d, nil
}

// Decode decodes the section into v, a pointer to a struct whose fields
// carry `hcl:"key"` tags (an untagged field uses its name; keys match case
// insensitively, as in hcl v1 and so SPIRE). Supported field types: string,
// bool, integers, floats, nested structs and pointers to them, slices
// (repeated blocks such as `entry { } entry { }`, or lists), and maps with
// string keys. Numbers written as strings ("8081") decode into integers, as
// SPIRE configs often do that. Every key that v's type does not declare and
// every type mismatch is reported, each with its file:line:col and full key
// path; Decode returns Errors then.
func (s *Section) Decode(v any) error {
	if s == nil {
		return nil
	}
	rv := reflect.ValueOf(v)
	if rv.Kind() != reflect.Pointer || rv.IsNil() || rv.Elem().Kind() != reflect.Struct {
		return s.Errorf("", "Decode needs a non-nil pointer to a struct, got %T (this is a bug in the caller)", v)
	}
	d := decoder{s: s}
	d.decodeStruct("", []valueRef{{n: s.body, pos: s.pos}}, rv.Elem())
	return d.errs.err()
}

func (s *Section) fullKey(key string) string {
	switch {
	case s.prefix == "":
		return key
	case key == "":
		return s.prefix
	case strings.HasPrefix(key, "["):
		return s.prefix + key
	}
	return s.prefix + "." + key
}

// child returns a section for the object n found at key (relative to s).
func (s *Section) child(key string, pos Pos, n *node) *Section {
	return &Section{file: s.file, prefix: s.fullKey(key), pos: pos, body: n}
}

// lookup finds where key (a path like "entry[1].selectors[0]") is written.
func (s *Section) lookup(key string) Pos {
	pos := s.pos
	if key == "" || s.body == nil {
		return pos
	}
	cands := []*node{s.body}
	for _, part := range strings.Split(key, ".") {
		name, idxs, ok := splitIndexes(part)
		if !ok {
			return pos
		}
		var occ []valueRef
		var firstKey Pos
		for _, c := range cands {
			if c.kind != objectNode {
				continue
			}
			for _, e := range c.entries {
				if !strings.EqualFold(e.key, name) {
					continue
				}
				if len(occ) == 0 {
					firstKey = e.keyPos
				}
				occ = appendFlat(occ, valueRef{n: e.val, pos: e.keyPos})
			}
		}
		if len(occ) == 0 {
			return pos
		}
		if len(idxs) == 0 {
			// Repeated blocks are merged when decoded into one struct, so a
			// key inside may be in any of them.
			pos = firstKey
			cands = cands[:0:0]
			for _, o := range occ {
				cands = append(cands, o.n)
			}
			continue
		}
		if idxs[0] >= len(occ) {
			return firstKey
		}
		cur := occ[idxs[0]]
		for _, i := range idxs[1:] {
			if cur.n.kind != listNode || i >= len(cur.n.elems) {
				return cur.pos
			}
			cur = valueRef{n: cur.n.elems[i], pos: cur.n.elems[i].pos}
		}
		pos = cur.pos
		cands = []*node{cur.n}
	}
	return pos
}

// splitIndexes splits "entry[1][2]" into "entry" and [1 2].
func splitIndexes(part string) (name string, idxs []int, ok bool) {
	open := strings.IndexByte(part, '[')
	if open < 0 {
		return part, nil, part != ""
	}
	name, rest := part[:open], part[open:]
	for rest != "" {
		end := strings.IndexByte(rest, ']')
		if rest[0] != '[' || end < 0 {
			return "", nil, false
		}
		i, err := strconv.Atoi(rest[1:end])
		if err != nil || i < 0 {
			return "", nil, false
		}
		idxs = append(idxs, i)
		rest = rest[end+1:]
	}
	return name, idxs, name != ""
}

// valueRef is one value for a key with the position errors about it use:
// the key for a value written after it, the element for a list element.
type valueRef struct {
	n   *node
	pos Pos
}

// appendFlat appends v, or the elements of v if it is a list: `entry = [{
// }, { }]` and `entry { } entry { }` mean the same.
func appendFlat(dst []valueRef, v valueRef) []valueRef {
	if v.n.kind != listNode {
		return append(dst, v)
	}
	for _, e := range v.n.elems {
		dst = append(dst, valueRef{n: e, pos: e.pos})
	}
	return dst
}
