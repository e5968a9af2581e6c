package k8s_test

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/attestor"
	"github.com/lanyard-dev/lanyard/attestor/selector"
	"github.com/lanyard-dev/lanyard/internal/testkit"
	k8sattestor "github.com/lanyard-dev/lanyard/plugins/workloadattestor/k8s"
	"github.com/lanyard-dev/lanyard/test/k8s/k8stest"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// TestK8sAttestPodByReference runs AttestPod, the attestation of a Broker
// API KubernetesObjectReference to a pod, against a real kubelet and
// kube-apiserver: a pod by namespace and name, by UID and by both gets
// exactly the pod-level part of what a process in it gets; a static pod
// is named by its kubelet UID, not its mirror pod's; a pod bound to
// another node, a UID of another pod and a deleted pod are refused.
func TestK8sAttestPodByReference(t *testing.T) {
	c := k8stest.Start(t)
	a := agentAttestor(t, c, fmt.Sprintf(`experimental { broker {
		access_policy = "permissive"
		brokers = [{ id = %q }]
	} }`, refBroker))
	ctx := testkit.Context(t, 2*time.Minute)

	apiRef := c.CreatePod(k8stest.PodSpec{Name: "podref", ServiceAccount: "default", Labels: map[string]string{"app": "web"}, Args: []string{"sleep"}}.Manifest())
	staticRef := c.RunStaticPod(k8stest.PodSpec{Name: "podref", Args: []string{"sleep"}}.Manifest())
	// A pod bound to another node: the API server has it, this kubelet
	// never lists it.
	elsewhere := k8stest.PodSpec{Name: "elsewhere", ServiceAccount: "default", Args: []string{"sleep"}}.Manifest()
	elsewhere["spec"].(map[string]any)["nodeName"] = "another-node"
	var created struct {
		Metadata struct {
			UID string `json:"uid"`
		} `json:"metadata"`
	}
	if err := c.Do("POST", "/api/v1/namespaces/default/pods", elsewhere, &created); err != nil {
		t.Fatal(err)
	}
	api, static := c.WaitRunning(apiRef), c.WaitRunning(staticRef)

	t.Run("an API pod", func(t *testing.T) {
		// What a process in the pod gets, without its container's part.
		bypid, err := a.Attest(ctx, attestor.Process{PID: int32(c.ContainerPIDs(api)["workload"])})
		if err != nil {
			t.Fatal(err)
		}
		want := podLevel(bypid)
		for _, must := range []string{"k8s:pod-uid:" + api.UID, "k8s:pod-name:podref", "k8s:ns:default", "k8s:sa:default",
			"k8s:node-name:" + c.NodeName, "k8s:pod-label:app:web", "k8s:pod-image-count:1"} {
			if !slices.Contains(want, must) {
				t.Errorf("the PID path's selectors %q lack %s", want, must)
			}
		}
		for _, ref := range [][3]string{{"default", "podref", ""}, {"", "", api.UID}, {"default", "podref", api.UID}} {
			sels, err := a.AttestPod(ctx, refBroker, ref[0], ref[1], ref[2])
			if got := selectorStrings(sels); err != nil || !slices.Equal(got, want) {
				t.Errorf("AttestPod(%q): got %q, %v; want %q", ref, got, err, want)
			}
		}
	})

	t.Run("a static pod", func(t *testing.T) {
		for _, ref := range [][3]string{{"default", static.Name, ""}, {"", "", static.UID}, {"default", static.Name, static.UID}} {
			sels, err := a.AttestPod(ctx, refBroker, ref[0], ref[1], ref[2])
			if got := selectorStrings(sels); err != nil || !slices.Contains(got, "k8s:pod-uid:"+static.UID) || !slices.Contains(got, "k8s:pod-name:"+static.Name) {
				t.Errorf("AttestPod(%q): got %q, %v; want the static pod's selectors", ref, got, err)
			}
		}
		// Its mirror pod's UID is the API server's, which the kubelet does
		// not list.
		var mirror struct {
			Metadata struct {
				UID string `json:"uid"`
			} `json:"metadata"`
		}
		testkit.WaitFor(t, time.Minute, "the static pod's mirror pod", func() bool {
			return c.Do("GET", "/api/v1/namespaces/default/pods/"+static.Name, nil, &mirror) == nil && mirror.Metadata.UID != ""
		})
		if mirror.Metadata.UID == static.UID {
			t.Fatalf("the mirror pod has the static pod's UID %s", static.UID)
		}
		if _, err := a.AttestPod(ctx, refBroker, "", "", mirror.Metadata.UID); !errors.Is(err, k8sattestor.ErrPodNotFound) {
			t.Errorf("by the mirror pod's UID: %v, want ErrPodNotFound", err)
		}
		if _, err := a.AttestPod(ctx, refBroker, "default", static.Name, mirror.Metadata.UID); !errors.Is(err, k8sattestor.ErrPodMismatch) {
			t.Errorf("by name and the mirror pod's UID: %v, want ErrPodMismatch", err)
		}
	})

	t.Run("refusals", func(t *testing.T) {
		for _, tc := range []struct {
			what string
			ref  [3]string
			want error
		}{
			{"a pod on another node, by name", [3]string{"default", "elsewhere", ""}, k8sattestor.ErrPodNotFound},
			{"a pod on another node, by UID", [3]string{"", "", created.Metadata.UID}, k8sattestor.ErrPodNotFound},
			{"another pod's UID", [3]string{"default", "podref", static.UID}, k8sattestor.ErrPodMismatch},
			{"a namespace that is no DNS label", [3]string{"Default", "podref", ""}, k8sattestor.ErrInvalidPodReference},
		} {
			if _, err := a.AttestPod(ctx, refBroker, tc.ref[0], tc.ref[1], tc.ref[2]); !errors.Is(err, tc.want) {
				t.Errorf("%s: %v, want %v", tc.what, err, tc.want)
			}
		}
	})

	c.DeletePod(apiRef)
	t.Run("a deleted pod", func(t *testing.T) {
		// The kubelet no longer lists it; a list cached before that still
		// answers for up to poll_retry_interval, as in SPIRE.
		testkit.WaitFor(t, 30*time.Second, "AttestPod to refuse the deleted pod", func() bool {
			_, err := a.AttestPod(ctx, refBroker, "default", "podref", "")
			return errors.Is(err, k8sattestor.ErrPodNotFound)
		})
		if _, err := a.AttestPod(ctx, refBroker, "", "", api.UID); !errors.Is(err, k8sattestor.ErrPodNotFound) {
			t.Errorf("by UID after deletion: %v, want ErrPodNotFound", err)
		}
	})
	c.DeletePod(staticRef)
	c.DeletePod(k8stest.PodRef{Namespace: "default", Name: "elsewhere"})
}

// refBroker is the broker of the pod_reference_scope "agent_node" tests.
var refBroker = spiffeid.RequireFromString("spiffe://example.org/broker")

// podLevel drops the selectors of the workload's own container.
func podLevel(sels []selector.Selector) []string {
	return slices.DeleteFunc(selectorStrings(sels), func(s string) bool {
		return strings.HasPrefix(s, "k8s:container-")
	})
}

func selectorStrings(sels []selector.Selector) []string {
	out := make([]string, 0, len(sels))
	for _, s := range selector.Sort(sels) {
		out = append(out, s.String())
	}
	return out
}
