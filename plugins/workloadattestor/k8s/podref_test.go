package k8s

import (
	"bytes"
	"context"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
)

// testBroker is listed with scope agent_node and access_policy permissive
// in nodeBroker, the plugin_data of AttestPod's kubelet-only tests.
var testBroker = spiffeid.RequireFromString("spiffe://example.org/broker")

const nodeBroker = `experimental { broker {
	access_policy = "permissive"
	brokers = [{ id = "spiffe://example.org/broker" }]
} }
`

func (e *testEnv) attestPod(ctx context.Context, namespace, name, uid string) ([]string, error) {
	sels, err := e.a.AttestPod(ctx, testBroker, namespace, name, uid)
	return values(sels), err
}

// A reference gets the pod-level selectors of Attest and no container's,
// as SPIRE answers a pod reference: by namespace and name, by UID, and by
// all three.
func TestAttestPodByReference(t *testing.T) {
	e := newSecureEnv(t, nodeBroker)
	pods := testPods(3)
	e.kubelet.pods = func(int) []corev1.Pod { return pods }
	p := pods[1]
	ctx := testkit.Context(t, time.Minute)
	for _, ref := range []struct{ what, namespace, name, uid string }{
		{"namespace and name", p.Namespace, p.Name, ""},
		{"UID", "", "", string(p.UID)},
		{"namespace, name and UID", p.Namespace, p.Name, string(p.UID)},
	} {
		got, err := e.attestPod(ctx, ref.namespace, ref.name, ref.uid)
		if err != nil || !slices.Equal(got, wantPod1(false)) {
			t.Errorf("by %s: got %q, %v; want pod 1's pod-level selectors %q", ref.what, got, err, wantPod1(false))
		}
	}
	// One list, fetched after the first call began, answered all three.
	if n := e.kubelet.count(); n != 1 {
		t.Errorf("kubelet requests = %d, want 1", n)
	}
}

// A static pod is named by the UID the kubelet lists: its config hash.
func TestAttestPodStaticUID(t *testing.T) {
	e := newReadOnlyEnv(t, nodeBroker)
	pods := testPods(2)
	static := hexID("manifest")[:32]
	pods[1].UID = types.UID(static)
	pods[1].OwnerReferences = nil
	e.kubelet.pods = func(int) []corev1.Pod { return pods }
	got, err := e.attestPod(testkit.Context(t, time.Minute), "", "", static)
	if err != nil || !slices.Contains(got, "k8s:pod-uid:"+static) || !slices.Contains(got, "k8s:pod-name:"+pods[1].Name) {
		t.Fatalf("got %q, %v; want the static pod's selectors", got, err)
	}
}

// The pod of that name has another UID: ErrPodMismatch (NotFound), also
// when the UID is another listed pod's.
func TestAttestPodUIDMismatch(t *testing.T) {
	e := newSecureEnv(t, nodeBroker+`
poll_retry_interval = "1ms"`)
	pods := testPods(3)
	e.kubelet.pods = func(int) []corev1.Pod { return pods }
	ctx := testkit.Context(t, time.Minute)
	for _, uid := range []string{string(pods[2].UID), podUID(77)} {
		got, err := e.attestPod(ctx, pods[1].Namespace, pods[1].Name, uid)
		if !errors.Is(err, ErrPodMismatch) || errors.Is(err, ErrPodNotFound) || len(got) != 0 {
			t.Fatalf("uid %s: got %q, %v; want ErrPodMismatch", uid, got, err)
		}
		for _, want := range []string{pods[1].Namespace + "/" + pods[1].Name, uid, string(pods[1].UID)} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("error %q does not say %q", err, want)
			}
		}
	}
}

// A pod that no list shows: ErrPodNotFound, after one list fetched for the
// call.
func TestAttestPodAbsent(t *testing.T) {
	e := newReadOnlyEnv(t, nodeBroker+`
poll_retry_interval = "1ms"`)
	pods := testPods(3)
	e.kubelet.pods = func(int) []corev1.Pod { return pods }
	ctx := testkit.Context(t, time.Minute)
	for _, ref := range [][3]string{
		{pods[1].Namespace, "web-gone", ""},
		{"elsewhere", pods[1].Name, ""},
		{"", "", podUID(77)},
		{"elsewhere", pods[1].Name, string(pods[1].UID)},
	} {
		before := e.kubelet.count()
		got, err := e.attestPod(ctx, ref[0], ref[1], ref[2])
		if !errors.Is(err, ErrPodNotFound) || len(got) != 0 {
			t.Fatalf("%q: got %q, %v; want ErrPodNotFound", ref, got, err)
		}
		if n := e.kubelet.count() - before; n < 1 || n > 2 {
			t.Errorf("%q: %d kubelet requests, want 1 (2 when the list was cached)", ref, n)
		}
	}
}

// A pod the cached list, older than the call, does not show is looked for
// in the next list: a pod created just before the call is found.
func TestAttestPodListedByTheNextList(t *testing.T) {
	e := newReadOnlyEnv(t, nodeBroker+`
poll_retry_interval = "500ms"`)
	pods := testPods(3)
	e.kubelet.pods = func(n int) []corev1.Pod {
		if n == 1 {
			return pods[:2]
		}
		return pods
	}
	ctx := testkit.Context(t, time.Minute)
	if _, err := e.attestPod(ctx, "", "", string(pods[0].UID)); err != nil {
		t.Fatal(err)
	}
	got, err := e.attestPod(ctx, pods[2].Namespace, pods[2].Name, "")
	if err != nil || !slices.Contains(got, "k8s:pod-uid:"+string(pods[2].UID)) {
		t.Fatalf("got %q, %v; want pod 2's selectors from the second list", got, err)
	}
	if n := e.kubelet.count(); n != 2 {
		t.Errorf("kubelet requests = %d, want 2", n)
	}
}

// A fetch that began before the call is joined, and its list, which may
// predate the pod, is not the last word: the next list is searched.
func TestAttestPodFetchBegunBeforeTheCall(t *testing.T) {
	e := newReadOnlyEnv(t, nodeBroker+`
poll_retry_interval = "10ms"`)
	pods := testPods(3)
	e.kubelet.pods = func(n int) []corev1.Pod {
		if n == 1 {
			return pods[:2]
		}
		return pods
	}
	gate := make(chan struct{})
	e.kubelet.gate = gate
	ctx := testkit.Context(t, time.Minute)
	type result struct {
		got []string
		err error
	}
	first, second := make(chan result, 1), make(chan result, 1)
	go func() {
		got, err := e.attestPod(ctx, "", "", string(pods[0].UID))
		first <- result{got, err}
	}()
	testkit.WaitFor(t, 10*time.Second, "the first fetch to reach the kubelet", func() bool { return e.kubelet.count() == 1 })
	go func() {
		got, err := e.attestPod(ctx, pods[2].Namespace, pods[2].Name, "")
		second <- result{got, err}
	}()
	testkit.WaitFor(t, 10*time.Second, "the second call to join the first fetch", func() bool { return e.a.lists.waiting() == 2 })
	close(gate)
	if r := <-first; r.err != nil || !slices.Contains(r.got, "k8s:pod-uid:"+string(pods[0].UID)) {
		t.Errorf("first call: got %q, %v; want pod 0's selectors", r.got, r.err)
	}
	if r := <-second; r.err != nil || !slices.Contains(r.got, "k8s:pod-uid:"+string(pods[2].UID)) {
		t.Errorf("second call: got %q, %v; want pod 2's selectors from the second list", r.got, r.err)
	}
	if n := e.kubelet.count(); n != 2 {
		t.Errorf("kubelet requests = %d, want 2", n)
	}
}

// Malformed references fail before any fetch.
func TestAttestPodInvalidReference(t *testing.T) {
	e := newReadOnlyEnv(t, nodeBroker)
	uid := podUID(1)
	for _, ref := range []struct{ what, namespace, name, uid string }{
		{"nothing", "", "", ""},
		{"a name without namespace", "", "web", ""},
		{"a name without namespace, with a UID", "", "web", uid},
		{"a namespace without name", "team-1", "", ""},
		{"a namespace without name, with a UID", "team-1", "", uid},
		{"an uppercase name", "team-1", "Web", ""},
		{"a name with a slash", "team-1", "web/x", ""},
		{"a name ending in a dash", "team-1", "web-", ""},
		{"a name with an empty label", "team-1", "web..x", ""},
		{"a name of 254 characters", "team-1", strings.Repeat("a", 254), ""},
		{"a namespace with a dot", "team.1", "web", ""},
		{"a namespace of 64 characters", strings.Repeat("a", 64), "web", ""},
		{"a namespace with a slash", "team/1", "web", ""},
		{"an uppercase UID", "", "", strings.ToUpper(uid)},
		{"a UID with underscores", "", "", strings.ReplaceAll(uid, "-", "_")},
		{"a UID of 35 characters", "", "", uid[:35]},
		{"a UID in braces", "", "", "{" + uid + "}"},
		{"a UID with a newline", "", "", uid[:35] + "\n"},
		{"a good name with a bad UID", "team-1", "web", "not-a-uid"},
		{"a long UID", "", "", strings.Repeat("a", 1<<20)},
	} {
		_, err := e.a.AttestPod(context.Background(), testBroker, ref.namespace, ref.name, ref.uid)
		if !errors.Is(err, ErrInvalidPodReference) {
			t.Errorf("%s: err = %v, want ErrInvalidPodReference", ref.what, err)
		} else if len(err.Error()) > 200 {
			t.Errorf("%s: the error quotes the input: %.200q...", ref.what, err)
		}
	}
	if n := e.kubelet.count(); n != 0 {
		t.Errorf("kubelet requests = %d, want none", n)
	}
	// The longest valid parts pass.
	long := strings.Repeat(strings.Repeat("a", 63)+".", 4)[:253]
	if err := validatePodReference(strings.Repeat("a", 63), long, uid); err != nil {
		t.Errorf("the longest namespace and name: %v", err)
	}
}

// A list with two pods under one name (the kubelet drops a deleted pod
// before it lists its namesake, but a list is no proof): no choice is
// made.
func TestAttestPodTwoPodsOfOneName(t *testing.T) {
	e := newReadOnlyEnv(t, nodeBroker+`
poll_retry_interval = "1ms"`)
	pods := testPods(3)
	pods[2].Namespace, pods[2].Name = pods[1].Namespace, pods[1].Name
	e.kubelet.pods = func(int) []corev1.Pod { return pods }
	ctx := testkit.Context(t, time.Minute)
	for _, uid := range []string{"", string(pods[1].UID)} {
		_, err := e.a.AttestPod(ctx, testBroker, pods[1].Namespace, pods[1].Name, uid)
		if err == nil || errors.Is(err, ErrPodNotFound) || errors.Is(err, ErrPodMismatch) || !strings.Contains(err.Error(), "two pods") {
			t.Errorf("uid %q: err = %v, want a refusal to choose", uid, err)
		}
	}
	// By UID alone the pod is one.
	if _, err := e.a.AttestPod(ctx, testBroker, "", "", string(pods[2].UID)); err != nil {
		t.Error(err)
	}
}

// While the kubelet fails, a pod in the last good list still answers, and
// one not in it is the kubelet's error, not ErrPodNotFound.
func TestAttestPodKubeletFailing(t *testing.T) {
	e := newReadOnlyEnv(t, nodeBroker+`
poll_retry_interval = "1ms"`)
	pods := testPods(3)
	e.kubelet.pods = func(int) []corev1.Pod { return pods }
	ctx := testkit.Context(t, time.Minute)
	if _, err := e.attestPod(ctx, "", "", string(pods[0].UID)); err != nil {
		t.Fatal(err)
	}
	e.kubelet.set(func(k *fakeKubelet) { k.status = 500 })
	testkit.WaitFor(t, 10*time.Second, "the cached list to be older than the interval", func() bool {
		return time.Since(e.a.lists.lastGood().fetched) > 5*time.Millisecond
	})
	got, err := e.attestPod(ctx, pods[1].Namespace, pods[1].Name, string(pods[1].UID))
	if err != nil || !slices.Equal(got, wantPod1(false)) {
		t.Fatalf("got %q, %v; want pod 1's selectors from the last good list", got, err)
	}
	_, err = e.attestPod(ctx, "", "", podUID(77))
	if err == nil || errors.Is(err, ErrPodNotFound) || !strings.Contains(err.Error(), "500 Internal Server Error") {
		t.Errorf("err = %v; want the kubelet's failure, not ErrPodNotFound", err)
	}
}

// A kubelet that does not answer: AttestPod returns when ctx ends, with
// its error.
func TestAttestPodContextEnds(t *testing.T) {
	e := newReadOnlyEnv(t, nodeBroker)
	e.kubelet.gate = make(chan struct{})
	t.Cleanup(func() { close(e.kubelet.gate) })
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		_, err := e.a.AttestPod(ctx, testBroker, "", "", podUID(1))
		done <- err
	}()
	testkit.WaitFor(t, 10*time.Second, "the kubelet to be asked", func() bool { return e.kubelet.count() == 1 })
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want context.Canceled", err)
	}
}

// BenchmarkResolveByName500 is the scan by namespace and name of a
// 500-pod list, for its last pod.
func BenchmarkResolveByName500(b *testing.B) {
	pods := testPods(500)
	list, err := decodePodList(bytes.NewReader(podListJSON(pods)), func(string, ...any) {})
	if err != nil {
		b.Fatal(err)
	}
	last := pods[len(pods)-1]
	for b.Loop() {
		if _, err := list.resolve(last.Namespace, last.Name, ""); err != nil {
			b.Fatal(err)
		}
	}
}
