package docker

import (
	"bytes"
	"io/fs"
	"os"
	"slices"
	"strings"
	"testing"
)

// FuzzLocate checks that the locator never panics, that a container it
// finds has a well-formed ID that was in the file, with container cgroups
// that are prefixes of the file's paths, and that the order of the lines
// does not change the answer (the kernel's order of hierarchies is no
// contract).
func FuzzLocate(f *testing.F) {
	seeds, err := fs.Glob(os.DirFS("testdata/cgroup"), "*.txt")
	if err != nil {
		f.Fatal(err)
	}
	for _, name := range seeds {
		data, err := os.ReadFile("testdata/cgroup/" + name)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		m, found, err := locate(data, findContainer)
		switch {
		case err != nil:
			return
		case !found && m.id != "":
			t.Fatalf("not found, yet container %q", m.id)
		case !found:
			return
		}
		if len(m.id) != idLen || !isLowerHex(m.id) || !bytes.Contains(data, []byte(m.id)) {
			t.Fatalf("container ID %q: not 64 lowercase hex digits from the file", m.id)
		}
		for _, cg := range m.cgroups {
			if !strings.HasSuffix(cg.path, m.id) && !strings.HasSuffix(cg.path, m.id+".scope") {
				t.Fatalf("container cgroup %q does not end with the ID", cg.path)
			}
			if !bytes.Contains(data, []byte(cg.hierarchy+":"+cg.path)) {
				t.Fatalf("container cgroup %s:%s is not a prefix of a line", cg.hierarchy, cg.path)
			}
		}
		lines := bytes.Split(data, []byte("\n"))
		slices.Reverse(lines)
		r, rfound, rerr := locate(bytes.Join(lines, []byte("\n")), findContainer)
		if rerr != nil || !rfound || r.id != m.id {
			t.Fatalf("reversed lines: %q, %v, %v; want %q", r.id, rfound, rerr, m.id)
		}
	})
}
