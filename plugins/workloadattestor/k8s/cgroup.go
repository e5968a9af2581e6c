package k8s

import (
	"bytes"
	"errors"
	"fmt"
)

// maxCgroupFileSize bounds /proc/<pid>/cgroup: the caller reads at most this
// many bytes plus one, and podFromCgroups refuses a longer file rather than
// judge a truncated one. Real files are small (a cgroup v1 kind node's 13
// lines are 2.5 KiB); 64 KiB holds 16 lines at the kernel's 4096-byte path
// limit.
const maxCgroupFileSize = 64 << 10

// The lengths of what the kubelet and the runtimes put in cgroup names.
const (
	containerIDLen = 64 // containerd, CRI-O and Docker: 32 random bytes in hex
	dashedUIDLen   = 36 // an API pod: a UUID, dashes or (systemd) underscores
	staticUIDLen   = 32 // a static pod: the md5 of its manifest in hex
)

// podFromCgroups finds the pod UID and container ID in the contents of
// /proc/<pid>/cgroup. found is false, with no error, for a process that is
// not in a pod. podUID is in the API's canonical form (dashes, as in
// pod.metadata.uid) ; containerID is the bare runtime ID (64 hex for
// containerd/CRI-O/Docker).
//
// podUID is empty, with found true, for a container of the agent's own pod:
// paths are relative to the agent's cgroup namespace, so such a container
// shows as "/../<id>", its pod above the namespace (SPIRE #2578, #4917). The
// caller then looks for the container ID in every pod, as SPIRE does.
//
// In each "hierarchy-ID:controllers:path" line the outermost pod decides:
// the first segment naming a pod ("pod<uid>", or "<parent>-pod<uid>.slice"
// with systemd) and the container segment right after it ("<id>",
// "<runtime>-<id>.scope", or the pod segment's ":<runtime>:<id>" tail).
// What comes before the pod (kind's /kubelet, /docker/<id>, QoS classes) is
// skipped; what comes after the container is the container's own, so a
// container that can make cgroups cannot claim a pod by naming one inside
// itself. Not found: no pod segment (a host process, a container outside
// Kubernetes), a pod with no container segment (the pod-level cgroup; the
// agent's own container, "0::/"), and CRI-O's conmon scope
// ("crio-conmon-<id>.scope", SPIRE #4088), which watches a container but is
// not one.
//
// Errors refuse the attestation: lines naming two pods or two containers
// (as SPIRE), a pod under a user's delegated tree (user.slice,
// user@<uid>.service: systemd lets the user name cgroups there after any
// pod and container, which /proc/<pid>/cgroup shows to everyone), a
// malformed line, or a file over maxCgroupFileSize. The kernel refuses '\n'
// in cgroup names, so no name can forge a line.
func podFromCgroups(data []byte) (podUID, containerID string, found bool, err error) {
	if len(data) > maxCgroupFileSize {
		return "", "", false, fmt.Errorf("the cgroup file is over %d bytes", maxCgroupFileSize)
	}
	var acc cgroupAccumulator
	for lineNo := 1; len(data) > 0; lineNo++ {
		var line []byte
		if i := bytes.IndexByte(data, '\n'); i >= 0 {
			line, data = data[:i], data[i+1:]
		} else {
			line, data = data, nil
		}
		if len(line) == 0 {
			continue
		}
		path, err := cgroupLinePath(line)
		if err != nil {
			return "", "", false, fmt.Errorf("cgroup line %d: %w", lineNo, err)
		}
		m, err := matchCgroupPath(path)
		if err != nil {
			return "", "", false, err
		}
		if err := acc.add(m); err != nil {
			return "", "", false, err
		}
	}
	if acc.containerID == nil {
		return "", "", false, nil
	}
	return acc.podUID.String(), string(acc.containerID), true, nil
}

// cgroupLinePath returns the path of a "hierarchy-ID:controllers:path" line.
// The path may hold colons (containerd's "<slice>:cri-containerd:<id>").
func cgroupLinePath(line []byte) ([]byte, error) {
	first := bytes.IndexByte(line, ':')
	if first < 1 || !isDigits(line[:first]) {
		return nil, errors.New("no hierarchy ID before the first colon")
	}
	second := bytes.IndexByte(line[first+1:], ':')
	if second < 0 {
		return nil, errors.New("fewer than two colons")
	}
	path := line[first+1+second+1:]
	if len(path) == 0 || path[0] != '/' {
		return nil, errors.New("the path does not start with /")
	}
	return path, nil
}

// cgroupMatch is what one line's path says. Its slices point into the file.
type cgroupMatch struct {
	podUID      canonicalUID // zero: the path shows no pod
	containerID []byte       // nil: the path shows no container of a pod
}

// maxSiblingDepth is how far above our cgroup namespace's root a container
// of our own pod can be: one level from a container's cgroup to its pod's,
// two when the runtime nests the payload in a subgroup (crun's
// "<scope>/container"). Higher up are QoS classes and the host's tree,
// whose containers are not in our pod.
const maxSiblingDepth = 2

// matchCgroupPath finds the outermost pod and its container in a path (see
// podFromCgroups).
func matchCgroupPath(path []byte) (cgroupMatch, error) {
	climbed := 0         // leading ".." segments: the path leaves our cgroup namespace
	named := false       // a segment other than ".." has been seen
	var delegated []byte // the first user-delegation segment seen, if any
	for rest := path; len(rest) > 0; {
		var seg []byte
		seg, rest = nextSegment(rest)
		if len(seg) == 0 {
			continue
		}
		if !named && string(seg) == ".." {
			climbed++
			continue
		}
		first := !named
		named = true
		if uid, tail, ok := podSegment(seg); ok {
			if delegated != nil {
				return cgroupMatch{}, fmt.Errorf("the pod cgroup %q is under %q, a user's delegated cgroup tree where any local user can name a cgroup after another pod: not attesting it as a pod", path, delegated)
			}
			m := cgroupMatch{podUID: uid}
			if tail != nil {
				m.containerID = colonContainerID(tail)
			} else if next, _ := nextNamedSegment(rest); next != nil {
				m.containerID = containerSegmentID(next)
			}
			return m, nil
		}
		if first && climbed > 0 && climbed <= maxSiblingDepth {
			// A container beside our own, in our pod, whose pod segment is
			// above what our cgroup namespace shows.
			if id := containerSegmentID(seg); id != nil {
				return cgroupMatch{containerID: id}, nil
			}
		}
		if delegated == nil && isUserDelegation(seg) {
			delegated = seg
		}
	}
	return cgroupMatch{}, nil
}

// nextSegment splits off the path's first segment after any leading slash.
func nextSegment(p []byte) (seg, rest []byte) {
	if len(p) > 0 && p[0] == '/' {
		p = p[1:]
	}
	if i := bytes.IndexByte(p, '/'); i >= 0 {
		return p[:i], p[i:]
	}
	return p, nil
}

// nextNamedSegment returns the first non-empty segment of p.
func nextNamedSegment(p []byte) (seg, rest []byte) {
	for len(p) > 0 {
		seg, p = nextSegment(p)
		if len(seg) > 0 {
			return seg, p
		}
	}
	return nil, nil
}

// isUserDelegation reports a segment of systemd's per-user tree, which the
// user's own manager (user@<uid>.service, Delegate=yes) may fill with
// cgroups of any name.
func isUserDelegation(seg []byte) bool {
	return string(seg) == "user.slice" ||
		(bytes.HasPrefix(seg, []byte("user@")) && bytes.HasSuffix(seg, []byte(".service")))
}

// podSegment recognizes a pod's cgroup: "pod<uid>" (cgroupfs driver) or
// "<parent>-pod<uid>.slice" (systemd driver, dashes escaped to underscores),
// the latter possibly followed by ":<runtime>:<id>" when a runtime named its
// container cgroup in runc's "slice:prefix:name" form (SPIRE #1580). tail is
// what follows the ".slice:", or nil.
func podSegment(seg []byte) (uid canonicalUID, tail []byte, ok bool) {
	if bytes.HasPrefix(seg, []byte("pod")) {
		if uid, ok = parsePodUID(seg[len("pod"):]); ok {
			return uid, nil, true
		}
	}
	const slice = ".slice"
	end := bytes.Index(seg, []byte(slice))
	if end < 0 {
		return canonicalUID{}, nil, false
	}
	switch after := seg[end+len(slice):]; {
	case len(after) == 0:
	case after[0] == ':':
		tail = after[1:]
	default:
		return canonicalUID{}, nil, false
	}
	name := seg[:end]
	for _, n := range [...]int{dashedUIDLen, staticUIDLen} {
		const marker = "-pod"
		start := len(name) - n - len(marker)
		// A non-empty parent name before the marker: "kubepods", the QoS
		// class, kind's "kubelet-kubepods".
		if start < 1 || string(name[start:start+len(marker)]) != marker {
			continue
		}
		if uid, ok = parsePodUID(name[start+len(marker):]); ok {
			return uid, tail, true
		}
	}
	return canonicalUID{}, nil, false
}

// containerSegmentID returns the container ID a container's cgroup is named
// after: "<id>" (cgroupfs driver) or "<runtime>-<id>[.scope]" (systemd
// driver, CRI-O's cgroupfs driver), or nil. A runtime prefix ending in
// "conmon" is CRI-O's or Podman's container monitor, not the container.
func containerSegmentID(seg []byte) []byte {
	seg = bytes.TrimSuffix(seg, []byte(".scope"))
	if len(seg) == containerIDLen {
		if isLowerHex(seg) {
			return seg
		}
		return nil
	}
	start := len(seg) - containerIDLen
	if start < 2 || seg[start-1] != '-' {
		return nil
	}
	return runtimeContainerID(seg[:start-1], seg[start:])
}

// colonContainerID returns the ID of a "<runtime>:<id>" tail, or nil.
func colonContainerID(tail []byte) []byte {
	start := len(tail) - containerIDLen
	if start < 2 || tail[start-1] != ':' {
		return nil
	}
	return runtimeContainerID(tail[:start-1], tail[start:])
}

func runtimeContainerID(runtime, id []byte) []byte {
	if !isLowerHex(id) || bytes.HasSuffix(runtime, []byte("conmon")) {
		return nil
	}
	return id
}

// canonicalUID is a pod UID as pod.metadata.uid spells it, built without
// allocating: a dashed UUID, or a static pod's 32 hex digits.
type canonicalUID struct {
	b [dashedUIDLen]byte
	n uint8
}

func (u canonicalUID) String() string { return string(u.b[:u.n]) }

// parsePodUID accepts the UIDs the kubelet names pod cgroups after: a UUID
// with dashes or, under systemd, underscores (all four the same), or 32 hex
// digits. Lowercase only, as the API server and the kubelet write them.
func parsePodUID(s []byte) (canonicalUID, bool) {
	var u canonicalUID
	switch len(s) {
	case staticUIDLen:
		if !isLowerHex(s) {
			return u, false
		}
	case dashedUIDLen:
		sep := s[8]
		if sep != '-' && sep != '_' {
			return u, false
		}
		for i, c := range s {
			switch i {
			case 8, 13, 18, 23:
				if c != sep {
					return u, false
				}
			default:
				if !isLowerHexByte(c) {
					return u, false
				}
			}
		}
	default:
		return u, false
	}
	u.n = uint8(copy(u.b[:], s))
	for i := range u.b[:u.n] {
		if u.b[i] == '_' {
			u.b[i] = '-'
		}
	}
	return u, true
}

// cgroupAccumulator joins the lines of one file, and refuses a file whose
// lines name different pods or containers.
type cgroupAccumulator struct {
	podUID      canonicalUID
	containerID []byte
}

func (a *cgroupAccumulator) add(m cgroupMatch) error {
	if m.podUID.n != 0 {
		if a.podUID.n != 0 && a.podUID != m.podUID {
			return fmt.Errorf("the cgroup lines name two pods, %s and %s: refusing to choose", a.podUID, m.podUID)
		}
		a.podUID = m.podUID
	}
	if m.containerID != nil {
		if a.containerID != nil && !bytes.Equal(a.containerID, m.containerID) {
			return fmt.Errorf("the cgroup lines name two containers, %s and %s: refusing to choose", a.containerID, m.containerID)
		}
		a.containerID = m.containerID
	}
	return nil
}

func isDigits(s []byte) bool {
	for _, c := range s {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}

func isLowerHex(s []byte) bool {
	for _, c := range s {
		if !isLowerHexByte(c) {
			return false
		}
	}
	return true
}

func isLowerHexByte(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f'
}
