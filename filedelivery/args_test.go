package filedelivery

import (
	"encoding/csv"
	"reflect"
	"strings"
	"testing"
)

func TestSplitArgs(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want []string
	}{
		{"", nil},
		{"a b c", []string{"a", "b", "c"}},
		{`-c "SELECT 1;"`, []string{"-c", "SELECT 1;"}},
		{`"a ""quoted"" word" b`, []string{`a "quoted" word`, "b"}},
		{`""`, []string{""}},
		{"  a   b  ", []string{"a", "b"}},
		{`--name="a b"`, []string{"--name=a b"}},
		{"$HOME *", []string{"$HOME", "*"}},
		{`a\ b`, []string{`a\`, "b"}},
	} {
		got, err := SplitArgs(tc.in)
		if err != nil || !reflect.DeepEqual(got, tc.want) {
			t.Errorf("SplitArgs(%q) = %q, %v; want %q", tc.in, got, err, tc.want)
		}
	}
	if _, err := SplitArgs(`a "b`); err == nil {
		t.Error(`SplitArgs("a \"b") did not fail`)
	}
}

// FuzzSplitArgs checks the splitter against spiffe-helper's own parser (a
// CSV record with a space for the comma) on every input that parser
// accepts without an empty field and without the separators where the
// two differ on purpose (tabs, newlines, runs of spaces).
func FuzzSplitArgs(f *testing.F) {
	for _, s := range []string{"a b", `-c "SELECT 1;"`, `"a ""b"" c" d`, `""`, `x "y`, "a\tb", `a"b`} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		got, err := SplitArgs(s)
		if err == nil {
			rejoined := make([]string, len(got))
			for i, a := range got {
				rejoined[i] = `"` + strings.ReplaceAll(a, `"`, `""`) + `"`
			}
			again, err := SplitArgs(strings.Join(rejoined, " "))
			if err != nil || !reflect.DeepEqual(again, got) && len(got) > 0 {
				t.Fatalf("quoting %q and splitting again gave %q, %v", got, again, err)
			}
		}
		if strings.ContainsAny(s, "\t\r\n") || strings.Contains(s, "  ") || s == "" {
			return
		}
		r := csv.NewReader(strings.NewReader(s))
		r.Comma = ' '
		want, cerr := r.Read()
		if cerr != nil {
			return
		}
		for _, w := range want {
			if w == "" {
				return
			}
		}
		if err != nil || !reflect.DeepEqual(got, want) {
			t.Fatalf("SplitArgs(%q) = %q, %v; spiffe-helper splits it into %q", s, got, err, want)
		}
	})
}
