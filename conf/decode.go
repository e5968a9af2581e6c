package conf

import (
	"fmt"
	"reflect"
	"strconv"
	"strings"

	"github.com/hashicorp/hcl/hcl/token"
)

// Why not hcl.DecodeObject: in hcl v1 (and v1.0.1-vault-7, the tag SPIRE
// uses for unusedKeyPositions) it stops at the first error, whose text has
// no key position for a bad number ("strconv.ParseInt: ...") and no
// "want ..., got ..." form; keeps the last of a key set twice; cannot decode
// unsigned integers, a single value into a list, or an embedded struct
// without ",squash"; and finds unknown keys only in structs that declare an
// unusedKeyPositions field, so every plugin struct, at every level, would
// need one. Its JSON parser also drops every position. Lanyard promises
// each of these to users and plugins (conf/section_test.go), so the walk
// below stays; hcl parses, and its ast gives the positions.

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
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		if tok.Type != token.NUMBER && !isString {
			d.errorf(n.pos, path, "want a whole number, got %s", describe(n))
			return
		}
		if err := setWhole(rv, strings.TrimSpace(text)); err != nil {
			d.errorf(n.pos, path, "want %s, got %s%s", wholeWant(rv.Kind()), describe(n), rangeHint(err))
			return
		}
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

// setWhole parses text into an integer field of any size or sign; the
// field keeps its value when text does not fit.
func setWhole(rv reflect.Value, text string) error {
	if rv.CanInt() {
		i, err := strconv.ParseInt(text, 0, rv.Type().Bits())
		if err == nil {
			rv.SetInt(i)
		}
		return err
	}
	u, err := strconv.ParseUint(text, 0, rv.Type().Bits())
	if err == nil {
		rv.SetUint(u)
	}
	return err
}

func wholeWant(k reflect.Kind) string {
	if k >= reflect.Uint && k <= reflect.Uint64 {
		return "a whole number of 0 or more"
	}
	return "a whole number"
}

func rangeHint(err error) string {
	if ne, ok := err.(*strconv.NumError); ok && ne.Err == strconv.ErrRange {
		return " (out of range)"
	}
	return ""
}
