package k8s

import (
	"context"
	"errors"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/attestor"
	"github.com/lanyard-dev/lanyard/internal/testkit"
	corev1 "k8s.io/api/core/v1"
)

// The selectors of testPod(1)'s app container, written out by hand from
// SPIRE's doc and the pod: the reference the attestor must agree with.
func wantPod1(withContainer bool) []string {
	p := testPod(1)
	uid := string(p.UID)
	v := []string{
		"k8s:sa:web-1",
		"k8s:ns:team-1",
		"k8s:node-name:node-a",
		"k8s:pod-uid:" + uid,
		"k8s:pod-name:" + p.Name,
		"k8s:pod-image-count:2",
		"k8s:pod-init-image-count:1",
		"k8s:pod-image:registry.example.com/app/web:v1",
		"k8s:pod-image:registry.example.com/app/web@sha256:" + hexID("digest", "registry.example.com/app/web:v1"),
		"k8s:pod-image:envoyproxy/envoy:v1.30.1",
		"k8s:pod-image:docker.io/envoyproxy/envoy:v1.30.1",
		"k8s:pod-image:docker.io/envoyproxy/envoy@sha256:" + hexID("digest", "docker.io/envoyproxy/envoy:v1.30.1"),
		"k8s:pod-init-image:busybox:1.36",
		"k8s:pod-init-image:docker.io/library/busybox:1.36",
		"k8s:pod-init-image:docker.io/library/busybox@sha256:" + hexID("digest", "docker.io/library/busybox:1.36"),
		"k8s:pod-label:app:web-1",
		"k8s:pod-label:pod-template-hash:" + hexID("rs", 1)[:10],
		"k8s:pod-label:tier:frontend",
		"k8s:pod-owner:ReplicaSet:" + p.OwnerReferences[0].Name,
		"k8s:pod-owner-uid:ReplicaSet:" + string(p.OwnerReferences[0].UID),
	}
	if withContainer {
		v = append(v,
			"k8s:container-name:app",
			"k8s:container-image:registry.example.com/app/web:v1",
			"k8s:container-image:registry.example.com/app/web@sha256:"+hexID("digest", "registry.example.com/app/web:v1"),
		)
	}
	return sorted(v...)
}

// attestPod1 serves testPods(3) and attests a process in pod 1's named
// container.
func (e *testEnv) attestPod1(container string) []string {
	e.t.Helper()
	pods := testPods(3)
	e.kubelet.pods = func(int) []corev1.Pod { return pods }
	got, err := e.attest(testkit.Context(e.t, time.Minute), e.inPod(4001, string(pods[1].UID), containerOf(pods[1], container)))
	if err != nil {
		e.t.Fatal(err)
	}
	return got
}

func wantSelectors(t *testing.T, got, want []string) {
	t.Helper()
	if !slices.Equal(got, want) {
		t.Errorf("selectors:\n got %q\nwant %q", got, want)
	}
}

func TestAttestSecurePort(t *testing.T) {
	e := newSecureEnv(t, "")
	wantSelectors(t, e.attestPod1("app"), wantPod1(true))
	if e.kubelet.lastToken != testToken {
		t.Errorf("the kubelet saw token %q, want the token file's %q", e.kubelet.lastToken, testToken)
	}
}

func TestAttestReadOnlyPort(t *testing.T) {
	e := newReadOnlyEnv(t, "")
	wantSelectors(t, e.attestPod1("app"), wantPod1(true))
}

func TestAttestInitContainer(t *testing.T) {
	e := newReadOnlyEnv(t, "")
	wantSelectors(t, e.attestPod1("init"), sorted(append(wantPod1(false),
		"k8s:container-name:init",
		"k8s:container-image:busybox:1.36",
		"k8s:container-image:docker.io/library/busybox:1.36",
		"k8s:container-image:docker.io/library/busybox@sha256:"+hexID("digest", "docker.io/library/busybox:1.36"))...))
}

// A systemd driver's cgroup path writes the pod UID with underscores.
func TestAttestMatchesUIDWithUnderscores(t *testing.T) {
	e := newReadOnlyEnv(t, "")
	pods := testPods(3)
	e.kubelet.pods = func(int) []corev1.Pod { return pods }
	uid := strings.ReplaceAll(string(pods[1].UID), "-", "_")
	got, err := e.attest(testkit.Context(t, time.Minute), e.inPod(4001, uid, containerOf(pods[1], "app")))
	if err != nil || !slices.Equal(got, wantPod1(true)) {
		t.Errorf("got %q, %v; want pod 1's selectors", got, err)
	}
}

func TestAttestNotInPod(t *testing.T) {
	e := newReadOnlyEnv(t, "")
	e.writeCgroup(4001, "12:memory:/user.slice/user-1000.slice/session-3.scope\n0::/user.slice\n")
	got, err := e.attest(testkit.Context(t, time.Minute), attestor.Process{PID: 4001})
	if err != nil || len(got) != 0 {
		t.Errorf("a host process: got %q, %v; want no selectors and no error", got, err)
	}
	if n := e.kubelet.count(); n != 0 {
		t.Errorf("the kubelet was asked %d times for a process in no pod", n)
	}
}

// The test process itself, through the real /proc: it runs in no pod.
func TestAttestRealProcNotInPod(t *testing.T) {
	a, _, err := buildAttestor("kubelet_read_only_port = 1", map[string]string{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	sels, err := a.Attest(testkit.Context(t, time.Minute), attestor.Process{PID: int32(os.Getpid())})
	if err != nil || len(sels) != 0 {
		t.Errorf("this test process: got %v, %v; want no selectors and no error", sels, err)
	}
}

func TestAttestProcessErrors(t *testing.T) {
	e := newReadOnlyEnv(t, "")
	ctx := testkit.Context(t, time.Minute)
	if _, err := e.a.Attest(ctx, attestor.Process{PID: 0}); err == nil || !strings.Contains(err.Error(), "not a process id") {
		t.Errorf("pid 0: %v", err)
	}
	_, err := e.a.Attest(ctx, attestor.Process{PID: 4999})
	if err == nil || !strings.Contains(err.Error(), "pid 4999") || !strings.Contains(err.Error(), "does not exist") || !strings.Contains(err.Error(), "hostPID") {
		t.Errorf("a gone process: %v", err)
	}
	e.writeCgroup(4002, strings.Repeat("1:memory:/x\n", maxCgroupFileSize/10))
	if _, err := e.a.Attest(ctx, attestor.Process{PID: 4002}); err == nil || !strings.Contains(err.Error(), "larger than 65536 bytes") {
		t.Errorf("a huge cgroup file: %v", err)
	}
}

func TestAttestDisableContainerSelectors(t *testing.T) {
	e := newReadOnlyEnv(t, "disable_container_selectors = true")
	pods := testPods(3)
	e.kubelet.pods = func(int) []corev1.Pod { return pods }
	ctx := testkit.Context(t, time.Minute)
	got, err := e.attest(ctx, e.inPod(4001, string(pods[1].UID), containerOf(pods[1], "app")))
	if err != nil || !slices.Equal(got, wantPod1(false)) {
		t.Errorf("listed container: got %q, %v; want the pod's selectors only", got, err)
	}
	// A container not (yet) in the status gets the pod's selectors.
	got, err = e.attest(ctx, e.inPod(4002, string(pods[1].UID), hexID("not yet started")))
	if err != nil || !slices.Equal(got, wantPod1(false)) {
		t.Errorf("unlisted container: got %q, %v; want the pod's selectors", got, err)
	}
}

// SPIRE #4276: two tags of one digest. The runtime shows the first tag it
// has for the digest in the status; the pod asked for the other. The pod
// must get the tag it asked for, never the other pod's.
func TestAttestTwoTagsOfOneDigest(t *testing.T) {
	e := newReadOnlyEnv(t, "")
	pods := testPods(2)
	digest := "registry.example.com/app/web@sha256:" + hexID("one digest")
	for i, tag := range []string{"tag-a", "tag-b"} {
		pods[i].Spec.Containers[0].Image = "registry.example.com/app/web:" + tag
		pods[i].Status.ContainerStatuses[0].Image = "registry.example.com/app/web:tag-a" // what the CRI reports for both
		pods[i].Status.ContainerStatuses[0].ImageID = digest
	}
	e.kubelet.pods = func(int) []corev1.Pod { return pods }
	got, err := e.attest(testkit.Context(t, time.Minute), e.inPod(4001, string(pods[1].UID), containerOf(pods[1], "app")))
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range got {
		if strings.Contains(s, "tag-a") {
			t.Errorf("the tag-b pod got %q", s)
		}
	}
	for _, want := range []string{"k8s:container-image:registry.example.com/app/web:tag-b", "k8s:container-image:" + digest, "k8s:pod-image:registry.example.com/app/web:tag-b", "k8s:pod-image:" + digest} {
		if !slices.Contains(got, want) {
			t.Errorf("missing %q in %q", want, got)
		}
	}
}

// The workload connects before the kubelet lists its container: it gets
// its selectors from the poll that first lists it, the third here.
func TestAttestContainerListedOnThirdPoll(t *testing.T) {
	e := newReadOnlyEnv(t, `poll_retry_interval = "10ms"`)
	pods := testPods(3)
	e.kubelet.pods = func(n int) []corev1.Pod {
		if n < 3 {
			early := testPods(3)
			early[1].Status.ContainerStatuses = nil
			return early
		}
		return pods
	}
	got, err := e.attest(testkit.Context(t, time.Minute), e.inPod(4001, string(pods[1].UID), containerOf(pods[1], "app")))
	if err != nil || !slices.Equal(got, wantPod1(true)) {
		t.Fatalf("got %q, %v; want pod 1's selectors", got, err)
	}
	if n := e.kubelet.count(); n != 3 {
		t.Errorf("kubelet requests = %d, want 3", n)
	}
}

func TestAttestPodNeverListed(t *testing.T) {
	e := newReadOnlyEnv(t, `poll_retry_interval = "10ms"`)
	e.kubelet.pods = func(int) []corev1.Pod { return testPods(3) }
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	uid := podUID(77)
	_, err := e.a.Attest(ctx, e.inPod(4001, uid, hexID("c")))
	if !errors.Is(err, context.DeadlineExceeded) || !errors.Is(err, errNotListed) {
		t.Fatalf("err = %v; want errNotListed and the context's DeadlineExceeded", err)
	}
	for _, want := range []string{"pod " + uid, "container " + hexID("c"), "not in the kubelet's pod list after"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
	if !strings.Contains(e.logs.String(), "not in the kubelet's pod list; giving up") {
		t.Errorf("no log line on giving up:\n%s", e.logs)
	}
}

func TestAttestMaxPollAttempts(t *testing.T) {
	e := newReadOnlyEnv(t, "poll_retry_interval = \"1ms\"\nmax_poll_attempts = 4")
	e.kubelet.pods = func(int) []corev1.Pod { return testPods(2) }
	_, err := e.a.Attest(testkit.Context(t, time.Minute), e.inPod(4001, podUID(77), hexID("c")))
	if !errors.Is(err, errNotListed) || !strings.Contains(err.Error(), "after 4 polls") {
		t.Fatalf("err = %v; want errNotListed after 4 polls", err)
	}
	if n := e.kubelet.count(); n != 4 {
		t.Errorf("kubelet requests = %d, want 4", n)
	}
}

// A kubelet that refuses: the attestation keeps polling until its
// deadline, then says what the kubelet said and what to fix.
func TestAttestKubeletForbidden(t *testing.T) {
	e := newSecureEnv(t, `poll_retry_interval = "10ms"`)
	e.kubelet.allowed = map[string]bool{}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_, err := e.a.Attest(ctx, e.inPod(4001, podUID(1), hexID("c")))
	if !errors.Is(err, errKubeletForbidden) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v; want errKubeletForbidden and DeadlineExceeded", err)
	}
	for _, want := range []string{"nodes/proxy", "user=system:serviceaccount:spire:spire-agent"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
	if n := strings.Count(e.logs.String(), "Cannot get the pod list from the kubelet"); n != 1 {
		t.Errorf("the same failure was logged %d times, want once:\n%s", n, e.logs)
	}
}

// A failed refresh keeps the last good list: a workload listed in it is
// still attested while the kubelet fails.
func TestAttestKeepsLastGoodList(t *testing.T) {
	e := newReadOnlyEnv(t, `poll_retry_interval = "1ms"`)
	pods := testPods(3)
	e.kubelet.pods = func(int) []corev1.Pod { return pods }
	ctx := testkit.Context(t, time.Minute)
	if _, err := e.attest(ctx, e.inPod(4001, string(pods[0].UID), containerOf(pods[0], "app"))); err != nil {
		t.Fatal(err)
	}
	e.kubelet.set(func(k *fakeKubelet) { k.status = 500 })
	testkit.WaitFor(t, 10*time.Second, "the cached list to be older than the interval", func() bool {
		return time.Since(e.a.lists.lastGood().fetched) > 5*time.Millisecond
	})
	got, err := e.attest(ctx, e.inPod(4002, string(pods[1].UID), containerOf(pods[1], "app")))
	if err != nil || !slices.Equal(got, wantPod1(true)) {
		t.Fatalf("with the kubelet failing: got %q, %v; want pod 1's selectors from the last good list", got, err)
	}
	if e.kubelet.count() < 2 {
		t.Errorf("the kubelet was not asked again")
	}
	if !strings.Contains(e.logs.String(), "500 Internal Server Error") {
		t.Errorf("the failure is not logged:\n%s", e.logs)
	}
}

// 100 workloads attest at once: one kubelet request serves them all.
func TestAttestBurstMakesOneRequest(t *testing.T) {
	e := newSecureEnv(t, "")
	pods := testPods(500)
	e.kubelet.pods = func(int) []corev1.Pod { return pods }
	gate := make(chan struct{})
	e.kubelet.set(func(k *fakeKubelet) { k.gate = gate })
	ctx := testkit.Context(t, time.Minute)
	const burst = 100
	var wg sync.WaitGroup
	errs := make(chan error, burst)
	entered := make(chan struct{}, burst)
	// Each process is in a pod of its own.
	for i := range burst {
		p := e.inPod(int32(5000+i), string(pods[i*5].UID), containerOf(pods[i*5], "app"))
		wg.Go(func() {
			entered <- struct{}{}
			sels, err := e.a.Attest(ctx, p)
			if err == nil && len(sels) == 0 {
				err = errors.New("no selectors")
			}
			errs <- err
		})
	}
	for range burst {
		testkit.Receive(t, entered, time.Minute, "the attestations to start")
	}
	testkit.WaitFor(t, time.Minute, "every attestation to wait on the one fetch", func() bool {
		return e.a.lists.waiting() == burst && e.kubelet.count() == 1
	})
	close(gate)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	if n := e.kubelet.count(); n != 1 {
		t.Errorf("kubelet requests for a burst of %d = %d, want 1", burst, n)
	}
}

func TestAttestEphemeralContainer(t *testing.T) {
	e := newReadOnlyEnv(t, "")
	pods := testPods(2)
	pods[1].Status.EphemeralContainerStatuses = []corev1.ContainerStatus{{Name: "debugger", ContainerID: "containerd://" + hexID("debug"), Image: "busybox"}}
	e.kubelet.pods = func(int) []corev1.Pod { return pods }
	_, err := e.a.Attest(testkit.Context(t, time.Minute), e.inPod(4001, string(pods[1].UID), hexID("debug")))
	if err == nil || !strings.Contains(err.Error(), "ephemeral container (kubectl debug)") {
		t.Errorf("err = %v; want the ephemeral container refused", err)
	}
}

func TestMatchByContainerID(t *testing.T) {
	e := newReadOnlyEnv(t, "")
	pods := testPods(3)
	list := decodeTestList(t, podListJSON(pods))
	sels, p, err := e.a.match(list, "", containerOf(pods[1], "app"))
	if err != nil || p == nil || p.Metadata.UID != string(pods[1].UID) || !slices.Equal(values(sels), wantPod1(true)) {
		t.Errorf("without pod UID: got %q, %v, %v", values(sels), p, err)
	}
	pods[2].Status.ContainerStatuses[0].ContainerID = pods[1].Status.ContainerStatuses[0].ContainerID
	list = decodeTestList(t, podListJSON(pods))
	if _, _, err := e.a.match(list, "", containerOf(pods[1], "app")); err == nil || !strings.Contains(err.Error(), "in two pods") {
		t.Errorf("a container ID in two pods: %v", err)
	}
	pods[2].UID = pods[1].UID
	list = decodeTestList(t, podListJSON(pods))
	if _, _, err := e.a.match(list, string(pods[1].UID), containerOf(pods[1], "app")); err == nil || !strings.Contains(err.Error(), "two pods with UID") {
		t.Errorf("a pod UID twice: %v", err)
	}
}

// What the Workload API makes of each outcome, through the agent's
// MultiAttestor: a container never listed, or a kubelet that keeps
// refusing, ends as ErrAttestorTimeout (Unavailable, retry); an answer
// that cannot be trusted leaves the k8s selectors out, with the reason.
func TestAttestThroughMultiAttestor(t *testing.T) {
	e := newSecureEnv(t, `poll_retry_interval = "10ms"`)
	pods := testPods(3)
	e.kubelet.pods = func(int) []corev1.Pod { return pods }
	log, _ := testkit.NewLogger(hclog.Warn)
	m := attestor.NewMultiAttestor(log, 2*time.Second, attestor.Plugin{Name: PluginName, Attestor: e.a})
	ctx := testkit.Context(t, time.Minute)

	sels, err := m.Attest(ctx, e.inPod(4001, string(pods[1].UID), containerOf(pods[1], "app")))
	if err != nil || !slices.Equal(values(sels), wantPod1(true)) {
		t.Errorf("listed: %q, %v", values(sels), err)
	}
	if _, err := m.Attest(ctx, e.inPod(4002, podUID(99), hexID("c"))); !errors.Is(err, attestor.ErrAttestorTimeout) {
		t.Errorf("never listed: %v; want ErrAttestorTimeout", err)
	}
	pods[2].Status.EphemeralContainerStatuses = []corev1.ContainerStatus{{Name: "dbg", ContainerID: "containerd://" + hexID("dbg")}}
	e.kubelet.set(func(k *fakeKubelet) { k.allowed = map[string]bool{} })
	if _, err := m.Attest(ctx, e.inPod(4003, podUID(98), hexID("c"))); !errors.Is(err, attestor.ErrAttestorTimeout) {
		t.Errorf("kubelet refusing: %v; want ErrAttestorTimeout", err)
	}
	e.kubelet.set(func(k *fakeKubelet) { k.allowed = map[string]bool{"system:serviceaccount:spire:spire-agent": true} })
	_, err = m.Attest(ctx, e.inPod(4004, string(pods[2].UID), hexID("dbg")))
	if !errors.Is(err, attestor.ErrNoSelectors) || !strings.Contains(err.Error(), "ephemeral container") {
		t.Errorf("an ephemeral container: %v; want ErrNoSelectors saying why", err)
	}
}
