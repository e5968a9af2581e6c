package conf

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/hashicorp/hcl/hcl/ast"
	hclparser "github.com/hashicorp/hcl/hcl/parser"
	hclstrconv "github.com/hashicorp/hcl/hcl/strconv"
	"github.com/hashicorp/hcl/hcl/token"
)

// The hcl AST folds `a "b" { }` into one item with two keys, and its JSON
// parser flattens nested objects the same way. We rebuild a plain tree in
// which every object entry has one key, so `a "b" { x = 1 }`,
// `a { b { x = 1 } }` and their JSON forms all read alike.

type nodeKind int

const (
	objectNode nodeKind = iota
	listNode
	literalNode
)

type node struct {
	kind    nodeKind
	pos     Pos
	entries []*entry    // objectNode
	elems   []*node     // listNode
	tok     token.Token // literalNode
}

type entry struct {
	key     string
	keyPos  Pos // where this key is written
	itemPos Pos // where the statement that holds it starts (`Type "name" {` -> Type)
	val     *node
}

// parseTree parses HCL, or JSON when the first non-space character is '{'
// (as hcl.Parse decides), into a tree.
func parseTree(file string, data []byte) (*node, error) {
	if looksLikeJSON(data) {
		return parseJSON(file, data)
	}
	var f *ast.File
	var err error
	func() {
		// The hcl v1 parser panics on some malformed input; a config file
		// must never crash the agent, so turn that into an error.
		defer func() {
			if r := recover(); r != nil {
				f, err = nil, &Error{Pos: Pos{File: file, Line: 1, Column: 1}, Msg: fmt.Sprintf("syntax error: the HCL parser failed: %v", r)}
			}
		}()
		f, err = hclparser.Parse(data)
		if err != nil {
			err = syntaxError(file, err)
		}
	}()
	if err != nil {
		return nil, err
	}
	list, ok := f.Node.(*ast.ObjectList)
	if !ok {
		return nil, &Error{Pos: Pos{File: file, Line: 1, Column: 1}, Msg: "syntax error: the file is not a list of blocks and keys"}
	}
	c := converter{file: file}
	root := c.objectList(list, Pos{File: file, Line: 1, Column: 1})
	if e := c.errs.err(); e != nil {
		return nil, e
	}
	return root, nil
}

func looksLikeJSON(data []byte) bool {
	for len(data) > 0 {
		r, w := utf8.DecodeRune(data)
		if !unicode.IsSpace(r) {
			return r == '{'
		}
		data = data[w:]
	}
	return false
}

// parseJSON reads the JSON form of the config. hcl's own JSON parser drops
// positions, so we read it with encoding/json and keep them.
func parseJSON(file string, data []byte) (*node, error) {
	p := &jsonReader{file: file, data: data, dec: json.NewDecoder(bytes.NewReader(data)), lastLine: 1, lastCol: 1}
	p.dec.UseNumber()
	root, err := p.value()
	if err != nil {
		return nil, err
	}
	if root.kind != objectNode {
		return nil, &Error{Pos: root.pos, Msg: "syntax error: a JSON config must be one object"}
	}
	off := p.start()
	if _, err := p.dec.Token(); err != io.EOF {
		return nil, &Error{Pos: p.pos(off), Msg: "syntax error: unexpected data after the top-level object"}
	}
	return root, nil
}

type jsonReader struct {
	file string
	data []byte
	dec  *json.Decoder

	lastOff, lastLine, lastCol int // the last offset pos converted
}

// start returns the offset where the next token begins: the decoder's
// offset is the end of the previous token.
func (p *jsonReader) start() int {
	off := int(p.dec.InputOffset())
	for off < len(p.data) && strings.IndexByte(" \t\r\n,:", p.data[off]) >= 0 {
		off++
	}
	return off
}

// pos converts a byte offset to a position. Offsets mostly grow, so it
// counts on from the last one instead of from the start of the file.
func (p *jsonReader) pos(off int) Pos {
	off = min(max(off, 0), len(p.data))
	if off < p.lastOff {
		p.lastOff, p.lastLine, p.lastCol = 0, 1, 1
	}
	for _, r := range string(p.data[p.lastOff:off]) {
		if r == '\n' {
			p.lastLine, p.lastCol = p.lastLine+1, 1
		} else {
			p.lastCol++
		}
	}
	p.lastOff = off
	return Pos{File: p.file, Line: p.lastLine, Column: p.lastCol}
}

func (p *jsonReader) token() (json.Token, Pos, error) {
	off := p.start()
	tok, err := p.dec.Token()
	if err != nil {
		var se *json.SyntaxError
		if errors.As(err, &se) {
			off = int(se.Offset) // the decoder's offset is at the bad byte
		}
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return nil, p.pos(off), &Error{Pos: p.pos(off), Msg: "syntax error: " + err.Error()}
	}
	return tok, p.pos(off), nil
}

func (p *jsonReader) value() (*node, error) {
	tok, pos, err := p.token()
	if err != nil {
		return nil, err
	}
	return p.rest(tok, pos)
}

// rest builds the node that starts with tok.
func (p *jsonReader) rest(tok json.Token, pos Pos) (*node, error) {
	switch t := tok.(type) {
	case json.Delim:
		if t == '[' {
			n := &node{kind: listNode, pos: pos}
			for p.dec.More() {
				e, err := p.value()
				if err != nil {
					return nil, err
				}
				n.elems = append(n.elems, e)
			}
			_, _, err := p.token() // ]
			return n, err
		}
		n := &node{kind: objectNode, pos: pos}
		for p.dec.More() {
			k, kpos, err := p.token()
			if err != nil {
				return nil, err
			}
			key, _ := k.(string) // the decoder only returns string keys
			v, err := p.value()
			if err != nil {
				return nil, err
			}
			n.entries = append(n.entries, &entry{key: key, keyPos: kpos, itemPos: kpos, val: v})
		}
		_, _, err := p.token() // }
		return n, err
	case string:
		return &node{kind: literalNode, pos: pos, tok: token.Token{Type: token.STRING, Text: strconv.Quote(t), JSON: true}}, nil
	case json.Number:
		typ := token.NUMBER
		if strings.ContainsAny(string(t), ".eE") {
			typ = token.FLOAT
		}
		return &node{kind: literalNode, pos: pos, tok: token.Token{Type: typ, Text: string(t)}}, nil
	case bool:
		return &node{kind: literalNode, pos: pos, tok: token.Token{Type: token.BOOL, Text: strconv.FormatBool(t)}}, nil
	default: // null, which hcl reads as an empty string
		return &node{kind: literalNode, pos: pos, tok: token.Token{Type: token.STRING, Text: "", JSON: true}}, nil
	}
}

// syntaxError converts an hcl parser error into a positioned Error.
func syntaxError(file string, err error) error {
	var pe *hclparser.PosError
	if errors.As(err, &pe) {
		return &Error{Pos: tokPos(file, pe.Pos), Msg: "syntax error: " + pe.Err.Error()}
	}
	return &Error{Pos: Pos{File: file, Line: 1, Column: 1}, Msg: "syntax error: " + err.Error()}
}

func tokPos(file string, p token.Pos) Pos {
	line, col := p.Line, p.Column
	if line < 1 {
		line = 1
	}
	if col < 1 {
		col = 1
	}
	return Pos{File: file, Line: line, Column: col}
}

type converter struct {
	file string
	errs errList
}

func (c *converter) objectList(list *ast.ObjectList, pos Pos) *node {
	n := &node{kind: objectNode, pos: pos}
	if list == nil {
		return n
	}
	for _, item := range list.Items {
		if item == nil || len(item.Keys) == 0 {
			continue
		}
		keys := make([]string, len(item.Keys))
		poss := make([]Pos, len(item.Keys))
		ok := true
		for i, k := range item.Keys {
			poss[i] = tokPos(c.file, k.Token.Pos)
			s, err := keyString(k.Token)
			if err != nil {
				c.errs.add(poss[i], "", "bad key %s: %v", k.Token.Text, err)
				ok = false
				break
			}
			keys[i] = s
		}
		if !ok {
			continue
		}
		val := c.value(item.Val, poss[len(poss)-1])
		// `a "b" "c" = v` means a { b { c = v } }.
		for i := len(keys) - 1; i >= 1; i-- {
			val = &node{kind: objectNode, pos: poss[i], entries: []*entry{{key: keys[i], keyPos: poss[i], itemPos: poss[0], val: val}}}
		}
		n.entries = append(n.entries, &entry{key: keys[0], keyPos: poss[0], itemPos: poss[0], val: val})
	}
	return n
}

func (c *converter) value(v ast.Node, at Pos) *node {
	switch v := v.(type) {
	case *ast.ObjectType:
		return c.objectList(v.List, tokPos(c.file, v.Lbrace))
	case *ast.ListType:
		n := &node{kind: listNode, pos: tokPos(c.file, v.Lbrack)}
		for _, e := range v.List {
			n.elems = append(n.elems, c.value(e, n.pos))
		}
		return n
	case *ast.LiteralType:
		return &node{kind: literalNode, pos: tokPos(c.file, v.Token.Pos), tok: v.Token}
	default:
		// Not produced by the parsers; an empty object keeps the walk simple.
		return &node{kind: objectNode, pos: at}
	}
}

// keyString returns a key's text, unquoting string keys.
func keyString(t token.Token) (string, error) {
	if t.Type == token.STRING {
		return unquote(t)
	}
	return t.Text, nil
}

func unquote(t token.Token) (string, error) {
	if t.Text == "" { // JSON null
		return "", nil
	}
	if t.JSON {
		return strconv.Unquote(t.Text)
	}
	return hclstrconv.Unquote(t.Text)
}

// literalString returns the text of a string or heredoc literal.
func literalString(t token.Token) (s string, err error) {
	switch t.Type {
	case token.STRING:
		return unquote(t)
	case token.HEREDOC:
		// token.Value panics on malformed heredocs.
		defer func() {
			if r := recover(); r != nil {
				err = fmt.Errorf("malformed heredoc")
			}
		}()
		v, _ := t.Value().(string)
		return v, nil
	}
	return t.Text, nil
}

// describe names a value for type-mismatch messages.
func describe(n *node) string {
	switch n.kind {
	case objectNode:
		return "a block"
	case listNode:
		return "a list"
	}
	switch n.tok.Type {
	case token.STRING, token.HEREDOC:
		s, err := literalString(n.tok)
		if err != nil {
			return "a string"
		}
		if len(s) > 40 {
			s = s[:40] + "..."
		}
		return fmt.Sprintf("the string %q", s)
	case token.NUMBER, token.FLOAT:
		return "the number " + n.tok.Text
	case token.BOOL:
		return n.tok.Text
	}
	return n.tok.Text
}

// trimBOM drops a UTF-8 byte order mark, which some editors write and the
// hcl scanner rejects.
func trimBOM(data []byte) []byte {
	return bytes.TrimPrefix(data, []byte("\xef\xbb\xbf"))
}
