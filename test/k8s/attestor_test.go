package k8s_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/lanyard-dev/lanyard/test/k8s/k8stest"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// ownerUID is the owner reference of the selectors pod; owner references
// are free text where nothing collects garbage.
const ownerUID = "0b6ac0e1-5d8c-4b9f-9f4e-6a1c2b3d4e5f"

// selectorEntries grant one SPIFFE ID per k8s selector kind, so that the
// SVIDs a pod gets show which selectors it had. %s is the extra entries
// a test adds once it knows the pods' UIDs.
const selectorEntries = `
            entry {
                spiffe_id = "spiffe://example.org/ns/default/sa/default"
                selectors = ["k8s:ns:default", "k8s:sa:default"]
            }
            entry {
                spiffe_id = "spiffe://example.org/pod-name"
                selectors = ["k8s:pod-name:selectors"]
            }
            entry {
                spiffe_id = "spiffe://example.org/pod-label"
                selectors = ["k8s:pod-label:app:web"]
            }
            entry {
                spiffe_id = "spiffe://example.org/pod-owner"
                selectors = ["k8s:pod-owner:ReplicaSet:web-5d8c"]
            }
            entry {
                spiffe_id = "spiffe://example.org/pod-owner-uid"
                selectors = ["k8s:pod-owner-uid:ReplicaSet:` + ownerUID + `"]
            }
            entry {
                spiffe_id = "spiffe://example.org/pod-image"
                selectors = ["k8s:pod-image:` + k8stest.WorkloadImageAlias + `", "k8s:pod-image-count:1"]
            }
            entry {
                spiffe_id = "spiffe://example.org/pod-init-image"
                selectors = ["k8s:pod-init-image:` + k8stest.WorkloadImage + `", "k8s:pod-init-image-count:1"]
            }
            entry {
                spiffe_id = "spiffe://example.org/container"
                selectors = ["k8s:container-name:workload", "k8s:container-image:` + k8stest.WorkloadImageAlias + `"]
            }
            entry {
                spiffe_id = "spiffe://example.org/other-tag"
                selectors = ["k8s:container-image:` + k8stest.WorkloadImage + `", "k8s:ns:default"]
            }
            entry {
                spiffe_id = "spiffe://example.org/node-name"
                selectors = ["k8s:node-name:` + k8stest.DefaultNodeName + `", "k8s:ns:default"]
            }
            entry {
                spiffe_id = "spiffe://example.org/static"
                selectors = ["k8s:pod-name:static-` + k8stest.DefaultNodeName + `"]
            }
%s`

// k8sAgentConfig is an agent on the embedded CA with only the k8s workload
// attestor: %[1]s data dir, %[2]s socket, %[3]s the attestor's plugin_data,
// %[4]s the entries.
const k8sAgentConfig = `agent {
    trust_domain = "example.org"
    data_dir = "%[1]s"
    socket_path = "%[2]s"
}
plugins {
    WorkloadAttestor "k8s" {
        plugin_data {
%[3]s
        }
    }
    UpstreamAuthority "local" {
        plugin_data {
%[4]s
        }
    }
}
`

type k8sAgent struct {
	proc     *testkit.Process
	conf     string
	dataDir  string
	socket   string
	attestor string
}

func startK8sAgent(t *testing.T, socket, attestorData, extraEntries string) *k8sAgent {
	t.Helper()
	a := &k8sAgent{conf: filepath.Join(t.TempDir(), "agent.conf"), dataDir: t.TempDir(), socket: socket, attestor: attestorData}
	a.write(t, extraEntries)
	p, err := testkit.Start(t, lanyardBin, "run", "-config", a.conf)
	if err != nil {
		t.Fatal(err)
	}
	a.proc = p
	if err := p.WaitServing(socket, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	return a
}

func (a *k8sAgent) write(t *testing.T, extraEntries string) {
	t.Helper()
	body := fmt.Sprintf(k8sAgentConfig, a.dataDir, a.socket, a.attestor, fmt.Sprintf(selectorEntries, extraEntries))
	if err := os.WriteFile(a.conf, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
}

// reload rewrites the config with extraEntries and waits for the agent to
// take it.
func (a *k8sAgent) reload(t *testing.T, extraEntries string) {
	t.Helper()
	before := strings.Count(a.proc.Logs.String(), "Reloaded the config")
	a.write(t, extraEntries)
	if err := a.proc.Cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	testkit.WaitFor(t, 30*time.Second, "the agent to reload its config", func() bool {
		return strings.Count(a.proc.Logs.String(), "Reloaded the config") > before
	})
}

// svidsOf waits for a line of the pod's workload that lists the IDs want,
// and returns the IDs of its first line, which it logged the moment its
// container started.
func svidsOf(t *testing.T, c *k8stest.Cluster, pod *k8stest.Pod, want []string) (first string) {
	t.Helper()
	slices.Sort(want)
	c.WaitLog(pod, "workload", func(line string) bool {
		ids, ok := strings.CutPrefix(line, "svid ")
		if !ok {
			return false
		}
		got := strings.Fields(ids)
		slices.Sort(got)
		return slices.Equal(got, want)
	})
	return c.Logs(pod, "workload")[0]
}

// TestK8sWorkloadAttestor runs the k8s workload attestor against a real
// kubelet: every selector kind, static and API pods, a pod that matches no
// entry, a process that is in no pod, the secure and the read-only port,
// and a workload that fetches the moment its container starts.
func TestK8sWorkloadAttestor(t *testing.T) {
	c := k8stest.Start(t)
	dir := testkit.ShortDir(t, "k8s")
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	token := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(token, []byte(c.Token(k8stest.AgentNamespace, k8stest.AgentServiceAccount, "", "")), 0o600); err != nil {
		t.Fatal(err)
	}
	secure := startK8sAgent(t, filepath.Join(dir, "secure.sock"), fmt.Sprintf(`
            kubelet_secure_port = %d
            kubelet_ca_path = %q
            token_path = %q
            node_name = "localhost"`, c.KubeletPort, c.KubeletCAPath(), token), "")
	readOnly := startK8sAgent(t, filepath.Join(dir, "readonly.sock"), fmt.Sprintf(`
            kubelet_read_only_port = %d`, c.KubeletReadOnlyPort), "")

	// The selectors pod: an API pod of a ReplicaSet, its container from
	// the second tag of the workload image, an init container from the
	// first (SPIRE #4276: the kubelet reports one tag for both).
	selectorsPod := func(name, socket string) map[string]any {
		m := k8stest.PodSpec{Name: name, ServiceAccount: "default", Labels: map[string]string{"app": "web"},
			QoS: k8stest.Burstable, Image: k8stest.WorkloadImageAlias, Socket: socket}.Manifest()
		m["metadata"].(map[string]any)["ownerReferences"] = []any{map[string]any{
			"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-5d8c", "uid": ownerUID,
		}}
		spec := m["spec"].(map[string]any)
		spec["initContainers"] = []any{map[string]any{
			"name": "init", "image": k8stest.WorkloadImage, "imagePullPolicy": "Never", "args": []string{"exit"},
		}}
		return m
	}
	apiRef := c.CreatePod(selectorsPod("selectors", secure.socket))
	staticRef := c.RunStaticPod(k8stest.PodSpec{Name: "static", Socket: secure.socket}.Manifest())
	c.CreateNamespace("other")
	deniedRef := c.CreatePod(k8stest.PodSpec{Name: "denied", Namespace: "other", ServiceAccount: "default", Socket: secure.socket}.Manifest())
	api, static, denied := c.WaitRunning(apiRef), c.WaitRunning(staticRef), c.WaitRunning(deniedRef)

	// Entries by pod UID, now that the pods have theirs.
	byUID := fmt.Sprintf(`
            entry {
                spiffe_id = "spiffe://example.org/pod-uid"
                selectors = ["k8s:pod-uid:%s"]
            }
            entry {
                spiffe_id = "spiffe://example.org/static-uid"
                selectors = ["k8s:pod-uid:%s"]
            }`, api.UID, static.UID)
	secure.reload(t, byUID)

	want := []string{
		"spiffe://example.org/ns/default/sa/default", "spiffe://example.org/pod-name", "spiffe://example.org/pod-label",
		"spiffe://example.org/pod-owner", "spiffe://example.org/pod-owner-uid", "spiffe://example.org/pod-image",
		"spiffe://example.org/pod-init-image", "spiffe://example.org/container", "spiffe://example.org/node-name",
		"spiffe://example.org/pod-uid",
	}
	t.Run("every selector kind, on the secure port", func(t *testing.T) {
		first := svidsOf(t, c, api, slices.Clone(want))
		// It asked the moment its container started, before the kubelet
		// listed its container, and still got its SVIDs at once.
		if !strings.HasPrefix(first, "svid ") {
			t.Errorf("the workload's first fetch, right after its container started, got %q", first)
		}
	})
	t.Run("a static pod", func(t *testing.T) {
		// A static pod's service account is none; its image the first tag.
		svidsOf(t, c, static, []string{"spiffe://example.org/static", "spiffe://example.org/static-uid",
			"spiffe://example.org/other-tag", "spiffe://example.org/node-name"})
	})
	t.Run("a pod that matches no entry", func(t *testing.T) {
		line := c.WaitLog(denied, "workload", func(line string) bool { return strings.HasPrefix(line, "error ") })
		if !strings.Contains(line, "PermissionDenied") {
			t.Errorf("the denied pod got %q, want PermissionDenied", line)
		}
		for _, l := range c.Logs(denied, "workload") {
			if strings.HasPrefix(l, "svid ") {
				t.Errorf("the denied pod got an SVID: %s", l)
			}
		}
	})
	t.Run("a process in no pod", func(t *testing.T) {
		// This test's own process: no k8s selectors, no error, so
		// PermissionDenied at once rather than a kubelet error or a wait
		// for the deadline.
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, err := workloadapi.FetchX509SVID(ctx, workloadapi.WithAddr("unix://"+secure.socket))
		if status.Code(err) != codes.PermissionDenied {
			t.Errorf("a host process got %v, want PermissionDenied", err)
		}
	})
	t.Run("the read-only port", func(t *testing.T) {
		ref := c.CreatePod(selectorsPod("selectors-ro", readOnly.socket))
		pod := c.WaitRunning(ref)
		// pod-name and pod-uid entries name the other pod.
		svidsOf(t, c, pod, slices.DeleteFunc(slices.Clone(want), func(id string) bool {
			return strings.HasSuffix(id, "/pod-name") || strings.HasSuffix(id, "/pod-uid")
		}))
		c.DeletePod(ref)
	})
	c.DeletePod(apiRef)
	c.DeletePod(staticRef)
	c.DeletePod(deniedRef)
}
