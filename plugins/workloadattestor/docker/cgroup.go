package docker

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
)

// maxCgroupFileSize bounds /proc/<pid>/cgroup. Real files are 0.1-2.5 KiB
// (one line a hierarchy); a longer one is refused rather than judged
// truncated.
const maxCgroupFileSize = 64 << 10

// membership is where a process's cgroups put it: a container's ID, and in
// each hierarchy that names it, the container's own cgroup (the path up to
// and including the segment that holds the ID).
type membership struct {
	id      string
	cgroups []containerCgroup
}

type containerCgroup struct {
	hierarchy string // "<hierarchy-ID>:<controllers>", the line's first two fields
	path      string
}

// findFunc finds a container in one cgroup path.
type findFunc func(path string) (id, prefix string, found bool)

// locate finds the container of a process from its /proc/<pid>/cgroup.
// Every line that names a container must name the same one (as SPIRE);
// lines that name none are ignored (a v1 hierarchy the engine does not
// use). found is false for a process in no container.
func locate(data []byte, find findFunc) (m membership, found bool, err error) {
	if len(data) > maxCgroupFileSize {
		return membership{}, false, fmt.Errorf("the cgroup file is larger than %d bytes", maxCgroupFileSize)
	}
	for len(data) > 0 {
		var line []byte
		line, data, _ = bytes.Cut(data, []byte{'\n'})
		if len(line) == 0 {
			continue
		}
		hierarchy, path, ok := splitCgroupLine(string(line))
		if !ok {
			return membership{}, false, fmt.Errorf("malformed cgroup line %q", line)
		}
		id, prefix, ok := find(path)
		if !ok {
			continue
		}
		switch {
		case !validContainerRef(id):
			// Only a legacy pattern can capture one; it would go into the
			// inspect URL's path.
			return membership{}, false, fmt.Errorf("a container_id_cgroup_matchers pattern matched %q but captured %q, which is no container ID or name", path, id)
		case m.id != "" && id != m.id:
			return membership{}, false, fmt.Errorf("the cgroups name two containers, %s and %s: refusing to choose one", m.id, id)
		}
		m.id = id
		m.cgroups = append(m.cgroups, containerCgroup{hierarchy: hierarchy, path: prefix})
	}
	return m, m.id != "", nil
}

// splitCgroupLine splits "hierarchy-ID:controllers:path"; the path may
// hold colons.
func splitCgroupLine(line string) (hierarchy, path string, ok bool) {
	i := strings.IndexByte(line, ':')
	if i < 0 {
		return "", "", false
	}
	j := strings.IndexByte(line[i+1:], ':')
	if j < 0 {
		return "", "", false
	}
	hierarchy, path = line[:i+1+j], line[i+2+j:]
	return hierarchy, path, strings.HasPrefix(path, "/")
}

// findContainer is the new container locator: the outermost path segment
// that holds a container ID, which is 64 lowercase hex digits, alone or
// after a runtime's prefix and "-" or ":", with an optional ".scope":
// /docker/<id>, /system.slice/docker-<id>.scope, /libpod_parent/libpod-<id>,
// kubepods-...slice:cri-containerd:<id>. A segment of a container
// monitor (Podman's and CRI-O's conmon: libpod-conmon-<id>.scope) means no
// container: the monitor runs outside the one it watches.
//
// SPIRE walks from the innermost segment instead, which lets a process that
// can create cgroups inside its own container (a privileged one, or one
// with a delegated cgroup namespace) name a sub-cgroup after another
// container and move into it; outermost, it still finds its own.
func findContainer(path string) (id, prefix string, found bool) {
	rest := path
	for rest != "" {
		seg, after, slash := strings.Cut(rest, "/")
		id, monitor := containerSegment(seg)
		switch {
		case monitor:
			return "", "", false
		case id != "":
			end := len(path) - len(after)
			if slash {
				end-- // the "/" after the segment
			}
			return id, path[:end], true
		}
		rest = after
	}
	return "", "", false
}

const idLen = 64

// validContainerRef accepts what an engine accepts as a container's ID or
// name ([a-zA-Z0-9][a-zA-Z0-9_.-]*).
func validContainerRef(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || i > 0 && (c == '_' || c == '.' || c == '-')) {
			return false
		}
	}
	return s != ""
}

func containerSegment(seg string) (id string, monitor bool) {
	s := strings.TrimSuffix(seg, ".scope")
	if len(s) < idLen || !isLowerHex(s[len(s)-idLen:]) {
		return "", false
	}
	id, runtime := s[len(s)-idLen:], s[:len(s)-idLen]
	if runtime == "" {
		return id, false
	}
	if last := runtime[len(runtime)-1]; last != '-' && last != ':' {
		return "", false
	}
	if strings.HasSuffix(runtime, "conmon-") {
		return "", true
	}
	return id, false
}

func isLowerHex(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

// errOutsideContainer: the container's own first process is not in the
// cgroups the caller's name after it.
var errOutsideContainer = errors.New("the caller's cgroups name the container, but the container's own process is not in them")

// checkSameContainer checks that the container's first process (the
// engine's State.Pid), read from initData, is in the container cgroups m
// found for the caller: the engine's own record of where the container
// lives. A cgroup named after a container is not proof of being in it:
// systemd delegates user@<uid>.service to its user, who can create
// .../docker-<id>.scope there for any ID (IDs are readable in every
// /proc/<pid>/cgroup). The first process may sit below the container's
// cgroup (a systemd inside, crun's "container" subgroup).
func checkSameContainer(initData []byte, m membership) error {
	if len(initData) > maxCgroupFileSize {
		return fmt.Errorf("the container's first process's cgroup file is larger than %d bytes", maxCgroupFileSize)
	}
	for _, cg := range m.cgroups {
		found := false
		for line := range strings.Lines(string(initData)) {
			hierarchy, path, ok := splitCgroupLine(strings.TrimSuffix(line, "\n"))
			if ok && hierarchy == cg.hierarchy {
				found = path == cg.path || strings.HasPrefix(path, cg.path+"/")
				break
			}
		}
		if !found {
			return fmt.Errorf("%w: the caller's cgroup %s is not where the engine runs the container", errOutsideContainer, cg.path)
		}
	}
	return nil
}
