package k8s

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/attestor"
	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	authorizationv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
)

var (
	brokerA = spiffeid.RequireFromString("spiffe://example.org/broker-a")
	brokerB = spiffeid.RequireFromString("spiffe://example.org/broker-b")
)

// brokerBlock is an experimental.broker block: brokers maps a broker to
// its pod_reference_scope.
func brokerBlock(policy string, brokers map[spiffeid.ID]string) string {
	var list []string
	for id, scope := range brokers {
		list = append(list, fmt.Sprintf("{ id = %q, pod_reference_scope = %q }", id, scope))
	}
	slices.Sort(list)
	return fmt.Sprintf("experimental { broker {\n  access_policy = %q\n  brokers = [%s]\n} }", policy, strings.Join(list, ", "))
}

// clusterPods are testPods(n) as the API server has them: pod 1 on this
// node (node-a, which the kubelet lists), the rest elsewhere.
func clusterPods(n int) (onNode []corev1.Pod, all []corev1.Pod) {
	all = testPods(n)
	for i := range all {
		if i != 1 {
			all[i].Spec.NodeName = "node-b"
		}
	}
	return []corev1.Pod{all[1]}, all
}

// The broker must be listed in experimental.broker; without the block no
// broker is, and the error says what to add. Nothing is fetched.
func TestAttestPodBrokerNotListed(t *testing.T) {
	for _, tc := range []struct{ hcl, want string }{
		{"", "plugin_data has no experimental.broker block: add one whose brokers list this broker"},
		{brokerBlock("permissive", map[spiffeid.ID]string{brokerA: scopeCluster}), "broker spiffe://example.org/broker-b is not listed in the k8s workload attestor's experimental.broker.brokers"},
	} {
		e, api := newBrokerEnv(t, tc.hcl)
		p := testPod(1)
		_, err := e.a.AttestPod(testkit.Context(t, time.Minute), brokerB, p.Namespace, p.Name, "")
		if !errors.Is(err, attestor.ErrBrokerNotAuthorized) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: %v; want ErrBrokerNotAuthorized saying %q", tc.hcl, err, tc.want)
		}
		// Refused before the reference is looked at.
		if _, err := e.a.AttestPod(context.Background(), brokerB, "", "", ""); !errors.Is(err, attestor.ErrBrokerNotAuthorized) {
			t.Errorf("a malformed reference of an unlisted broker: %v", err)
		}
		if reqs, _ := api.log(); e.kubelet.count() != 0 || len(reqs) != 0 {
			t.Errorf("kubelet requests %d, API requests %q; want none", e.kubelet.count(), reqs)
		}
	}
}

// agent_node: only the kubelet's pods; the API server is never asked.
func TestAttestPodAgentNodeScope(t *testing.T) {
	e, api := newBrokerEnv(t, brokerBlock("permissive", map[spiffeid.ID]string{brokerA: scopeAgentNode}))
	onNode, all := clusterPods(3)
	e.kubelet.pods = func(int) []corev1.Pod { return onNode }
	api.set(func(s *fakeAPIServer) { s.pods = all })
	ctx := testkit.Context(t, time.Minute)

	sels, err := e.a.AttestPod(ctx, brokerA, onNode[0].Namespace, onNode[0].Name, "")
	if got := values(sels); err != nil || !slices.Equal(got, wantPod1(false)) {
		t.Errorf("a pod of this node: %q, %v", got, err)
	}
	for _, ref := range [][3]string{{all[2].Namespace, all[2].Name, ""}, {"", "", string(all[2].UID)}} {
		if _, err := e.a.AttestPod(ctx, brokerA, ref[0], ref[1], ref[2]); !errors.Is(err, ErrPodNotFound) || !errors.Is(err, attestor.ErrWorkloadNotFound) || !strings.Contains(err.Error(), "on this node") {
			t.Errorf("a pod of another node %q: %v, want ErrPodNotFound on this node", ref, err)
		}
	}
	if reqs, _ := api.log(); len(reqs) != 0 {
		t.Errorf("API requests %q; want none", reqs)
	}
}

// cluster: the kubelet first, then the API server: a GET by name, the
// metadata pages and a GET by UID.
func TestAttestPodClusterScope(t *testing.T) {
	e, api := newBrokerEnv(t, brokerBlock("permissive", map[spiffeid.ID]string{brokerA: scopeCluster}))
	onNode, all := clusterPods(600)
	e.kubelet.pods = func(int) []corev1.Pod { return onNode }
	api.set(func(s *fakeAPIServer) { s.pods = all })
	ctx := testkit.Context(t, time.Minute)

	// This node's pod: the kubelet answers.
	if sels, err := e.a.AttestPod(ctx, brokerA, "", "", string(onNode[0].UID)); err != nil || !slices.Equal(values(sels), wantPod1(false)) {
		t.Errorf("a pod of this node: %q, %v", values(sels), err)
	}
	if reqs, _ := api.log(); len(reqs) != 0 {
		t.Errorf("API requests %q for a pod of this node; want none", reqs)
	}

	far := all[555] // on the third page of 250
	// What the kubelet's list would give for it.
	want := values(podSelectors(&decodeTestList(t, podListJSON([]corev1.Pod{far})).pods[0]))
	if !slices.Contains(want, "k8s:node-name:node-b") {
		t.Fatalf("want %q", want)
	}
	for _, ref := range [][3]string{{far.Namespace, far.Name, ""}, {"", "", string(far.UID)}, {far.Namespace, far.Name, string(far.UID)}} {
		sels, err := e.a.AttestPod(ctx, brokerA, ref[0], ref[1], ref[2])
		if got := values(sels); err != nil || !slices.Equal(got, want) {
			t.Errorf("another node's pod %q: %q, %v; want %q", ref, got, err, want)
		}
	}
	reqs, _ := api.log()
	wantReqs := []string{
		"GET /api/v1/namespaces/" + far.Namespace + "/pods/" + far.Name,
		"GET /api/v1/pods?limit=250", "GET /api/v1/pods?limit=250&continue=250", "GET /api/v1/pods?limit=250&continue=500",
		"GET /api/v1/namespaces/" + far.Namespace + "/pods/" + far.Name,
		"GET /api/v1/namespaces/" + far.Namespace + "/pods/" + far.Name,
	}
	if !slices.Equal(reqs, wantReqs) {
		t.Errorf("API requests\n%q\nwant\n%q", reqs, wantReqs)
	}

	for _, tc := range []struct {
		what string
		ref  [3]string
		want error
	}{
		{"no such name", [3]string{far.Namespace, "gone", ""}, ErrPodNotFound},
		{"no such UID", [3]string{"", "", podUID(99999)}, ErrPodNotFound},
		{"another pod's UID", [3]string{far.Namespace, far.Name, string(all[3].UID)}, ErrPodMismatch},
		{"this node's pod, another UID", [3]string{onNode[0].Namespace, onNode[0].Name, string(far.UID)}, ErrPodMismatch},
	} {
		_, err := e.a.AttestPod(ctx, brokerA, tc.ref[0], tc.ref[1], tc.ref[2])
		if !errors.Is(err, tc.want) || !errors.Is(err, attestor.ErrWorkloadNotFound) {
			t.Errorf("%s: %v, want %v", tc.what, err, tc.want)
		}
	}

	// The kubelet failing: the API server still answers, this node's pod
	// too.
	e.kubelet.set(func(k *fakeKubelet) { k.status = 500 })
	testkit.WaitFor(t, 30*time.Second, "the API server to answer while the kubelet fails", func() bool {
		sels, err := e.a.AttestPod(ctx, brokerA, onNode[0].Namespace, onNode[0].Name, string(onNode[0].UID))
		return err == nil && slices.Equal(values(sels), wantPod1(false)) && e.kubelet.count() > 1
	})
}

// The API server's answers are bounded and its errors are Unavailable's:
// not NotFound, not PermissionDenied.
func TestAttestPodAPIServerFailures(t *testing.T) {
	e, api := newBrokerEnv(t, brokerBlock("permissive", map[spiffeid.ID]string{brokerA: scopeCluster}))
	_, all := clusterPods(3)
	api.set(func(s *fakeAPIServer) { s.pods = all; s.pageBytes = maxPodMetadataPage })
	ctx := testkit.Context(t, time.Minute)
	unavailable := func(what string, err error, says string) {
		t.Helper()
		if err == nil || errors.Is(err, attestor.ErrWorkloadNotFound) || errors.Is(err, attestor.ErrBrokerNotAuthorized) || errors.Is(err, attestor.ErrInvalidReference) || !strings.Contains(err.Error(), says) {
			t.Errorf("%s: %v; want an Unavailable error saying %q", what, err, says)
		}
	}
	_, err := e.a.AttestPod(ctx, brokerA, "", "", string(all[2].UID))
	unavailable("a page past the bound", err, fmt.Sprintf("the answer is larger than %d bytes", maxPodMetadataPage))

	api.set(func(s *fakeAPIServer) { s.token = "another" })
	_, err = e.a.AttestPod(ctx, brokerA, all[2].Namespace, all[2].Name, "")
	unavailable("a refused token", err, "401 Unauthorized: the token in")
	// Read again after the refusal: a rotated token is taken.
	api.set(func(s *fakeAPIServer) { s.token = "rotated" })
	e.writeToken("rotated")
	e.kubelet.set(func(k *fakeKubelet) { k.tokens["rotated"] = "system:serviceaccount:spire:spire-agent" })
	if _, err := e.a.AttestPod(ctx, brokerA, all[2].Namespace, all[2].Name, ""); err != nil {
		t.Errorf("after the token's rotation: %v", err)
	}

	// A redirect is not followed: the token goes to the API server only.
	elsewhere := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		t.Errorf("the redirect was followed, with Authorization %q", r.Header.Get("Authorization"))
	}))
	defer elsewhere.Close()
	api.set(func(s *fakeAPIServer) { s.redirect = elsewhere.URL })
	_, err = e.a.AttestPod(ctx, brokerA, all[2].Namespace, all[2].Name, "")
	unavailable("a redirect", err, "307 Temporary Redirect")
	api.set(func(s *fakeAPIServer) { s.redirect = "" })

	e.env["KUBERNETES_SERVICE_HOST"] = ""
	e.build(brokerBlock("permissive", map[spiffeid.ID]string{brokerA: scopeCluster}) + "\npoll_retry_interval = \"1ms\"\nkubelet_secure_port = " + fmt.Sprint(e.kubelet.port()) + "\nkubelet_ca_path = \"" + e.path("ca.crt") + "\"\ntoken_path = \"" + e.path("token") + "\"")
	_, err = e.a.AttestPod(ctx, brokerA, all[2].Namespace, all[2].Name, "")
	unavailable("outside a pod", err, "KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are not set")
}

// enforced: a SubjectAccessReview exactly as SPIRE sends it decides, on
// the pod found (a UID reference's namespace and name too).
func TestAttestPodEnforced(t *testing.T) {
	e, api := newBrokerEnv(t, brokerBlock("enforced", map[spiffeid.ID]string{brokerA: scopeCluster, brokerB: scopeAgentNode}))
	onNode, all := clusterPods(3)
	e.kubelet.pods = func(int) []corev1.Pod { return onNode }
	api.set(func(s *fakeAPIServer) {
		s.pods = all
		s.allow = func(spec authorizationv1.SubjectAccessReviewSpec) (bool, string) {
			if spec.User == brokerA.String() {
				return true, `RBAC: allowed by ClusterRoleBinding "brokers" of ClusterRole "spire-broker-impersonation" to User "spiffe://example.org/broker-a"`
			}
			return false, ""
		}
	})
	ctx := testkit.Context(t, time.Minute)

	sels, err := e.a.AttestPod(ctx, brokerA, "", "", string(all[2].UID))
	if err != nil || !slices.Contains(values(sels), "k8s:pod-uid:"+string(all[2].UID)) {
		t.Fatalf("allowed: %q, %v", values(sels), err)
	}
	_, err = e.a.AttestPod(ctx, brokerB, onNode[0].Namespace, onNode[0].Name, "")
	if !errors.Is(err, attestor.ErrBrokerNotAuthorized) || !strings.Contains(err.Error(), "does not allow broker spiffe://example.org/broker-b to impersonate-via-spire pod "+onNode[0].Namespace+"/"+onNode[0].Name) {
		t.Errorf("denied: %v", err)
	}
	_, reviews := api.log()
	want := []authorizationv1.SubjectAccessReviewSpec{
		{User: brokerA.String(), ResourceAttributes: &authorizationv1.ResourceAttributes{Namespace: all[2].Namespace, Verb: "impersonate-via-spire", Group: "", Resource: "pods", Name: all[2].Name}},
		{User: brokerB.String(), ResourceAttributes: &authorizationv1.ResourceAttributes{Namespace: onNode[0].Namespace, Verb: "impersonate-via-spire", Group: "", Resource: "pods", Name: onNode[0].Name}},
	}
	if len(reviews) != len(want) {
		t.Fatalf("%d reviews, want %d", len(reviews), len(want))
	}
	for i := range want {
		if !reflect.DeepEqual(reviews[i].Spec, want[i]) {
			t.Errorf("review %d:\n%+v\nwant\n%+v", i, reviews[i].Spec, want[i])
		}
	}

	// A pod not found is not reviewed.
	if _, err := e.a.AttestPod(ctx, brokerA, "team-9", "gone", ""); !errors.Is(err, ErrPodNotFound) {
		t.Errorf("no such pod: %v", err)
	}
	// A review that cannot be made: Unavailable, with what to grant.
	api.set(func(s *fakeAPIServer) { s.sarStatus = 403 })
	_, err = e.a.AttestPod(ctx, brokerA, onNode[0].Namespace, onNode[0].Name, "")
	if err == nil || errors.Is(err, attestor.ErrBrokerNotAuthorized) || !strings.Contains(err.Error(), "create on subjectaccessreviews.authorization.k8s.io") || !strings.Contains(err.Error(), `cannot create resource \"subjectaccessreviews\"`) {
		t.Errorf("a review refused: %v", err)
	}
	if _, reviews := api.log(); len(reviews) != 3 {
		t.Errorf("%d reviews, want 3", len(reviews))
	}
}

// permissive asks no review.
func TestAttestPodPermissiveNoReview(t *testing.T) {
	e, api := newBrokerEnv(t, brokerBlock("permissive", map[spiffeid.ID]string{brokerA: scopeAgentNode}))
	onNode, _ := clusterPods(2)
	e.kubelet.pods = func(int) []corev1.Pod { return onNode }
	if _, err := e.a.AttestPod(testkit.Context(t, time.Minute), brokerA, onNode[0].Namespace, onNode[0].Name, ""); err != nil {
		t.Fatal(err)
	}
	if reqs, _ := api.log(); len(reqs) != 0 {
		t.Errorf("API requests %q; want none", reqs)
	}
}

// AuthorizeBrokerPID: nothing to decide outside a pod or without the
// block; with it, the broker must be listed and, enforced, allowed on the
// process's pod.
func TestAuthorizeBrokerPID(t *testing.T) {
	onNode, _ := clusterPods(2)
	pod := onNode[0]
	for _, tc := range []struct {
		name, hcl string
		broker    spiffeid.ID
		inPod     bool
		want      error
		reviews   int
	}{
		{"no block, in a pod", "", brokerB, true, nil, 0},
		{"not in a pod, unlisted", brokerBlock("enforced", map[spiffeid.ID]string{brokerA: scopeAgentNode}), brokerB, false, nil, 0},
		{"unlisted", brokerBlock("permissive", map[spiffeid.ID]string{brokerA: scopeAgentNode}), brokerB, true, attestor.ErrBrokerNotAuthorized, 0},
		{"permissive, listed", brokerBlock("permissive", map[spiffeid.ID]string{brokerA: scopeAgentNode}), brokerA, true, nil, 0},
		{"enforced, allowed", brokerBlock("enforced", map[spiffeid.ID]string{brokerA: scopeAgentNode, brokerB: scopeCluster}), brokerA, true, nil, 1},
		{"enforced, denied", brokerBlock("enforced", map[spiffeid.ID]string{brokerA: scopeAgentNode, brokerB: scopeCluster}), brokerB, true, attestor.ErrBrokerNotAuthorized, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e, api := newBrokerEnv(t, tc.hcl)
			e.kubelet.pods = func(int) []corev1.Pod { return onNode }
			api.set(func(s *fakeAPIServer) {
				s.allow = func(spec authorizationv1.SubjectAccessReviewSpec) (bool, string) {
					return spec.User == brokerA.String(), "decided by the test"
				}
			})
			proc := attestor.Process{PID: 4242}
			if tc.inPod {
				proc = e.inPod(4242, string(pod.UID), containerOf(pod, "app"))
			} else {
				e.writeCgroup(4242, "0::/system.slice/sshd.service\n")
			}
			err := e.a.AuthorizeBrokerPID(testkit.Context(t, time.Minute), tc.broker, proc.PID)
			if tc.want == nil && err != nil || tc.want != nil && !errors.Is(err, tc.want) {
				t.Errorf("%v, want %v", err, tc.want)
			}
			_, reviews := api.log()
			if len(reviews) != tc.reviews {
				t.Fatalf("%d reviews, want %d", len(reviews), tc.reviews)
			}
			if tc.reviews > 0 {
				ra := reviews[0].Spec.ResourceAttributes
				if reviews[0].Spec.User != tc.broker.String() || ra.Namespace != pod.Namespace || ra.Name != pod.Name || ra.Resource != "pods" || ra.Verb != impersonateVerb {
					t.Errorf("review %+v %+v", reviews[0].Spec, ra)
				}
			}
		})
	}
	e, _ := newBrokerEnv(t, brokerBlock("enforced", map[spiffeid.ID]string{brokerA: scopeAgentNode}))
	if err := e.a.AuthorizeBrokerPID(context.Background(), brokerA, 999999); !errors.Is(err, attestor.ErrWorkloadNotFound) {
		t.Errorf("a PID that does not exist: %v", err)
	}
}

// disable_kubelet_client: the kubelet is never asked; "cluster" brokers
// are answered by the API server alone, processes in pods get an error.
func TestDisableKubeletClient(t *testing.T) {
	e, api := newBrokerEnv(t, brokerBlock("enforced", map[spiffeid.ID]string{brokerA: scopeCluster}))
	s := e.a.s
	// The kubelet settings are refused with disable_kubelet_client: build
	// it bare, then give its API client the test's token (in a pod it is
	// the service account's, token_path's default).
	a, _, err := buildAttestor("disable_kubelet_client = true\napi_server_ca_path = \""+e.path("api-ca.crt")+"\"\n"+brokerBlock("enforced", map[spiffeid.ID]string{brokerA: scopeCluster}), e.env, nil)
	if err != nil {
		t.Fatal(err)
	}
	s.noKubelet, s.tokenPath = true, e.path("token")
	a.api = newAPIClient(s, nil)
	onNode, all := clusterPods(3)
	e.kubelet.pods = func(int) []corev1.Pod { return onNode }
	api.set(func(s *fakeAPIServer) {
		s.pods = all
		s.allow = func(authorizationv1.SubjectAccessReviewSpec) (bool, string) { return true, "" }
	})
	ctx := testkit.Context(t, time.Minute)
	for _, ref := range [][3]string{{onNode[0].Namespace, onNode[0].Name, ""}, {"", "", string(all[2].UID)}} {
		if _, err := a.AttestPod(ctx, brokerA, ref[0], ref[1], ref[2]); err != nil {
			t.Errorf("%q: %v", ref, err)
		}
	}
	proc := e.inPod(4242, string(onNode[0].UID), containerOf(onNode[0], "app"))
	if _, err := a.Attest(ctx, proc); !errors.Is(err, errKubeletDisabled) {
		t.Errorf("Attest of a process in a pod: %v", err)
	}
	if err := a.AuthorizeBrokerPID(ctx, brokerA, proc.PID); !errors.Is(err, errKubeletDisabled) {
		t.Errorf("AuthorizeBrokerPID: %v", err)
	}
	if n := e.kubelet.count(); n != 0 {
		t.Errorf("%d kubelet requests, want none", n)
	}
}

// A streamed pod is checked again every few seconds: an allowed review
// stands for reviewTTL, a denial is asked again; a UID found once is read
// by one GET, and its pod gone is NotFound without a list.
func TestAPIServerCaches(t *testing.T) {
	e, api := newBrokerEnv(t, brokerBlock("enforced", map[spiffeid.ID]string{brokerA: scopeCluster, brokerB: scopeCluster}))
	_, all := clusterPods(600)
	api.set(func(s *fakeAPIServer) {
		s.pods = all
		s.allow = func(spec authorizationv1.SubjectAccessReviewSpec) (bool, string) {
			return spec.User == brokerA.String(), ""
		}
	})
	ctx := testkit.Context(t, time.Minute)
	far := all[555]
	for range 3 {
		if _, err := e.a.AttestPod(ctx, brokerA, "", "", string(far.UID)); err != nil {
			t.Fatal(err)
		}
		if _, err := e.a.AttestPod(ctx, brokerB, "", "", string(far.UID)); !errors.Is(err, attestor.ErrBrokerNotAuthorized) {
			t.Fatal(err)
		}
	}
	reqs, reviews := api.log()
	lists := 0
	for _, r := range reqs {
		if strings.HasPrefix(r, "GET /api/v1/pods?") {
			lists++
		}
	}
	if lists != 3 || len(reviews) != 4 {
		t.Errorf("%d list pages, %d reviews; want 3 (one lookup) and 4 (brokerA once, brokerB every time):\n%q", lists, len(reviews), reqs)
	}

	// The pod deleted: one GET says so.
	api.set(func(s *fakeAPIServer) { s.pods = slices.Delete(slices.Clone(all), 555, 556); s.requests = nil })
	if _, err := e.a.AttestPod(ctx, brokerA, "", "", string(far.UID)); !errors.Is(err, ErrPodNotFound) {
		t.Errorf("deleted: %v", err)
	}
	if reqs, _ := api.log(); !slices.Equal(reqs, []string{"GET /api/v1/namespaces/" + far.Namespace + "/pods/" + far.Name}) {
		t.Errorf("requests for a deleted pod: %q", reqs)
	}
}

func TestReviewCacheExpiresAndBounds(t *testing.T) {
	var c reviewCache
	now := time.Date(2026, 11, 30, 12, 0, 0, 0, time.UTC)
	k := reviewKey{"spiffe://example.org/a", "ns", "pod"}
	c.remember(k, now)
	if !c.has(k, now.Add(reviewTTL-time.Nanosecond)) || c.has(k, now.Add(reviewTTL)) {
		t.Error("an allowed review stands for reviewTTL exactly")
	}
	for i := range 2 * maxCached {
		c.remember(reviewKey{"u", "ns", fmt.Sprint(i)}, now)
	}
	if n := len(c.allowed); n > maxCached {
		t.Errorf("%d cached, bound %d", n, maxCached)
	}
	var names podNames
	for i := range 2 * maxCached {
		names.put(fmt.Sprint(i), "ns", "pod")
	}
	if n := len(names.byUID); n > maxCached {
		t.Errorf("%d names cached, bound %d", n, maxCached)
	}
}
