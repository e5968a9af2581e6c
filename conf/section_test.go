package conf

import (
	"errors"
	"strings"
	"testing"
	"time"
)

// localConf has an UpstreamAuthority "local" whose second entry misspells
// spiffe_id; line and column numbers below refer to it.
const localConf = `agent {
  trust_domain = "example.org"
}
plugins {
  UpstreamAuthority "local" {
    plugin_data {
      x509_svid_ttl = "1h"
      entry {
        spiffe_id = "spiffe://example.org/a"
        selectors = ["unix:uid:1000", "unix:gid:1000"]
      }
      entry {
        spife_id = "spiffe://example.org/b"
        selectors = ["unix:uid:1001"]
      }
    }
  }
}
`

type testEntry struct {
	SPIFFEID  string   `hcl:"spiffe_id"`
	Selectors []string `hcl:"selectors"`
}

func localData(t *testing.T) *Section {
	t.Helper()
	cfg, err := Parse("local.conf", []byte(localConf))
	if err != nil {
		t.Fatal(err)
	}
	return cfg.Plugins[0].Data
}

func TestDecodeUnknownKeyInRepeatedBlock(t *testing.T) {
	var v struct {
		X509SVIDTTL string      `hcl:"x509_svid_ttl"`
		Entries     []testEntry `hcl:"entry"`
	}
	err := localData(t).Decode(&v)
	want := `local.conf:13:9: plugins.UpstreamAuthority "local".plugin_data.entry[1].spife_id: unknown key; did you mean "spiffe_id"? (known keys: spiffe_id, selectors)`
	if err == nil || err.Error() != want {
		t.Fatalf("Decode error:\n%v\nwant:\n%s", err, want)
	}
	// Decode still fills in what it could.
	if len(v.Entries) != 2 || v.Entries[0].SPIFFEID != "spiffe://example.org/a" || v.Entries[1].Selectors[0] != "unix:uid:1001" {
		t.Errorf("decoded %+v", v)
	}
}

func TestSectionErrorfPositions(t *testing.T) {
	s := localData(t)
	tests := []struct{ key, want string }{
		{"", `local.conf:6:5: plugins.UpstreamAuthority "local".plugin_data: m`},
		{"x509_svid_ttl", `local.conf:7:7: plugins.UpstreamAuthority "local".plugin_data.x509_svid_ttl: m`},
		{"entry", `local.conf:8:7: plugins.UpstreamAuthority "local".plugin_data.entry: m`},
		{"entry[1]", `local.conf:12:7: plugins.UpstreamAuthority "local".plugin_data.entry[1]: m`},
		{"entry[1].selectors", `local.conf:14:9: plugins.UpstreamAuthority "local".plugin_data.entry[1].selectors: m`},
		{"entry[0].selectors[1]", `local.conf:10:39: plugins.UpstreamAuthority "local".plugin_data.entry[0].selectors[1]: m`},
		{"entry.spiffe_id", `local.conf:9:9: plugins.UpstreamAuthority "local".plugin_data.entry.spiffe_id: m`},
		{"ENTRY[1].Selectors", `local.conf:14:9: plugins.UpstreamAuthority "local".plugin_data.ENTRY[1].Selectors: m`},
		// Keys not in the file fall back to the nearest one that is.
		{"entry[1].spiffe_id", `local.conf:12:7: plugins.UpstreamAuthority "local".plugin_data.entry[1].spiffe_id: m`},
		{"entry[5].selectors", `local.conf:8:7: plugins.UpstreamAuthority "local".plugin_data.entry[5].selectors: m`},
		{"jwt_svid_ttl", `local.conf:6:5: plugins.UpstreamAuthority "local".plugin_data.jwt_svid_ttl: m`},
		{"entry[x]", `local.conf:6:5: plugins.UpstreamAuthority "local".plugin_data.entry[x]: m`},
	}
	for _, tt := range tests {
		if got := s.Errorf(tt.key, "m").Error(); got != tt.want {
			t.Errorf("Errorf(%q):\n got %s\nwant %s", tt.key, got, tt.want)
		}
	}
	var e *Error
	if err := s.Errorf("entry[1]", "selector %q has no type", "x"); !errors.As(err, &e) || e.Pos.Line != 12 || e.Msg != `selector "x" has no type` {
		t.Errorf("Errorf = %#v", e)
	}
}

type common struct {
	Name string `hcl:"name"`
}

type nested struct {
	common
	Port    int               `hcl:"port"`
	Big     uint64            `hcl:"big"`
	Ratio   float64           `hcl:"ratio"`
	On      bool              `hcl:"on"`
	Labels  map[string]string `hcl:"labels"`
	Limits  *limits           `hcl:"limits"`
	Absent  *limits           `hcl:"absent"`
	Hosts   []string          `hcl:"hosts"`
	Entries []struct {
		ID    string `hcl:"id"`
		Rules []struct {
			Match string   `hcl:"match"`
			Tags  []string `hcl:"tags"`
		} `hcl:"rule"`
	} `hcl:"entry"`
	Untagged string
	Skipped  string `hcl:"-"`
}

type limits struct {
	Max int `hcl:"max"`
}

func TestDecodeNested(t *testing.T) {
	s, err := NewSection("n.conf", `
name = "svc"
port = "8443"
big = 18446744073709551615
ratio = 0.5
on = true
labels {
  app = "web"
  "app.kubernetes.io/part-of" = "shop"
}
limits { max = 3 }
hosts = "only-one"
entry {
  id = "a"
  rule { match = "x" }
  rule {
    match = "y"
    tags = ["t1", "t2"]
  }
}
entry {
  id = "b"
}
entry = [{ id = "c" }]
untagged = "u"
`)
	if err != nil {
		t.Fatal(err)
	}
	if s.Empty() {
		t.Fatal("Empty on a full section")
	}
	var v nested
	if err := s.Decode(&v); err != nil {
		t.Fatal(err)
	}
	if v.Name != "svc" || v.Port != 8443 || v.Big != 1<<64-1 || v.Ratio != 0.5 || !v.On || v.Untagged != "u" {
		t.Errorf("scalars: %+v", v)
	}
	if len(v.Labels) != 2 || v.Labels["app"] != "web" || v.Labels["app.kubernetes.io/part-of"] != "shop" {
		t.Errorf("labels: %v", v.Labels)
	}
	if v.Limits == nil || v.Limits.Max != 3 || v.Absent != nil {
		t.Errorf("pointers: %+v %+v", v.Limits, v.Absent)
	}
	if len(v.Hosts) != 1 || v.Hosts[0] != "only-one" {
		t.Errorf("hosts: %v", v.Hosts)
	}
	if len(v.Entries) != 3 || v.Entries[0].ID != "a" || v.Entries[1].ID != "b" || v.Entries[2].ID != "c" {
		t.Fatalf("entries: %+v", v.Entries)
	}
	r := v.Entries[0].Rules
	if len(r) != 2 || r[0].Match != "x" || r[1].Match != "y" || strings.Join(r[1].Tags, ",") != "t1,t2" || len(v.Entries[1].Rules) != 0 {
		t.Errorf("rules: %+v", r)
	}
	if got := s.Errorf("entry[0].rule[1].tags[1]", "m").Error(); got != "n.conf:18:19: entry[0].rule[1].tags[1]: m" {
		t.Errorf("Errorf = %s", got)
	}
	if got := s.Errorf("entry[2].id", "m").Error(); got != "n.conf:24:12: entry[2].id: m" {
		t.Errorf("Errorf = %s", got)
	}
}

func TestDecodeErrors(t *testing.T) {
	tests := []struct {
		name, text string
		want       []string
	}{
		{"unknown nested", "entry {\n  id = \"a\"\n  rule { mtach = \"x\" }\n}", []string{`t.conf:3:10: entry[0].rule[0].mtach: unknown key; did you mean "match"? (known keys: match, tags)`}},
		{"string for int", `port = "http"`, []string{`t.conf:1:8: port: want a whole number, got the string "http"`}},
		{"float for int", `port = 1.5`, []string{`t.conf:1:8: port: want a whole number, got the number 1.5`}},
		{"int overflow", `port = 99999999999999999999`, []string{`t.conf:1:8: port: want a whole number, got the number 99999999999999999999 (out of range)`}},
		{"negative uint", `big = -1`, []string{`t.conf:1:7: big: want a whole number of 0 or more, got the number -1`}},
		{"bool for string", `name = true`, []string{`t.conf:1:8: name: want a string, got true: put it in quotes`}},
		{"list for bool", `on = [true]`, []string{`t.conf:1:6: on: want true or false, got a list`}},
		{"block for list of strings", "hosts {\n}", []string{`t.conf:1:7: hosts[0]: want a string, got a block`}},
		{"scalar for block", `limits = 3`, []string{`t.conf:1:10: limits: want a block like limits { ... }, got the number 3`}},
		{"scalar for map", `labels = "x"`, []string{`t.conf:1:10: labels: want a block like labels { ... }, got the string "x"`}},
		{"map value type", "labels {\n  a = [\"x\"]\n}", []string{`t.conf:2:7: labels.a: want a string, got a list`}},
		{"twice", "port = 1\nport = 2", []string{`t.conf:2:1: port: set more than once (first at t.conf:1:1)`}},
		{"skipped field is unknown", `skipped = "x"`, []string{`t.conf:1:1: skipped: unknown key`}},
		{"several", "port = \"x\"\nnmae = \"y\"\nentry { idd = 1 }", []string{
			`t.conf:1:8: port: want a whole number`,
			`t.conf:2:1: nmae: unknown key; did you mean "name"?`,
			`t.conf:3:9: entry[0].idd: unknown key; did you mean "id"?`,
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, err := NewSection("t.conf", tt.text)
			if err != nil {
				t.Fatal(err)
			}
			var v nested
			err = s.Decode(&v)
			if err == nil {
				t.Fatalf("no error; decoded %+v", v)
			}
			var errs Errors
			if !errors.As(err, &errs) || len(errs) != len(tt.want) {
				t.Fatalf("want %d errors, got %v", len(tt.want), err)
			}
			for i, w := range tt.want {
				if !strings.HasPrefix(errs[i].Error(), w) {
					t.Errorf("error %d:\n got %s\nwant %s...", i, errs[i], w)
				}
			}
		})
	}
}

func TestDecodeBadTarget(t *testing.T) {
	s, err := NewSection("t.conf", `a = 1`)
	if err != nil {
		t.Fatal(err)
	}
	var v nested
	for _, target := range []any{nil, v, &v.Port, (*nested)(nil)} {
		if err := s.Decode(target); err == nil || !strings.Contains(err.Error(), "Decode needs a non-nil pointer to a struct") {
			t.Errorf("Decode(%T) = %v", target, err)
		}
	}
	var ch struct {
		A chan int `hcl:"a"`
	}
	if err := s.Decode(&ch); err == nil || !strings.Contains(err.Error(), "t.conf:1:1: a: cannot decode into Go type chan int") {
		t.Errorf("Decode(chan) = %v", err)
	}
}

func TestSectionDuration(t *testing.T) {
	s, err := NewSection("d.conf", "ttl = \"1h\"\nbad = \"1 hour\"\nzero = \"0s\"\nneg = \"-5m\"")
	if err != nil {
		t.Fatal(err)
	}
	if d, err := s.Duration("ttl", "1h"); err != nil || d != time.Hour {
		t.Errorf("Duration(1h) = %v, %v", d, err)
	}
	if d, err := s.Duration("ttl", "90s"); err != nil || d != 90*time.Second {
		t.Errorf("Duration(90s) = %v, %v", d, err)
	}
	tests := []struct{ key, value, want string }{
		{"bad", "1 hour", `d.conf:2:1: bad: bad duration "1 hour": write it like "1h" or "90s"`},
		{"bad", "3600", `d.conf:2:1: bad: bad duration "3600": write it like "1h" or "90s"`},
		{"zero", "0s", `d.conf:3:1: zero: bad duration "0s": it must be more than zero, like "1h" or "90s"`},
		{"neg", "-5m", `d.conf:4:1: neg: bad duration "-5m": it must be more than zero`},
	}
	for _, tt := range tests {
		_, err := s.Duration(tt.key, tt.value)
		if err == nil || !strings.HasPrefix(err.Error(), tt.want) {
			t.Errorf("Duration(%q, %q) = %v, want %s", tt.key, tt.value, err, tt.want)
		}
	}
}

func TestNewSection(t *testing.T) {
	if s, err := NewSection("", ""); err != nil || !s.Empty() {
		t.Errorf("NewSection with no text: %v", err)
	}
	s, err := NewSection("e.conf", "  # nothing here\n")
	if err != nil || !s.Empty() {
		t.Errorf("comment-only section: %v, empty=%v", err, s.Empty())
	}
	var v struct{}
	if err := s.Decode(&v); err != nil {
		t.Errorf("Decode of empty section: %v", err)
	}
	if got := s.Errorf("", "m").Error(); got != "e.conf:1:1: m" {
		t.Errorf("Errorf on root = %q", got)
	}
	if _, err := NewSection("e.conf", "a = {"); err == nil || !strings.HasPrefix(err.Error(), "e.conf:1:") {
		t.Errorf("syntax error = %v", err)
	}
	var nilSection *Section
	if !nilSection.Empty() || nilSection.Decode(&v) != nil {
		t.Error("nil section is not empty")
	}
}

func TestSuggest(t *testing.T) {
	known := []string{"spiffe_id", "selectors", "ttl"}
	tests := map[string]string{
		"spife_id":  "spiffe_id",
		"SPIFFE_ID": "spiffe_id",
		"selector":  "selectors",
		"tl":        "ttl",
		"x":         "",
		"hostname":  "",
	}
	for in, want := range tests {
		if got := suggest(in, known); got != want {
			t.Errorf("suggest(%q) = %q, want %q", in, got, want)
		}
	}
	// Equally close keys give no suggestion.
	if got := suggest("ab", []string{"ac", "ad"}); got != "" {
		t.Errorf("tie: %q", got)
	}
}
