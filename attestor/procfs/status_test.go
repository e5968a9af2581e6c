package procfs

import (
	"bytes"
	"os"
	"strings"
	"testing"
)

// TestParseStatus: the parser both readers of /proc/<pid>/status share.
// The stricter rules of each live beside its reader (parseEffectiveIDs in
// attestor, parseStatus in the unix attestor) with their own tests.
func TestParseStatus(t *testing.T) {
	full := "Name:\tx\\nUid:\t9\t9\nUid:\t1\t2\t3\t4\nGid:\t5\t6\t7\t8\nFDSize:\t64\nGroups:\t10 20 \nNStgid:\t1\n"
	st, complete, err := ParseStatus([]byte(full), UIDLine|GIDLine|GroupsLine)
	if err != nil || !complete {
		t.Fatalf("complete=%v err=%v", complete, err)
	}
	if st.UID != (IDs{Real: 1, Effective: 2, Count: 2}) || st.GID != (IDs{Real: 5, Effective: 6, Count: 2}) || string(st.Groups) != "10 20" {
		t.Errorf("parsed %+v (groups %q)", st, st.Groups)
	}
	// Only the lines asked for must be whole.
	cut := full[:strings.Index(full, "20")]
	if _, complete, err := ParseStatus([]byte(cut), UIDLine|GIDLine); !complete || err != nil {
		t.Errorf("Uid and Gid before a cut Groups line: complete=%v err=%v", complete, err)
	}
	if _, complete, _ := ParseStatus([]byte(cut), UIDLine|GIDLine|GroupsLine); complete {
		t.Error("a cut Groups line reported complete")
	}
	st, _, err = ParseStatus([]byte("Uid:\t7\nGid:\t9\n"), UIDLine|GIDLine)
	if err != nil || st.UID.Count != 1 || st.UID.EffectiveOrOnly() != 7 || st.GID.EffectiveOrOnly() != 9 {
		t.Errorf("single ids: %+v, %v", st, err)
	}
	for _, bad := range []string{"Uid:\t1\tx\t1\t1\n", "Gid:\t\n", "Uid:\t1\t99999999999\n", "Uid:\t1\t4294967296\n"} {
		if _, _, err := ParseStatus([]byte(bad), UIDLine|GIDLine); err == nil {
			t.Errorf("%q: no error", bad)
		}
	}
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatalf("reading our own status: %v", err)
	}
	st, complete, err = ParseStatus(b, UIDLine|GIDLine|GroupsLine)
	if err != nil || !complete || st.UID.Effective != uint32(os.Geteuid()) || st.GID.Effective != uint32(os.Getegid()) {
		t.Errorf("own status: %+v complete=%v err=%v", st, complete, err)
	}
}

func TestNSpidDepth(t *testing.T) {
	for _, c := range []struct {
		in    string
		depth int
		ok    bool
	}{
		{"Name:\tsh\nNStgid:\t14504\nNSpid:\t14504\nNSpgid:\t1\n", 0, true},
		{"Name:\tsh\nNSpid:\t14504\t7\t1\nNSpgid:\t1\n", 2, true},
		{"Name:\tsh\nNSpid:\t14504\t1", 1, true},
		{"Name:\tsh\nPid:\t14504\n", 0, false},
		{"Name:\tsh\nNSpid:\t\n", 0, false},
	} {
		if depth, ok := NSpidDepth([]byte(c.in)); depth != c.depth || ok != c.ok {
			t.Errorf("NSpidDepth(%q) = %d, %v; want %d, %v", c.in, depth, ok, c.depth, c.ok)
		}
	}
}

// NSpidDepth never panics, and a depth it reports comes from an NSpid line.
func FuzzNSpidDepth(f *testing.F) {
	f.Add([]byte("Name:\tsh\nNSpid:\t14504\t7\t1\nNSpgid:\t1\n"))
	f.Add([]byte("Name:\tx\\nNSpid:\t1\t2\nPid:\t3\n"))
	f.Add([]byte("\nNSpid:"))
	f.Fuzz(func(t *testing.T, b []byte) {
		depth, ok := NSpidDepth(b)
		if depth < 0 || (!ok && depth != 0) || (ok && !bytes.Contains(b, nspidPrefix)) {
			t.Fatalf("NSpidDepth(%q) = %d, %v", b, depth, ok)
		}
	})
}
