package k8s_test

import (
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/attestor"
	"github.com/lanyard-dev/lanyard/conf"
	"github.com/lanyard-dev/lanyard/internal/testkit"
	k8sattestor "github.com/lanyard-dev/lanyard/plugins/workloadattestor/k8s"
	"github.com/lanyard-dev/lanyard/test/k8s/k8stest"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// TestK8sBrokerPolicy runs the k8s plugin_data's experimental.broker
// against a real kube-apiserver (RBAC) and kubelet: access_policy
// "enforced" asks real SubjectAccessReviews, which RBAC grants one broker
// (impersonate-via-spire on pods) and not another; pod_reference_scope
// "cluster" finds a pod of another node through the API server by name and
// by UID; "agent_node" does not; a PID reference is authorized the same
// way.
func TestK8sBrokerPolicy(t *testing.T) {
	c := k8stest.Start(t)
	var (
		allowed   = spiffeid.RequireFromString("spiffe://example.org/broker")
		denied    = spiffeid.RequireFromString("spiffe://example.org/other-broker")
		nodeScope = spiffeid.RequireFromString("spiffe://example.org/node-broker")
	)
	// What docs/attestors.md tells an operator to grant: the agent may
	// create reviews (it already gets and lists pods), the brokers may
	// impersonate-via-spire pods.
	rule := func(group, resource, verb string) map[string]any {
		return map[string]any{"apiGroups": []string{group}, "resources": []string{resource}, "verbs": []string{verb}}
	}
	for name, r := range map[string]map[string]any{
		"lanyard-agent-broker-reviews": rule("authorization.k8s.io", "subjectaccessreviews", "create"),
		"spire-broker-impersonation":   rule("", "pods", "impersonate-via-spire"),
	} {
		role := map[string]any{"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": map[string]any{"name": name}, "rules": []any{r}}
		if err := c.Do("POST", "/apis/rbac.authorization.k8s.io/v1/clusterroles", role, nil); err != nil {
			t.Fatal(err)
		}
	}
	c.BindClusterRole("lanyard-agent-broker-reviews", "ServiceAccount", k8stest.AgentNamespace, k8stest.AgentServiceAccount)
	// One binding for both brokers (a SPIFFE ID cannot be in an object's
	// name, as BindClusterRole would put it).
	binding := map[string]any{
		"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
		"metadata": map[string]any{"name": "spire-broker-impersonation"},
		"roleRef":  map[string]any{"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "spire-broker-impersonation"},
		"subjects": []any{
			map[string]any{"kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": allowed.String()},
			map[string]any{"kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": nodeScope.String()},
		},
	}
	if err := c.Do("POST", "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", binding, nil); err != nil {
		t.Fatal(err)
	}

	// The agent as in its pod: the API server's address in the
	// environment.
	u, err := url.Parse(c.APIServer)
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("KUBERNETES_SERVICE_HOST", u.Hostname())
	t.Setenv("KUBERNETES_SERVICE_PORT", u.Port())
	a := agentAttestor(t, c, fmt.Sprintf(`
            api_server_ca_path = %q
            experimental {
                broker {
                    access_policy = "enforced"
                    brokers = [
                        { id = %q, pod_reference_scope = "cluster" },
                        { id = %q, pod_reference_scope = "cluster" },
                        { id = %q },
                    ]
                }
            }`, c.ClusterCAPath(), allowed, denied, nodeScope))
	ctx := testkit.Context(t, 2*time.Minute)

	localRef := c.CreatePod(k8stest.PodSpec{Name: "brokered", ServiceAccount: "default", Labels: map[string]string{"app": "brokered"}, Args: []string{"sleep"}}.Manifest())
	t.Cleanup(func() { c.DeletePod(localRef) })
	// A pod bound to another node: only the API server has it.
	far := k8stest.PodSpec{Name: "far", ServiceAccount: "default", Args: []string{"sleep"}}.Manifest()
	far["spec"].(map[string]any)["nodeName"] = "another-node"
	var created struct {
		Metadata struct {
			UID string `json:"uid"`
		} `json:"metadata"`
	}
	if err := c.Do("POST", "/api/v1/namespaces/default/pods", far, &created); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.DeletePod(k8stest.PodRef{Namespace: "default", Name: "far"}) })
	local := c.WaitRunning(localRef)

	t.Run("enforced: RBAC allows one broker and denies another", func(t *testing.T) {
		sels, err := a.AttestPod(ctx, allowed, "default", "brokered", "")
		if got := selectorStrings(sels); err != nil || !slices.Contains(got, "k8s:pod-uid:"+local.UID) || !slices.Contains(got, "k8s:pod-label:app:brokered") {
			t.Errorf("allowed broker: %q, %v", got, err)
		}
		_, err = a.AttestPod(ctx, denied, "default", "brokered", "")
		if !errors.Is(err, attestor.ErrBrokerNotAuthorized) {
			t.Errorf("denied broker: %v, want ErrBrokerNotAuthorized", err)
		}
		t.Logf("denied: %v", err)
	})

	t.Run("cluster scope: another node's pod through the API server", func(t *testing.T) {
		for _, ref := range [][3]string{{"default", "far", ""}, {"", "", created.Metadata.UID}, {"default", "far", created.Metadata.UID}} {
			sels, err := a.AttestPod(ctx, allowed, ref[0], ref[1], ref[2])
			got := selectorStrings(sels)
			if err != nil || !slices.Contains(got, "k8s:pod-uid:"+created.Metadata.UID) || !slices.Contains(got, "k8s:node-name:another-node") || !slices.Contains(got, "k8s:pod-name:far") {
				t.Errorf("AttestPod(%q): %q, %v", ref, got, err)
			}
		}
		if _, err := a.AttestPod(ctx, allowed, "default", "far", local.UID); !errors.Is(err, k8sattestor.ErrPodMismatch) {
			t.Errorf("far with another pod's UID: %v, want ErrPodMismatch", err)
		}
		if _, err := a.AttestPod(ctx, allowed, "default", "nowhere", ""); !errors.Is(err, k8sattestor.ErrPodNotFound) {
			t.Errorf("a pod that does not exist: %v, want ErrPodNotFound", err)
		}
		if _, err := a.AttestPod(ctx, allowed, "", "", "00000000-0000-4000-8000-000000000000"); !errors.Is(err, k8sattestor.ErrPodNotFound) {
			t.Errorf("a UID that does not exist: %v, want ErrPodNotFound", err)
		}
	})

	t.Run("agent_node scope: this node's pods only", func(t *testing.T) {
		if sels, err := a.AttestPod(ctx, nodeScope, "default", "brokered", local.UID); err != nil || !slices.Contains(selectorStrings(sels), "k8s:pod-uid:"+local.UID) {
			t.Errorf("this node's pod: %q, %v", selectorStrings(sels), err)
		}
		for _, ref := range [][3]string{{"default", "far", ""}, {"", "", created.Metadata.UID}} {
			if _, err := a.AttestPod(ctx, nodeScope, ref[0], ref[1], ref[2]); !errors.Is(err, k8sattestor.ErrPodNotFound) {
				t.Errorf("another node's pod %q: %v, want ErrPodNotFound", ref, err)
			}
		}
	})

	t.Run("a PID reference", func(t *testing.T) {
		pid := int32(c.ContainerPIDs(local)["workload"])
		if err := a.AuthorizeBrokerPID(ctx, allowed, pid); err != nil {
			t.Errorf("allowed broker: %v", err)
		}
		if err := a.AuthorizeBrokerPID(ctx, denied, pid); !errors.Is(err, attestor.ErrBrokerNotAuthorized) {
			t.Errorf("denied broker: %v, want ErrBrokerNotAuthorized", err)
		}
		unlisted := spiffeid.RequireFromString("spiffe://example.org/unlisted")
		if err := a.AuthorizeBrokerPID(ctx, unlisted, pid); !errors.Is(err, attestor.ErrBrokerNotAuthorized) {
			t.Errorf("unlisted broker: %v, want ErrBrokerNotAuthorized", err)
		}
		// The test process runs in no pod: nothing to authorize.
		if err := a.AuthorizeBrokerPID(ctx, unlisted, int32(os.Getpid())); err != nil {
			t.Errorf("a process in no pod: %v", err)
		}
	})
}

// agentAttestor is the k8s attestor as the agent's DaemonSet runs it on
// c's node (its service account's token, the kubelet by node name), with
// more plugin_data.
func agentAttestor(t *testing.T, c *k8stest.Cluster, more string) *k8sattestor.Attestor {
	t.Helper()
	token := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(token, []byte(c.Token(k8stest.AgentNamespace, k8stest.AgentServiceAccount, "", "")), 0o600); err != nil {
		t.Fatal(err)
	}
	sec, err := conf.NewSection("agent.conf", fmt.Sprintf(`
            kubelet_secure_port = %d
            kubelet_ca_path = %q
            token_path = %q
            node_name = "localhost"
            poll_retry_interval = "100ms"
            %s`, c.KubeletPort, c.KubeletCAPath(), token, more))
	if err != nil {
		t.Fatal(err)
	}
	plugin, err := k8sattestor.New(attestor.PluginConfig{Name: k8sattestor.PluginName, Data: sec, Log: hclog.NewNullLogger()})
	if err != nil {
		t.Fatal(err)
	}
	return plugin.(*k8sattestor.Attestor)
}
