package k8s

import (
	"bytes"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// FuzzParseCgroups checks that podFromCgroups never panics, that what it
// finds is well formed and was in the file, and that the order of the lines
// does not matter (the kernel's order of hierarchies is no contract).
func FuzzParseCgroups(f *testing.F) {
	files, err := filepath.Glob(filepath.Join("testdata", "cgroup", "*.txt"))
	if err != nil {
		f.Fatal(err)
	}
	for _, path := range files {
		data, err := os.ReadFile(path)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data)
	}
	f.Add([]byte("0::/kubepods-besteffort-pod72f7f152_440c_66ac_9084_e0fc1d8a910c.slice:cri-containerd:b2a102854b4969b2ce98dc329c86b4fb2b06e4ad2cc8da9d8a7578c9cd2004a2\n"))
	f.Add([]byte("0::/../../crio-9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961.scope/container\n"))

	f.Fuzz(func(t *testing.T, data []byte) {
		podUID, containerID, found, err := podFromCgroups(data)
		if err != nil || !found {
			if podUID != "" || containerID != "" || (err != nil && found) {
				t.Fatalf("podFromCgroups = %q, %q, %v, %v: a result with no pod found", podUID, containerID, found, err)
			}
		} else {
			if len(containerID) != containerIDLen || !isLowerHex([]byte(containerID)) {
				t.Fatalf("container ID %q is not 64 lowercase hex digits", containerID)
			}
			if !bytes.Contains(data, []byte(containerID)) {
				t.Fatalf("container ID %q is not in the file", containerID)
			}
			if podUID != "" {
				if !wellFormedPodUID(podUID) {
					t.Fatalf("pod UID %q is not a dashed lowercase UUID or 32 hex digits", podUID)
				}
				if !bytes.Contains(data, []byte("pod"+podUID)) && !bytes.Contains(data, []byte("pod"+strings.ReplaceAll(podUID, "-", "_"))) {
					t.Fatalf("pod UID %q is not in the file", podUID)
				}
			}
		}

		lines := bytes.Split(data, []byte("\n"))
		slices.Reverse(lines)
		rPodUID, rContainerID, rFound, rErr := podFromCgroups(bytes.Join(lines, []byte("\n")))
		if rPodUID != podUID || rContainerID != containerID || rFound != found || (rErr == nil) != (err == nil) {
			t.Fatalf("lines in reverse give %q, %q, %v, %v; in order %q, %q, %v, %v", rPodUID, rContainerID, rFound, rErr, podUID, containerID, found, err)
		}
	})
}

func wellFormedPodUID(s string) bool {
	switch len(s) {
	case staticUIDLen:
		return isLowerHex([]byte(s))
	case dashedUIDLen:
		for i := 0; i < len(s); i++ {
			isDash := i == 8 || i == 13 || i == 18 || i == 23
			if isDash != (s[i] == '-') || (!isDash && !isLowerHexByte(s[i])) {
				return false
			}
		}
		return true
	}
	return false
}
