package k8s

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"reflect"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
)

func decodeTestList(t testing.TB, data []byte) *podList {
	t.Helper()
	list, err := decodePodList(bytes.NewReader(data), func(string, ...any) {})
	if err != nil {
		t.Fatal(err)
	}
	return list
}

// The streamed decoder keeps exactly the fields that encoding/json's full
// decode into corev1.Pod has.
func TestDecodePodListMatchesCoreV1(t *testing.T) {
	pods := testPods(20)
	pods[3].Status.EphemeralContainerStatuses = []corev1.ContainerStatus{{Name: "dbg", ContainerID: "containerd://" + hexID("dbg"), Image: "busybox"}}
	data := podListJSON(pods)
	list := decodeTestList(t, data)
	var full corev1.PodList
	if err := json.Unmarshal(data, &full); err != nil {
		t.Fatal(err)
	}
	if len(list.pods) != len(full.Items) {
		t.Fatalf("decoded %d pods, want %d", len(list.pods), len(full.Items))
	}
	for i, fp := range full.Items {
		got := list.pods[i]
		want := trimmed(fp)
		if !reflect.DeepEqual(got, want) {
			t.Errorf("pod %d:\n got %+v\nwant %+v", i, got, want)
		}
		if p, twice := list.lookup(list.byUID, string(fp.UID)); p != &list.pods[i] || twice {
			t.Errorf("pod %d is not indexed by its UID", i)
		}
		for _, cs := range append(append(fp.Status.ContainerStatuses, fp.Status.InitContainerStatuses...), fp.Status.EphemeralContainerStatuses...) {
			id, _ := runtimeID(cs.ContainerID)
			if p, _ := list.lookup(list.byContainer, id); p != &list.pods[i] {
				t.Errorf("pod %d's container %s is not indexed", i, cs.Name)
			}
		}
	}
}

// trimmed is the reference projection of a corev1.Pod onto pod.
func trimmed(p corev1.Pod) pod {
	var out pod
	m := &out.Metadata
	m.Name, m.Namespace, m.UID, m.Labels = p.Name, p.Namespace, string(p.UID), p.Labels
	for _, o := range p.OwnerReferences {
		m.OwnerReferences = append(m.OwnerReferences, ownerRef{Kind: o.Kind, Name: o.Name, UID: string(o.UID)})
	}
	out.Spec.ServiceAccountName, out.Spec.NodeName = p.Spec.ServiceAccountName, p.Spec.NodeName
	for _, c := range p.Spec.Containers {
		out.Spec.Containers = append(out.Spec.Containers, specContainer{Name: c.Name, Image: c.Image})
	}
	for _, c := range p.Spec.InitContainers {
		out.Spec.InitContainers = append(out.Spec.InitContainers, specContainer{Name: c.Name, Image: c.Image})
	}
	conv := func(l []corev1.ContainerStatus) []containerStatus {
		var s []containerStatus
		for _, cs := range l {
			s = append(s, containerStatus{Name: cs.Name, ContainerID: cs.ContainerID, Image: cs.Image, ImageID: cs.ImageID})
		}
		return s
	}
	out.Status.ContainerStatuses = conv(p.Status.ContainerStatuses)
	out.Status.InitContainerStatuses = conv(p.Status.InitContainerStatuses)
	out.Status.EphemeralContainerStatuses = conv(p.Status.EphemeralContainerStatuses)
	return out
}

func TestDecodePodListEdgeCases(t *testing.T) {
	var warned []string
	warn := func(msg string, _ ...any) { warned = append(warned, msg) }
	list, err := decodePodList(strings.NewReader(`{"kind":"PodList","apiVersion":"v1","metadata":{"x":[1,{"y":null}]},"items":null}`), warn)
	if err != nil || len(list.pods) != 0 {
		t.Errorf("items null: %v, %v", list, err)
	}
	list, err = decodePodList(strings.NewReader(`{"items":[{"metadata":{"name":"no-uid"}},{"metadata":{"uid":"u1","name":"a"}}]}`), warn)
	if err != nil || len(list.pods) != 1 || list.pods[0].Metadata.Name != "a" || len(warned) != 1 {
		t.Errorf("a pod without UID: %+v, %v, warned %q", list, err, warned)
	}
}

func TestDecodePodListMalformed(t *testing.T) {
	for _, tc := range []struct{ name, body, want string }{
		{"empty", ``, "unexpected EOF"},
		{"not JSON", `<html>`, "invalid character"},
		{"an array", `[]`, `want a JSON object (a PodList), got "["`},
		{"no items", `{"kind":"PodList"}`, `no "items" array`},
		{"items not an array", `{"items":{"a":1}}`, `"items" is "{", not an array`},
		{"items twice", `{"items":[],"items":[]}`, `"items" appears twice`},
		{"truncated", `{"items":[{"metadata":{"uid":"u1"}}`, "unexpected EOF"},
		{"a pod is a string", `{"items":["pod"]}`, "pod 0: json: cannot unmarshal string"},
		{"labels are a list", `{"items":[{"metadata":{"uid":"u","labels":["a"]}}]}`, "pod 0: json: cannot unmarshal array"},
		{"trailing data", `{"items":[]} {}`, "data after the pod list"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := decodePodList(strings.NewReader(tc.body), func(string, ...any) {})
			if !errors.Is(err, errMalformedPodList) || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("err = %v; want errMalformedPodList saying %q", err, tc.want)
			}
		})
	}
}

func TestDecodePodListTooLarge(t *testing.T) {
	data := podListJSON(testPods(10))
	for _, limit := range []int64{0, 100, int64(len(data)) - 1} {
		_, err := decodePodList(&limitedReader{r: bytes.NewReader(data), limit: limit}, func(string, ...any) {})
		if !errors.Is(err, errPodListTooLarge) || !strings.Contains(err.Error(), "raise max_pod_list_size") {
			t.Errorf("limit %d: err = %v; want errPodListTooLarge", limit, err)
		}
	}
	r := &limitedReader{r: bytes.NewReader(data), limit: int64(len(data))}
	if _, err := decodePodList(r, func(string, ...any) {}); err != nil || r.n != int64(len(data)) {
		t.Errorf("exactly at the limit: %v (read %d of %d)", err, r.n, len(data))
	}
}

func FuzzDecodePodList(f *testing.F) {
	// A small generated pod: the fuzzer minimizes every input that finds
	// something new, and a full one (7 KiB) makes that take minutes.
	small := testPod(0)
	small.ManagedFields, small.Annotations, small.Spec.Volumes = nil, nil, nil
	for i := range small.Spec.Containers {
		small.Spec.Containers[i] = corev1.Container{Name: small.Spec.Containers[i].Name, Image: small.Spec.Containers[i].Image}
	}
	small.Spec.InitContainers = nil
	small.Status.Conditions = nil
	f.Add(podListJSON([]corev1.Pod{small}))
	f.Add([]byte(`{"items":[{"metadata":{"uid":"u1","labels":{"a":"b"}},"status":{"containerStatuses":[{"containerID":"x://1"}]}}]}`))
	f.Add([]byte(`{"items":null}`))
	f.Add([]byte(`{"kind":"PodList","items":[{"metadata":{"uid":"u"}},{"metadata":{"uid":"u"}}]}`))
	f.Add([]byte(`{"items":[{"status":{"ephemeralContainerStatuses":[{"containerID":"a://b"},{"containerID":"a://b"}]}}]}`))
	f.Fuzz(checkDecodePodList)
}

// checkDecodePodList is FuzzDecodePodList's check of one input.
func checkDecodePodList(t *testing.T, data []byte) {
	{
		list, err := decodePodList(&limitedReader{r: bytes.NewReader(data), limit: 1 << 20}, func(string, ...any) {})
		if err != nil {
			if !errors.Is(err, errMalformedPodList) && !errors.Is(err, errPodListTooLarge) {
				t.Fatalf("an error of no class: %v", err)
			}
			return
		}
		if !json.Valid(data) {
			t.Fatalf("accepted invalid JSON %q", data)
		}
		for uid, i := range list.byUID {
			if i != ambiguous && podKey(list.pods[i].Metadata.UID) != uid {
				t.Fatalf("index %q points at pod %q", uid, list.pods[i].Metadata.UID)
			}
		}
		for i := range list.pods {
			p := &list.pods[i]
			if p.Metadata.UID == "" {
				t.Fatal("kept a pod without UID")
			}
			podSelectors(p) // never panics
			for _, cs := range p.Status.ContainerStatuses {
				containerSelectors(nil, cs, p.Spec.Containers)
			}
		}
		// What was kept decodes again to the same.
		again, err := decodePodList(bytes.NewReader(mustJSON(t, list.pods)), func(string, ...any) {})
		if err != nil || !reflect.DeepEqual(again.pods, list.pods) && len(list.pods) > 0 {
			t.Fatalf("round trip: %v", err)
		}
	}
}

func mustJSON(t *testing.T, pods []pod) []byte {
	b, err := json.Marshal(map[string]any{"items": pods})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

var sink any

// BenchmarkDecodePodList500 compares the streamed decode of a 500-pod list
// with the whole body read and decoded into corev1.PodList, SPIRE's way
// before fastjson. TestDecodeMemory500 measures the live heap.
func BenchmarkDecodePodList500(b *testing.B) {
	data := podListJSON(testPods(500))
	b.Run("streamed", func(b *testing.B) {
		b.SetBytes(int64(len(data)))
		b.ReportAllocs()
		for b.Loop() {
			list, err := decodePodList(bytes.NewReader(data), func(string, ...any) {})
			if err != nil {
				b.Fatal(err)
			}
			sink = list
		}
	})
	b.Run("corev1", func(b *testing.B) {
		b.SetBytes(int64(len(data)))
		b.ReportAllocs()
		full := func() any {
			body, err := io.ReadAll(bytes.NewReader(data))
			if err != nil {
				b.Fatal(err)
			}
			var list corev1.PodList
			if err := json.Unmarshal(body, &list); err != nil {
				b.Fatal(err)
			}
			return &list
		}
		for b.Loop() {
			sink = full()
		}
	})
}
