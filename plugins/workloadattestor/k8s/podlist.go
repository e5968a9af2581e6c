package k8s

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"
)

// pod is what the selectors need of one pod of the kubelet's list: the
// fields of k8s.io/api/core/v1.Pod by their JSON names, and nothing else.
// The decoder skips the rest (managedFields, env, volumes, probes,
// conditions: most of each pod) without keeping it.
type pod struct {
	Metadata struct {
		Name            string            `json:"name"`
		Namespace       string            `json:"namespace"`
		UID             string            `json:"uid"`
		Labels          map[string]string `json:"labels"`
		OwnerReferences []ownerRef        `json:"ownerReferences"`
	} `json:"metadata"`
	Spec struct {
		ServiceAccountName string          `json:"serviceAccountName"`
		NodeName           string          `json:"nodeName"`
		Containers         []specContainer `json:"containers"`
		InitContainers     []specContainer `json:"initContainers"`
	} `json:"spec"`
	Status struct {
		ContainerStatuses          []containerStatus `json:"containerStatuses"`
		InitContainerStatuses      []containerStatus `json:"initContainerStatuses"`
		EphemeralContainerStatuses []containerStatus `json:"ephemeralContainerStatuses"`
	} `json:"status"`
}

type ownerRef struct {
	Kind string `json:"kind"`
	Name string `json:"name"`
	UID  string `json:"uid"`
}

type specContainer struct {
	Name  string `json:"name"`
	Image string `json:"image"`
}

type containerStatus struct {
	Name string `json:"name"`
	// ContainerID is "<runtime>://<id>", empty until the container exists.
	ContainerID string `json:"containerID"`
	Image       string `json:"image"`
	ImageID     string `json:"imageID"`
}

// podList is one decoded answer of the kubelet, indexed. It is never
// changed once published, so attestations share it without locks.
type podList struct {
	// version counts successful fetches: an attestation that searched
	// version v waits for one newer than v.
	version uint64
	// fetched is when the fetch started: the list is at least this new.
	fetched time.Time
	size    int64 // bytes read from the kubelet
	pods    []pod
	// byUID and byContainer give the index into pods by canonical pod UID
	// and by runtime container ID; ambiguous when two pods claim one.
	byUID       map[string]int
	byContainer map[string]int
}

const ambiguous = -1

// lookup returns the pod under key, nil when there is none, and whether
// two pods claim the key.
func (l *podList) lookup(index map[string]int, key string) (p *pod, twice bool) {
	i, ok := index[key]
	switch {
	case !ok:
		return nil, false
	case i == ambiguous:
		return nil, true
	}
	return &l.pods[i], false
}

var (
	// errMalformedPodList: the kubelet's answer is not a pod list.
	errMalformedPodList = errors.New("the kubelet's pod list is malformed")
	// errPodListTooLarge: the answer passed max_pod_list_size.
	errPodListTooLarge = errors.New("the kubelet's pod list is larger than max_pod_list_size")
)

// limitedReader fails with errPodListTooLarge once more than limit bytes
// are read, so a pod list past the limit is an error and not a truncated
// list.
type limitedReader struct {
	r     io.Reader
	n     int64
	limit int64
}

func (l *limitedReader) Read(p []byte) (int, error) {
	if l.n > l.limit {
		return 0, fmt.Errorf("%w (%d bytes): raise max_pod_list_size if this node runs that many pods", errPodListTooLarge, l.limit)
	}
	if room := l.limit - l.n + 1; int64(len(p)) > room {
		p = p[:room]
	}
	n, err := l.r.Read(p)
	l.n += int64(n)
	return n, err
}

// decodePodList reads a PodList ({"kind":"PodList","items":[...]}) as a
// stream: each item is decoded into a pod, so no more than one pod's JSON
// and the kept fields are held at once. Pods without a UID are dropped,
// as SPIRE does; warn is told about them.
func decodePodList(r io.Reader, warn func(msg string, args ...any)) (*podList, error) {
	dec := json.NewDecoder(r)
	malformed := func(format string, args ...any) error {
		return fmt.Errorf("%w at byte %d: %s", errMalformedPodList, dec.InputOffset(), fmt.Sprintf(format, args...))
	}
	tokenErr := func(err error, what string) error {
		if errors.Is(err, errPodListTooLarge) {
			return err
		}
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return malformed("%s: %v", what, err)
	}
	if tok, err := dec.Token(); err != nil {
		return nil, tokenErr(err, "reading the start of the list")
	} else if tok != json.Delim('{') {
		return nil, malformed("want a JSON object (a PodList), got %s", describeToken(tok))
	}
	list := &podList{}
	sawItems := false
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, tokenErr(err, "reading a key of the list")
		}
		if tok != "items" {
			if err := skipValue(dec); err != nil {
				return nil, tokenErr(err, fmt.Sprintf("reading %q", tok))
			}
			continue
		}
		if sawItems {
			return nil, malformed(`"items" appears twice`)
		}
		sawItems = true
		if err := decodeItems(dec, list, malformed, tokenErr); err != nil {
			return nil, err
		}
	}
	if _, err := dec.Token(); err != nil {
		return nil, tokenErr(err, "reading the end of the list")
	}
	if tok, err := dec.Token(); err != io.EOF {
		if err != nil {
			return nil, tokenErr(err, "reading after the list")
		}
		return nil, malformed("data after the pod list: %s", describeToken(tok))
	}
	if !sawItems {
		return nil, malformed(`no "items" array: is this the kubelet's /pods?`)
	}
	list.index(warn)
	return list, nil
}

func decodeItems(dec *json.Decoder, list *podList, malformed func(string, ...any) error, tokenErr func(error, string) error) error {
	tok, err := dec.Token()
	switch {
	case err != nil:
		return tokenErr(err, `reading "items"`)
	case tok == nil:
		return nil // encoding/json writes a nil Items as null
	case tok != json.Delim('['):
		return malformed(`"items" is %s, not an array`, describeToken(tok))
	}
	for dec.More() {
		list.pods = append(list.pods, pod{})
		if err := dec.Decode(&list.pods[len(list.pods)-1]); err != nil {
			return tokenErr(err, fmt.Sprintf("pod %d", len(list.pods)-1))
		}
	}
	if _, err := dec.Token(); err != nil {
		return tokenErr(err, `reading the end of "items"`)
	}
	return nil
}

// skipValue reads past one JSON value, keeping nothing of it.
func skipValue(dec *json.Decoder) error {
	depth := 0
	for {
		tok, err := dec.Token()
		if err != nil {
			return err
		}
		switch tok {
		case json.Delim('{'), json.Delim('['):
			depth++
		case json.Delim('}'), json.Delim(']'):
			depth--
		}
		if depth == 0 {
			return nil
		}
	}
}

func describeToken(tok json.Token) string {
	switch v := tok.(type) {
	case nil:
		return "null"
	case json.Delim:
		return fmt.Sprintf("%q", string(v))
	case string:
		if len(v) > 40 {
			v = v[:40] + "..."
		}
		return fmt.Sprintf("the string %q", v)
	}
	return fmt.Sprintf("%T %v", tok, tok)
}

// index drops pods without a UID and indexes the rest by pod UID and by
// the runtime ID of every container, init container and ephemeral
// container.
func (l *podList) index(warn func(msg string, args ...any)) {
	kept := l.pods[:0]
	for i := range l.pods {
		if l.pods[i].Metadata.UID == "" {
			warn("The kubelet listed a pod without a UID; it is skipped", "namespace", l.pods[i].Metadata.Namespace, "pod", l.pods[i].Metadata.Name)
			continue
		}
		kept = append(kept, l.pods[i])
	}
	clear(l.pods[len(kept):])
	l.pods = kept
	l.byUID = make(map[string]int, len(kept))
	l.byContainer = make(map[string]int, 2*len(kept))
	for i := range kept {
		p := &kept[i]
		put(l.byUID, podKey(p.Metadata.UID), i)
		for _, statuses := range [][]containerStatus{p.Status.ContainerStatuses, p.Status.InitContainerStatuses, p.Status.EphemeralContainerStatuses} {
			for _, st := range statuses {
				if id, ok := runtimeID(st.ContainerID); ok {
					put(l.byContainer, id, i)
				}
			}
		}
	}
}

func put(index map[string]int, key string, i int) {
	if j, ok := index[key]; ok && j != i {
		i = ambiguous
	}
	index[key] = i
}

// runtimeID is the container's ID without its runtime:// scheme, as the
// cgroup path names it.
func runtimeID(containerID string) (string, bool) {
	_, id, ok := strings.Cut(containerID, "://")
	return id, ok && id != ""
}

// podKey compares pod UIDs as the kubelet lists them (dashed, or 32
// hex digits for static pods) with what a systemd cgroup path shows
// (underscores).
func podKey(uid string) string {
	return strings.ToLower(strings.ReplaceAll(uid, "_", "-"))
}
