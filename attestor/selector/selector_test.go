package selector

import (
	"strings"
	"testing"
)

func FuzzParseSelector(f *testing.F) {
	for _, seed := range []string{"unix:uid:1000", "k8s:pod-label:app:web", "docker:label:a=b", "uid", ":x", "x:", "", "unix:sha256:" + strings.Repeat("a", 64)} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, s string) {
		sel, err := Parse(s)
		if err != nil {
			if err.Error() == "" {
				t.Fatal("an error without a message")
			}
			return
		}
		if sel.Type == "" || sel.Value == "" || strings.Contains(sel.Type, ":") {
			t.Fatalf("Parse(%q) = %+v", s, sel)
		}
		if sel.String() != s {
			t.Fatalf("Parse(%q).String() = %q", s, sel.String())
		}
		if again, err := Parse(sel.String()); err != nil || again != sel {
			t.Fatalf("round trip of %q: %+v, %v", s, again, err)
		}
	})
}

func TestParse(t *testing.T) {
	for _, tc := range []struct {
		in, typ, value, err string
	}{
		{in: "unix:uid:1000", typ: "unix", value: "uid:1000"},
		{in: "k8s:pod-label:app:web", typ: "k8s", value: "pod-label:app:web"},
		{in: "uid", err: "has no type"},
		{in: ":1000", err: "empty type"},
		{in: "unix:", err: "empty value"},
		{in: "un ix:uid", err: "whitespace"},
		{in: "unix:" + strings.Repeat("x", maxSelectorLen), err: "limit"},
	} {
		sel, err := Parse(tc.in)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("Parse(%.20q): %v, want an error with %q", tc.in, err, tc.err)
			}
			continue
		}
		if err != nil || sel.Type != tc.typ || sel.Value != tc.value {
			t.Errorf("Parse(%q) = %+v, %v", tc.in, sel, err)
		}
	}
}

func TestSortDropsDuplicates(t *testing.T) {
	got := Sort([]Selector{{"unix", "uid:1"}, {"k8s", "ns:a"}, {"unix", "uid:1"}, {"unix", "gid:2"}})
	want := []Selector{{"k8s", "ns:a"}, {"unix", "gid:2"}, {"unix", "uid:1"}}
	if len(got) != len(want) {
		t.Fatalf("%v", got)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("%v, want %v", got, want)
		}
	}
}
