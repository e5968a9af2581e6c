package procfs

import (
	"bytes"
	"fmt"
	"testing"
)

// statLine builds a /proc/<pid>/stat line whose field k is 1000+k.
func statLine(comm string) []byte {
	var b bytes.Buffer
	fmt.Fprintf(&b, "1001 (%s) S", comm)
	for k := 4; k <= 52; k++ {
		fmt.Fprintf(&b, " %d", 1000+k)
	}
	b.WriteByte('\n')
	return b.Bytes()
}

func TestParseStartTime(t *testing.T) {
	for _, comm := range []string{"sleep", "a b", "a) b", ") (", "x)", "(", "", "a\nb", "))) 1 2 3 (((", "a) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20"} {
		got, err := ParseStartTime(statLine(comm))
		if err != nil || got != 1022 {
			t.Errorf("comm %q: start time = %d, %v; want 1022", comm, got, err)
		}
	}
	line := statLine("a) b")
	field22 := bytes.Index(line, []byte(" 1022 ")) + 1
	for _, bad := range []struct {
		name string
		stat []byte
	}{
		{"empty", nil},
		{"no parens", []byte("1 sleep S 1 2 3")},
		{"cut before field 22", line[:field22-1]},
		{"cut inside field 22", line[:field22+2]},
		{"cut right after field 22", line[:field22+4]},
		{"not a number", bytes.Replace(line, []byte(" 1022 "), []byte(" x022 "), 1)},
		{"overflow", bytes.Replace(line, []byte(" 1022 "), []byte(" 99999999999999999999999 "), 1)},
	} {
		if got, err := ParseStartTime(bad.stat); err == nil {
			t.Errorf("%s: start time %d, want an error", bad.name, got)
		}
	}
	// The separator after field 22 may be the end of the line.
	short := append(line[:field22+4:field22+4], '\n')
	if got, err := ParseStartTime(short); err != nil || got != 1022 {
		t.Errorf("line ending at field 22: %d, %v", got, err)
	}
}
