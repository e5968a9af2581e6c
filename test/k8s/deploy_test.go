package k8s_test

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"

	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/lanyard-dev/lanyard/test/k8s/k8stest"
	"github.com/lanyard-dev/lanyard/test/spire/spiretest"
)

const (
	// agentNamespace and agentLabel find the DaemonSet's pods.
	agentNamespace = "spire"
	agentSelector  = "app.kubernetes.io/name=lanyard"
	// defaultID is the local overlay's example entry: pods of default/default.
	defaultID = "spiffe://example.org/ns/default/sa/default"
	// socketInPod is where workloads find the agent, as the README says.
	socketInPod = "/run/spire/agent-sockets/spire-agent.sock"
	// rolloutTimeout bounds a DaemonSet rollout on a loaded 2-core machine:
	// the old agent's stop (up to its 15 s grace), the new one's start and
	// its readiness probe (every 5 s).
	rolloutTimeout = 2 * time.Minute
)

// testOverlay is the kustomization the test applies: an overlay as
// shipped (%[1]s), plus only what sharing this machine with other tests
// needs, and %[4]s, the spire overlay's server address. The hostPaths move
// into the cluster's dir, so the test neither reads nor leaves
// /run/spire/agent-sockets and /var/lib/lanyard on the host (and the
// agent's state starts fresh each run). Nothing else: the node is named
// "localhost" and the kubelet listens on 10250, so the attestor's default
// address, https://$MY_NODE_NAME:10250, reaches it as on a real node.
const testOverlay = `apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - %[1]s
patches:
` + daemonSetPatch + `            volumes:
              - {name: agent-sockets, hostPath: {path: %[2]s}}
              - {name: data, hostPath: {path: %[3]s}}
%[4]s`

// daemonSetPatch opens a strategic merge patch of the agent's pod spec.
const daemonSetPatch = `  - patch: |
      apiVersion: apps/v1
      kind: DaemonSet
      metadata: {name: lanyard, namespace: spire}
      spec:
        template:
          spec:
`

// serverAddressPatch is what a user writes into the spire overlay's
// server-address.yaml: where the server is (%[1]s, a port on the node's
// loopback here) and the cluster's name in its k8s_psat config.
const serverAddressPatch = daemonSetPatch + `            containers:
              - name: lanyard
                env:
                  - {name: SPIRE_SERVER_ADDRESS, value: "127.0.0.1"}
                  - {name: SPIRE_SERVER_PORT, value: "%[1]s"}
                  - {name: SPIRE_TRUST_DOMAIN, value: example.org}
                  - {name: SPIRE_CLUSTER, value: %[2]s}
`

// deployCluster is a cluster with `make image` imported, and the host dirs
// the manifests' hostPaths are moved to.
type deployCluster struct {
	*k8stest.Cluster
	sockets, data, peers string
}

// startDeployCluster runs the cluster the manifests deploy to: a node
// named localhost with its kubelet on 10250, a controller-manager and a
// scheduler, and the image `make image` builds.
func startDeployCluster(t *testing.T) *deployCluster {
	testkit.RequireRoot(t, "k8stest runs a kubelet and containerd")
	for _, port := range []int{10250, 8088} {
		requireFreePort(t, port)
	}
	tarball, digests := makeImage(t, t.TempDir())
	c := k8stest.Start(t, k8stest.Options{NodeName: "localhost", KubeletPort: 10250, ControlPlane: true})
	c.ImportImage(tarball)
	t.Logf("imported %s", digests)
	t.Cleanup(func() {
		if t.Failed() {
			logEvents(t, c)
		}
	})
	host := filepath.Join(c.Dir, "host")
	d := &deployCluster{Cluster: c, sockets: filepath.Join(host, "agent-sockets"),
		data: filepath.Join(host, "lanyard-data"), peers: filepath.Join(host, "peers")}
	for _, dir := range []string{d.sockets, d.data, d.peers} {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return d
}

// TestDeployLocalOverlay deploys what we ship on a real cluster: the image
// from `make image`, the local overlay (the embedded CA); see exercise.
func TestDeployLocalOverlay(t *testing.T) {
	c := startDeployCluster(t)
	applyOverlay(t, c, "local", "")
	exercise(t, c)
}

// TestDeploySpireOverlay deploys the spire overlay against a real
// spire-server on the node: the agent attests with k8s_psat (its pod's
// projected token, reviewed by the server with the API server) and serves
// the server's entry by k8s selectors; see exercise.
func TestDeploySpireOverlay(t *testing.T) {
	c := startDeployCluster(t)
	const cluster = "lanyard-test"
	server := spiretest.StartServer(t, spiretest.WithNodeAttestor("k8s_psat", fmt.Sprintf(`
            clusters = {
                %q = {
                    service_account_allow_list = ["spire:lanyard"]
                    kube_config_file = %q
                }
            }`, cluster, c.KubeconfigFor(k8stest.AgentNamespace, k8stest.ServerServiceAccount))))
	agentID := "spiffe://example.org/spire/agent/k8s_psat/" + cluster + "/" + c.NodeUID()
	server.CreateEntry(t, agentID, defaultID, "k8s:ns:default", "k8s:sa:default")
	// The server's bundle, as its k8sbundle notifier would publish it.
	c.Apply(map[string]any{"apiVersion": "v1", "kind": "ConfigMap",
		"metadata": map[string]any{"name": "spire-bundle", "namespace": agentNamespace},
		"data":     map[string]string{"bundle.crt": string(server.BundlePEM(t))}})
	_, port, err := net.SplitHostPort(server.Addr)
	if err != nil {
		t.Fatal(err)
	}
	applyOverlay(t, c, "spire", fmt.Sprintf(serverAddressPatch, port, cluster))
	exercise(t, c)
}

// exercise checks a deployed agent: its pod becomes Ready; two pods of a
// Deployment get their identity by k8s selectors and talk mTLS; a pod no
// entry matches is denied; a rollout restart and the deletion of the
// agent's pod keep the workloads' identities and trust bundle, and fresh
// fetches fail no longer than the agent is away.
func exercise(t *testing.T, c *deployCluster) {
	begin := time.Now()
	agent := waitDaemonSetRolled(t, c.Cluster, "")
	t.Logf("agent pod %s Ready %s after apply", agent, time.Since(begin).Round(100*time.Millisecond))

	c.CreateServiceAccount("default", "other")
	denied := c.CreatePod(k8stest.PodSpec{
		Name: "denied", ServiceAccount: "other", Labels: map[string]string{"app": "denied"},
		Socket: filepath.Join(c.sockets, "spire-agent.sock"),
	}.Manifest())
	c.Apply(mtlsDeployment(c.sockets, c.peers))
	workloads := waitWorkloads(t, c.Cluster, 2)
	t.Run("identities and mTLS", func(t *testing.T) {
		for i, pod := range workloads {
			other := workloads[1-i].Name
			c.WaitLog(pod, "workload", func(l string) bool {
				return strings.HasSuffix(l, " mtls "+other+" ok hello-from-"+other)
			})
		}
	})
	t.Run("no entry, no identity", func(t *testing.T) {
		pod := c.WaitRunning(denied)
		line := c.WaitLog(pod, "workload", func(l string) bool { return strings.HasPrefix(l, "error ") })
		t.Logf("denied pod: %s", line)
		for _, l := range c.Logs(pod, "workload") {
			if strings.HasPrefix(l, "svid ") {
				t.Errorf("the denied pod got an SVID: %s", l)
			}
		}
	})
	before := sourceLines(t, c.Cluster, workloads)

	var windows []outage
	t.Run("rollout restart", func(t *testing.T) {
		start := time.Now()
		c.MergePatch("DaemonSet", agentNamespace, "lanyard", map[string]any{"spec": map[string]any{"template": map[string]any{
			"metadata": map[string]any{"annotations": map[string]string{
				"kubectl.kubernetes.io/restartedAt": start.UTC().Format(time.RFC3339)}}}}})
		agent = waitDaemonSetRolled(t, c.Cluster, agent)
		ready := time.Since(start)
		windows = append(windows, checkReconnected(t, c.Cluster, workloads, before, "rollout restart", start, ready)...)
	})
	t.Run("agent pod deleted", func(t *testing.T) {
		start := time.Now()
		if err := c.Do("DELETE", "/api/v1/namespaces/"+agentNamespace+"/pods/"+agent, nil, nil); err != nil {
			t.Fatal(err)
		}
		agent = waitDaemonSetRolled(t, c.Cluster, agent)
		ready := time.Since(start)
		windows = append(windows, checkReconnected(t, c.Cluster, workloads, before, "pod deleted", start, ready)...)
	})
	failed := 0
	for _, w := range windows {
		failed += w.FailedFetches
	}
	t.Logf("%d fresh fetches failed in all, over %d workload restarts of the agent", failed, len(windows))
}

// logEvents logs the cluster's events, for a failure: what the
// controllers, the scheduler and the kubelet said about each object.
func logEvents(t *testing.T, c *k8stest.Cluster) {
	var events corev1.EventList
	if err := c.Do("GET", "/api/v1/events", nil, &events); err != nil {
		t.Logf("events: %v", err)
		return
	}
	var b strings.Builder
	for _, e := range events.Items {
		fmt.Fprintf(&b, "\n%s %s/%s %s: %s (x%d)", e.Type, e.InvolvedObject.Kind, e.InvolvedObject.Name, e.Reason, e.Message, e.Count)
	}
	t.Logf("events:%s", b.String())
}

// requireFreePort fails unless port is free on the loopback address: the
// node's kubelet and the agent's health listener take them.
func requireFreePort(t *testing.T, port int) {
	t.Helper()
	ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
	if err != nil {
		t.Fatalf("port %d is taken (the test's kubelet or agent needs it): %v", port, err)
	}
	ln.Close()
}

// applyOverlay renders testOverlay with kustomize, as `kubectl apply -k`
// does, and applies every object in kustomize's order (namespaces first).
func applyOverlay(t *testing.T, c *deployCluster, overlay, extraPatches string) {
	t.Helper()
	sockets, data := c.sockets, c.data
	local, err := testkit.RepoFile("deploy/kubernetes/overlays/" + overlay + "/kustomization.yaml")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	// kustomize takes a relative path only.
	rel, err := filepath.Rel(dir, filepath.Dir(local))
	if err != nil {
		t.Fatal(err)
	}
	kustomization := fmt.Sprintf(testOverlay, rel, sockets, data, extraPatches)
	if err := os.WriteFile(filepath.Join(dir, "kustomization.yaml"), []byte(kustomization), 0o644); err != nil {
		t.Fatal(err)
	}
	resMap, err := krusty.MakeKustomizer(krusty.MakeDefaultOptions()).Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		t.Fatalf("kustomize build: %v", err)
	}
	for _, res := range resMap.Resources() {
		// The patch must have hit the volumes it means to.
		if res.GetKind() == "DaemonSet" {
			text, _ := res.AsYAML()
			if !strings.Contains(string(text), sockets) || !strings.Contains(string(text), data) {
				t.Fatalf("the test's hostPath patch missed:\n%s", text)
			}
		}
		obj, err := res.MarshalJSON()
		if err != nil {
			t.Fatal(err)
		}
		c.Apply(obj)
	}
}

// waitDaemonSetRolled waits until the DaemonSet has one updated, Ready
// pod, other than old, and returns its name.
func waitDaemonSetRolled(t *testing.T, c *k8stest.Cluster, old string) string {
	t.Helper()
	var name, state string
	testkit.WaitFor(t, rolloutTimeout, "the agent's DaemonSet rolled out", func() bool {
		var ds appsv1.DaemonSet
		if err := c.Do("GET", "/apis/apps/v1/namespaces/"+agentNamespace+"/daemonsets/lanyard", nil, &ds); err != nil {
			state = err.Error()
			return false
		}
		s := ds.Status
		state = fmt.Sprintf("generation %d observed %d, desired %d updated %d ready %d available %d",
			ds.Generation, s.ObservedGeneration, s.DesiredNumberScheduled, s.UpdatedNumberScheduled, s.NumberReady, s.NumberAvailable)
		if s.ObservedGeneration < ds.Generation || s.DesiredNumberScheduled != 1 || s.UpdatedNumberScheduled != 1 ||
			s.NumberReady != 1 || s.NumberAvailable != 1 || s.NumberUnavailable != 0 {
			return false
		}
		pods := listPods(t, c, agentNamespace, agentSelector)
		var ready []string
		for _, p := range pods {
			if p.DeletionTimestamp == nil && p.Name != old && podReady(p) {
				ready = append(ready, p.Name)
			}
		}
		state += fmt.Sprintf(", pods %d, new Ready %v", len(pods), ready)
		if len(pods) != 1 || len(ready) != 1 {
			return false
		}
		name = ready[0]
		return true
	})
	if name == "" {
		t.Fatalf("DaemonSet: %s", state)
	}
	return name
}

func podReady(p corev1.Pod) bool {
	for _, cond := range p.Status.Conditions {
		if cond.Type == corev1.PodReady {
			return cond.Status == corev1.ConditionTrue
		}
	}
	return false
}

func listPods(t *testing.T, c *k8stest.Cluster, ns, selector string) []corev1.Pod {
	t.Helper()
	var list corev1.PodList
	if err := c.Do("GET", "/api/v1/namespaces/"+ns+"/pods?labelSelector="+selector, nil, &list); err != nil {
		t.Fatalf("listing pods %s in %s: %v", selector, ns, err)
	}
	return list.Items
}

// mtlsDeployment is two workload pods as a user would write them (the
// README's mount), each serving and calling the other over mTLS with the
// SVID of default/default. peers is where they find each other's port:
// both share the node's network (no CNI here), so neither can take a
// fixed one.
func mtlsDeployment(sockets, peers string) map[string]any {
	labels := map[string]string{"app": "mtls"}
	return map[string]any{
		"apiVersion": "apps/v1", "kind": "Deployment",
		"metadata": map[string]any{"name": "mtls", "namespace": "default"},
		"spec": map[string]any{
			"replicas": 2,
			"selector": map[string]any{"matchLabels": labels},
			"template": map[string]any{
				"metadata": map[string]any{"labels": labels},
				"spec": map[string]any{
					"serviceAccountName":            "default",
					"hostNetwork":                   true,
					"terminationGracePeriodSeconds": 2,
					"containers": []any{map[string]any{
						"name": "workload", "image": k8stest.WorkloadImage, "imagePullPolicy": "Never",
						"args": []string{"mtls-peer", "/peers", defaultID},
						"env": []any{
							map[string]any{"name": "SPIFFE_ENDPOINT_SOCKET", "value": "unix://" + socketInPod},
							map[string]any{"name": "POD_NAME", "valueFrom": map[string]any{"fieldRef": map[string]any{"fieldPath": "metadata.name"}}},
							map[string]any{"name": "WORKLOAD_INTERVAL", "value": "200ms"},
							map[string]any{"name": "WORKLOAD_TIMEOUT", "value": "2s"},
						},
						"volumeMounts": []any{
							map[string]any{"name": "spire-agent-socket", "mountPath": filepath.Dir(socketInPod), "readOnly": true},
							map[string]any{"name": "peers", "mountPath": "/peers"},
						},
					}},
					"volumes": []any{
						map[string]any{"name": "spire-agent-socket", "hostPath": map[string]any{"path": sockets, "type": "Directory"}},
						map[string]any{"name": "peers", "hostPath": map[string]any{"path": peers, "type": "Directory"}},
					},
				},
			},
		},
	}
}

// waitWorkloads waits for n running pods of the mtls Deployment, sorted by
// name.
func waitWorkloads(t *testing.T, c *k8stest.Cluster, n int) []*k8stest.Pod {
	t.Helper()
	var names []string
	testkit.WaitFor(t, rolloutTimeout, fmt.Sprintf("%d pods of the mtls Deployment", n), func() bool {
		names = names[:0]
		for _, p := range listPods(t, c, "default", "app=mtls") {
			if p.DeletionTimestamp == nil && p.Spec.NodeName != "" {
				names = append(names, p.Name)
			}
		}
		return len(names) == n
	})
	sort.Strings(names)
	pods := make([]*k8stest.Pod, len(names))
	for i, name := range names {
		pods[i] = c.WaitRunning(k8stest.PodRef{Namespace: "default", Name: name})
	}
	return pods
}

// logLine is one line of the mtls-peer workload: its time and the rest.
type logLine struct {
	at   time.Time
	text string
}

func peerLog(c *k8stest.Cluster, pod *k8stest.Pod) []logLine {
	var lines []logLine
	for _, l := range c.Logs(pod, "workload") {
		ms, text, ok := strings.Cut(l, " ")
		n, err := strconv.ParseInt(ms, 10, 64)
		if !ok || err != nil {
			continue
		}
		lines = append(lines, logLine{time.UnixMilli(n), text})
	}
	return lines
}

// sourceLines is each workload's first "source <id> bundle <fingerprint>"
// line: what its stream delivered before any restart.
func sourceLines(t *testing.T, c *k8stest.Cluster, pods []*k8stest.Pod) map[string]string {
	t.Helper()
	first := map[string]string{}
	for _, pod := range pods {
		for _, l := range peerLog(c, pod) {
			if strings.HasPrefix(l.text, "source ") {
				first[pod.Name] = l.text
				break
			}
		}
		if !strings.HasPrefix(first[pod.Name], "source "+defaultID+" bundle ") {
			t.Fatalf("%s: stream delivered %q, want %s", pod.Name, first[pod.Name], defaultID)
		}
	}
	return first
}

// outage is what one workload saw of one agent restart.
type outage struct {
	Pod, Event    string
	FailedFetches int
	Longest       time.Duration // from the first failed fetch to the next good one
	StreamErrors  int
	StreamBackIn  time.Duration // from the event to the stream's next delivery
	MTLSFailures  int
	AgentReadyIn  time.Duration
}

func (o outage) String() string {
	return fmt.Sprintf("%s/%s: %d failed fetches (longest %s), %d stream errors, stream back after %s, %d failed mTLS calls; agent Ready after %s",
		o.Pod, o.Event, o.FailedFetches, o.Longest.Round(10*time.Millisecond), o.StreamErrors,
		o.StreamBackIn.Round(10*time.Millisecond), o.MTLSFailures, o.AgentReadyIn.Round(100*time.Millisecond))
}

// checkReconnected waits until every workload's stream delivered again
// after start, the same identity and trust bundle as before, and a good
// fetch and mTLS call followed; it returns what each saw meanwhile.
func checkReconnected(t *testing.T, c *k8stest.Cluster, pods []*k8stest.Pod, before map[string]string,
	event string, start time.Time, agentReady time.Duration) []outage {
	t.Helper()
	var result []outage
	for _, pod := range pods {
		o := outage{Pod: pod.Name, Event: event, AgentReadyIn: agentReady}
		var lines []logLine
		testkit.WaitFor(t, rolloutTimeout, pod.Name+"'s stream and calls back after the "+event, func() bool {
			lines = peerLog(c, pod)
			var broke, delivered, fetched, called bool
			for _, l := range lines {
				if l.at.Before(start) {
					continue
				}
				// The stream broke when the old agent stopped, and then
				// delivered: from the new agent.
				broke = broke || strings.HasPrefix(l.text, "watch-error ")
				delivered = delivered || (broke && strings.HasPrefix(l.text, "source "))
				fetched = fetched || (delivered && strings.HasPrefix(l.text, "svid "))
				called = called || (delivered && strings.Contains(l.text, " ok hello-from-"))
			}
			return delivered && fetched && called
		})
		var failingSince time.Time
		for _, l := range lines {
			if l.at.Before(start) {
				continue
			}
			switch {
			case strings.HasPrefix(l.text, "source "):
				if o.StreamBackIn == 0 {
					o.StreamBackIn = l.at.Sub(start)
				}
				if l.text != before[pod.Name] {
					t.Errorf("%s after the %s: stream delivered %q, before %q", pod.Name, event, l.text, before[pod.Name])
				}
			case strings.HasPrefix(l.text, "watch-error "):
				o.StreamErrors++
			case strings.HasPrefix(l.text, "error "):
				o.FailedFetches++
				if failingSince.IsZero() {
					failingSince = l.at
				}
			case strings.HasPrefix(l.text, "svid "):
				if l.text != "svid "+defaultID {
					t.Errorf("%s after the %s: %s", pod.Name, event, l.text)
				}
				if !failingSince.IsZero() {
					o.Longest = max(o.Longest, l.at.Sub(failingSince))
					failingSince = time.Time{}
				}
			case strings.HasPrefix(l.text, "mtls ") && strings.Contains(l.text, " error "):
				o.MTLSFailures++
			}
		}
		// A fetch may fail only while no agent serves: never for longer
		// than the agent took to be Ready again.
		if o.Longest > agentReady {
			t.Errorf("%s: fetches failed for %s, longer than the agent's restart (%s)", pod.Name, o.Longest, agentReady)
		}
		t.Logf("%s", o)
		result = append(result, o)
	}
	return result
}
