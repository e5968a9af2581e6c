package k8s

import (
	"bytes"
	"strings"
)

// podFromCgroups is a stand-in until the cgroup parser lands from branch
// k8s-cgroup (this file is deleted then). It knows only the cgroupfs
// layout the unit tests write: .../pod<uid>/<64-hex container id>.
func podFromCgroups(data []byte) (podUID, containerID string, found bool, err error) {
	for _, line := range bytes.Split(data, []byte{'\n'}) {
		parts := strings.SplitN(string(line), ":", 3)
		if len(parts) != 3 {
			continue
		}
		segs := strings.Split(parts[2], "/")
		for i := 0; i+1 < len(segs); i++ {
			if uid, ok := strings.CutPrefix(segs[i], "pod"); ok && len(segs[i+1]) == 64 {
				return uid, segs[i+1], true, nil
			}
		}
	}
	return "", "", false, nil
}
