package conf

import (
	"fmt"
	"reflect"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/hcl/hcl/token"
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

// rawValues, as a field type, captures a key's values undecoded; the
// built-in blocks use it for sub-blocks with their own rules (plugins).
type rawValues []valueRef

var rawValuesType = reflect.TypeFor[rawValues]()

type decoder struct {
	s    *Section
	errs errList
}

func join(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

type field struct {
	name  string
	index []int
}

// structFields lists the keys of a struct type in declaration order;
// untagged embedded structs contribute their fields.
func structFields(t reflect.Type, index []int, out []field) []field {
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		tag, _, _ := strings.Cut(f.Tag.Get("hcl"), ",")
		if tag == "-" {
			continue
		}
		idx := append(append([]int(nil), index...), i)
		// As in encoding/json, an embedded struct's exported fields are
		// settable even when its type is unexported.
		if f.Anonymous && tag == "" && f.Type.Kind() == reflect.Struct {
			out = structFields(f.Type, idx, out)
			continue
		}
		if !f.IsExported() {
			continue
		}
		if tag == "" {
			tag = f.Name
		}
		out = append(out, field{name: tag, index: idx})
	}
	return out
}

func (d *decoder) errorf(pos Pos, path, format string, args ...any) {
	d.errs.add(pos, d.s.fullKey(path), format, args...)
}

func (d *decoder) decodeStruct(path string, objs []valueRef, rv reflect.Value) {
	fields := structFields(rv.Type(), nil, nil)
	known := make([]string, len(fields))
	for i, f := range fields {
		known[i] = f.name
	}
	groups := make([][]valueRef, len(fields))
	for _, o := range objs {
		for _, e := range o.n.entries {
			i := matchField(fields, e.key)
			if i < 0 {
				d.unknown(path, e, known)
				continue
			}
			groups[i] = append(groups[i], valueRef{n: e.val, pos: e.keyPos})
		}
	}
	for i, f := range fields {
		if len(groups[i]) > 0 {
			d.decodeValues(join(path, f.name), groups[i], rv.FieldByIndex(f.index))
		}
	}
}

func matchField(fields []field, key string) int {
	for i, f := range fields {
		if f.name == key {
			return i
		}
	}
	for i, f := range fields {
		if strings.EqualFold(f.name, key) {
			return i
		}
	}
	return -1
}

func (d *decoder) unknown(path string, e *entry, known []string) {
	key := join(path, e.key)
	if msg, ok := d.s.refuse[strings.ToLower(path)][strings.ToLower(e.key)]; ok {
		d.errorf(e.keyPos, key, "%s", msg)
		return
	}
	d.errorf(e.keyPos, key, "%s", unknownKeyMsg(e.key, known))
}

// decodeValues decodes all the values written for one key into rv.
func (d *decoder) decodeValues(path string, vals []valueRef, rv reflect.Value) {
	if rv.Type() == rawValuesType {
		rv.Set(reflect.AppendSlice(rv, reflect.ValueOf(rawValues(vals))))
		return
	}
	switch rv.Kind() {
	case reflect.Pointer:
		if rv.IsNil() {
			rv.Set(reflect.New(rv.Type().Elem()))
		}
		d.decodeValues(path, vals, rv.Elem())
	case reflect.Slice:
		var items []valueRef
		for _, v := range vals {
			items = appendFlat(items, v)
		}
		out := reflect.MakeSlice(rv.Type(), 0, len(items))
		for i, it := range items {
			elem := reflect.New(rv.Type().Elem()).Elem()
			d.decodeValues(fmt.Sprintf("%s[%d]", path, i), []valueRef{it}, elem)
			out = reflect.Append(out, elem)
		}
		rv.Set(out)
	case reflect.Struct, reflect.Map:
		var objs []valueRef
		for _, v := range vals {
			for _, it := range appendFlat(nil, v) {
				if it.n.kind != objectNode {
					d.errorf(it.n.pos, path, "want a block like %s { ... }, got %s", lastKey(path), describe(it.n))
					continue
				}
				objs = append(objs, it)
			}
		}
		if rv.Kind() == reflect.Struct {
			d.decodeStruct(path, objs, rv)
		} else {
			d.decodeMap(path, objs, rv)
		}
	case reflect.String, reflect.Bool, reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64, reflect.Float32, reflect.Float64:
		if len(vals) > 1 {
			d.errorf(vals[1].pos, path, "set more than once (first at %s); keep one", vals[0].pos)
			return
		}
		d.decodeScalar(path, vals[0].n, rv)
	default:
		d.errorf(vals[0].pos, path, "cannot decode into Go type %s (this is a bug in the caller)", rv.Type())
	}
}

func lastKey(path string) string {
	if i := strings.LastIndexByte(path, '.'); i >= 0 {
		path = path[i+1:]
	}
	if i := strings.IndexByte(path, '['); i >= 0 {
		path = path[:i]
	}
	return path
}

func (d *decoder) decodeMap(path string, objs []valueRef, rv reflect.Value) {
	t := rv.Type()
	if t.Key().Kind() != reflect.String {
		d.errorf(d.s.pos, path, "cannot decode into Go type %s: map keys must be strings (this is a bug in the caller)", t)
		return
	}
	if rv.IsNil() {
		rv.Set(reflect.MakeMap(t))
	}
	var order []string
	groups := map[string][]valueRef{}
	for _, o := range objs {
		for _, e := range o.n.entries {
			if _, seen := groups[e.key]; !seen {
				order = append(order, e.key)
			}
			groups[e.key] = append(groups[e.key], valueRef{n: e.val, pos: e.keyPos})
		}
	}
	for _, k := range order {
		elem := reflect.New(t.Elem()).Elem()
		d.decodeValues(join(path, k), groups[k], elem)
		rv.SetMapIndex(reflect.ValueOf(k).Convert(t.Key()), elem)
	}
}

func (d *decoder) decodeScalar(path string, n *node, rv reflect.Value) {
	kind := rv.Kind()
	want := map[reflect.Kind]string{reflect.String: "a string", reflect.Bool: "true or false",
		reflect.Float32: "a number", reflect.Float64: "a number"}[kind]
	if want == "" {
		want = "a whole number"
	}
	if n.kind != literalNode {
		d.errorf(n.pos, path, "want %s, got %s", want, describe(n))
		return
	}
	tok := n.tok
	text := tok.Text
	isString := tok.Type == token.STRING || tok.Type == token.HEREDOC
	if isString {
		s, err := literalString(tok)
		if err != nil {
			d.errorf(n.pos, path, "bad string: %v", err)
			return
		}
		text = s
	}
	switch kind {
	case reflect.String:
		if tok.Type == token.BOOL {
			d.errorf(n.pos, path, "want a string, got %s: put it in quotes", text)
			return
		}
		rv.SetString(text)
	case reflect.Bool:
		if tok.Type != token.BOOL {
			hint := ""
			if isString && (text == "true" || text == "false") {
				hint = ": drop the quotes"
			}
			d.errorf(n.pos, path, "want true or false, got %s%s", describe(n), hint)
			return
		}
		rv.SetBool(text == "true")
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		if tok.Type != token.NUMBER && !isString {
			d.errorf(n.pos, path, "want a whole number, got %s", describe(n))
			return
		}
		i, err := strconv.ParseInt(strings.TrimSpace(text), 0, rv.Type().Bits())
		if err != nil {
			d.errorf(n.pos, path, "want a whole number, got %s%s", describe(n), rangeHint(err))
			return
		}
		rv.SetInt(i)
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		if tok.Type != token.NUMBER && !isString {
			d.errorf(n.pos, path, "want a whole number, got %s", describe(n))
			return
		}
		u, err := strconv.ParseUint(strings.TrimSpace(text), 0, rv.Type().Bits())
		if err != nil {
			d.errorf(n.pos, path, "want a whole number of 0 or more, got %s%s", describe(n), rangeHint(err))
			return
		}
		rv.SetUint(u)
	case reflect.Float32, reflect.Float64:
		if tok.Type != token.NUMBER && tok.Type != token.FLOAT && !isString {
			d.errorf(n.pos, path, "want a number, got %s", describe(n))
			return
		}
		f, err := strconv.ParseFloat(strings.TrimSpace(text), rv.Type().Bits())
		if err != nil {
			d.errorf(n.pos, path, "want a number, got %s%s", describe(n), rangeHint(err))
			return
		}
		rv.SetFloat(f)
	}
}

func rangeHint(err error) string {
	if ne, ok := err.(*strconv.NumError); ok && ne.Err == strconv.ErrRange {
		return " (out of range)"
	}
	return ""
}
