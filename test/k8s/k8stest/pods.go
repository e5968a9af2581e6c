package k8stest

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// QoS is a pod's Kubernetes QoS class, which decides its cgroup's place.
type QoS string

// The QoS classes.
const (
	BestEffort QoS = "BestEffort"
	Burstable  QoS = "Burstable"
	Guaranteed QoS = "Guaranteed"
)

// PodSpec describes a pod running the test workload in one container named
// "workload", on the host's network, with the image never pulled.
type PodSpec struct {
	Name string
	// Namespace is "default" when empty.
	Namespace string
	// ServiceAccount is left to the API server's default ("default") when
	// empty; a static pod must leave it empty.
	ServiceAccount string
	Labels         map[string]string
	// QoS is BestEffort when empty; Burstable sets a CPU request,
	// Guaranteed equal requests and limits.
	QoS QoS
	// Image is WorkloadImage when empty.
	Image string
	// Args are the workload's: none fetches the X509-SVID in a loop,
	// {"sleep"} only sleeps.
	Args []string
	// Socket is the agent's Workload API socket on the host: its directory
	// is mounted (hostPath) at the same path and SPIFFE_ENDPOINT_SOCKET
	// names it. Empty: no mount.
	Socket string
	Env    map[string]string
	// HostPID shares the host's PID namespace.
	HostPID bool
}

// Manifest is the pod as the API server and the kubelet take it, as a map a
// test may change further (owner references, init containers, ...).
func (s PodSpec) Manifest() map[string]any {
	ns := s.Namespace
	if ns == "" {
		ns = "default"
	}
	image := s.Image
	if image == "" {
		image = WorkloadImage
	}
	env := []any{}
	for k, v := range s.Env {
		env = append(env, map[string]any{"name": k, "value": v})
	}
	container := map[string]any{
		"name":            "workload",
		"image":           image,
		"imagePullPolicy": "Never",
		"args":            s.Args,
	}
	switch s.QoS {
	case Burstable:
		container["resources"] = map[string]any{"requests": map[string]string{"cpu": "10m"}}
	case Guaranteed:
		r := map[string]string{"cpu": "100m", "memory": "64Mi"}
		container["resources"] = map[string]any{"requests": r, "limits": r}
	}
	spec := map[string]any{
		"hostNetwork":                   true,
		"hostPID":                       s.HostPID,
		"terminationGracePeriodSeconds": 2,
		"containers":                    []any{container},
	}
	if s.ServiceAccount != "" {
		spec["serviceAccountName"] = s.ServiceAccount
	}
	if s.Socket != "" {
		dir := filepath.Dir(s.Socket)
		env = append(env, map[string]any{"name": "SPIFFE_ENDPOINT_SOCKET", "value": "unix://" + s.Socket})
		container["volumeMounts"] = []any{map[string]any{"name": "agent-socket", "mountPath": dir, "readOnly": true}}
		spec["volumes"] = []any{map[string]any{"name": "agent-socket",
			"hostPath": map[string]any{"path": dir, "type": "Directory"}}}
	}
	container["env"] = env
	return map[string]any{
		"apiVersion": "v1",
		"kind":       "Pod",
		"metadata":   map[string]any{"name": s.Name, "namespace": ns, "labels": s.Labels},
		"spec":       spec,
	}
}

// PodRef names a pod as the kubelet lists it.
type PodRef struct {
	Namespace, Name string
	// staticFile is a static pod's manifest.
	staticFile string
}

// Pod is a running pod as the kubelet reports it.
type Pod struct {
	PodRef
	// UID is the kubelet's: a static pod's is its config hash (32 hex
	// digits), an API pod's the API server's UUID.
	UID      string
	Static   bool
	QOSClass QoS
	// Containers are in the pod's order.
	Containers []Container
}

// Container is one of a pod's running containers.
type Container struct {
	Name string
	// ID is containerd's (64 hex digits), as in the container's cgroup.
	ID      string
	Image   string
	ImageID string
}

// asMap turns any pod object (a map, a k8s.io/api Pod) into a map.
func asMap(pod any) (map[string]any, error) {
	if m, ok := pod.(map[string]any); ok {
		return m, nil
	}
	data, err := json.Marshal(pod)
	if err != nil {
		return nil, err
	}
	var m map[string]any
	return m, json.Unmarshal(data, &m)
}

func podName(m map[string]any) (ns, name string) {
	md, _ := m["metadata"].(map[string]any)
	name, _ = md["name"].(string)
	ns, _ = md["namespace"].(string)
	if ns == "" {
		ns = "default"
	}
	return ns, name
}

// CreatePod creates an API pod (a map such as PodSpec.Manifest, or a
// k8s.io/api Pod) on this node: spec.nodeName is set, as no scheduler runs.
// It returns without waiting; see WaitRunning.
func (c *Cluster) CreatePod(pod any) PodRef {
	c.t.Helper()
	m, err := asMap(pod)
	if err != nil {
		c.t.Fatalf("k8stest: encoding pod: %v", err)
	}
	spec, _ := m["spec"].(map[string]any)
	if spec == nil {
		c.t.Fatal("k8stest: pod has no spec")
	}
	spec["nodeName"] = c.NodeName
	ns, name := podName(m)
	if err := c.Do("POST", "/api/v1/namespaces/"+ns+"/pods", m, nil); err != nil {
		c.t.Fatalf("k8stest: creating pod %s/%s: %v", ns, name, err)
	}
	return PodRef{Namespace: ns, Name: name}
}

// RunStaticPod writes a static pod's manifest into the kubelet's
// staticPodPath. The kubelet names the pod <name>-<node name>. It returns
// without waiting; see WaitRunning.
func (c *Cluster) RunStaticPod(manifest any) PodRef {
	c.t.Helper()
	m, err := asMap(manifest)
	if err != nil {
		c.t.Fatalf("k8stest: encoding pod: %v", err)
	}
	ns, name := podName(m)
	data, err := json.Marshal(m)
	if err != nil {
		c.t.Fatal(err)
	}
	path := filepath.Join(c.StaticPodDir, ns+"_"+name+".json")
	// The kubelet skips dot files, so it never reads a half-written one.
	tmp := filepath.Join(c.StaticPodDir, "."+ns+"_"+name+".json")
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		c.t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		c.t.Fatal(err)
	}
	return PodRef{Namespace: ns, Name: name + "-" + c.NodeName, staticFile: path}
}

// kubeletPod is what the tests read of the kubelet's pod list.
type kubeletPod struct {
	Metadata struct {
		Name, Namespace, UID string
		Annotations          map[string]string
	} `json:"metadata"`
	Spec struct {
		Containers []struct{ Name string } `json:"containers"`
	} `json:"spec"`
	Status struct {
		Phase             string
		QOSClass          QoS `json:"qosClass"`
		ContainerStatuses []struct {
			Name, Image, ImageID, ContainerID string
			State                             map[string]struct {
				Reason, Message string
			}
		} `json:"containerStatuses"`
	} `json:"status"`
}

// kubeletPods is the kubelet's pod list from its read-only port.
func (c *Cluster) kubeletPods(ctx context.Context) ([]kubeletPod, error) {
	req, err := http.NewRequestWithContext(ctx, "GET", fmt.Sprintf("http://127.0.0.1:%d/pods", c.KubeletReadOnlyPort), nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("kubelet /pods: %s", resp.Status)
	}
	var list struct{ Items []kubeletPod }
	if err := json.NewDecoder(io.LimitReader(resp.Body, maxResponse)).Decode(&list); err != nil {
		return nil, err
	}
	return list.Items, nil
}

// findPod is ref in the kubelet's list, or nil.
func (c *Cluster) findPod(ctx context.Context, ref PodRef) (*kubeletPod, error) {
	pods, err := c.kubeletPods(ctx)
	if err != nil {
		return nil, err
	}
	for i := range pods {
		if pods[i].Metadata.Namespace == ref.Namespace && pods[i].Metadata.Name == ref.Name {
			return &pods[i], nil
		}
	}
	return nil, nil
}

// running is the pod if every container of it runs, or why not.
func (p *kubeletPod) running() (*Pod, error) {
	if p.Status.Phase != "Running" {
		return nil, fmt.Errorf("phase %q", p.Status.Phase)
	}
	pod := &Pod{
		PodRef:   PodRef{Namespace: p.Metadata.Namespace, Name: p.Metadata.Name},
		UID:      p.Metadata.UID,
		Static:   p.Metadata.Annotations["kubernetes.io/config.source"] == "file",
		QOSClass: p.Status.QOSClass,
	}
	for _, spec := range p.Spec.Containers {
		var found bool
		for _, s := range p.Status.ContainerStatuses {
			if s.Name != spec.Name {
				continue
			}
			found = true
			if _, ok := s.State["running"]; !ok {
				return nil, fmt.Errorf("container %s: %v", s.Name, s.State)
			}
			_, id, _ := strings.Cut(s.ContainerID, "://")
			pod.Containers = append(pod.Containers, Container{Name: s.Name, ID: id, Image: s.Image, ImageID: s.ImageID})
		}
		if !found {
			return nil, fmt.Errorf("container %s: no status yet", spec.Name)
		}
	}
	return pod, nil
}

// WaitRunning waits until the kubelet reports every container of the pod
// running, and returns it.
func (c *Cluster) WaitRunning(ref PodRef) *Pod {
	c.t.Helper()
	var pod *Pod
	err := c.poll(podTimeout, func(ctx context.Context) error {
		p, err := c.findPod(ctx, ref)
		if err != nil {
			return err
		}
		if p == nil {
			return fmt.Errorf("not listed by the kubelet")
		}
		pod, err = p.running()
		return err
	})
	if err != nil {
		c.t.Fatalf("k8stest: pod %s/%s not running: %v", ref.Namespace, ref.Name, err)
	}
	pod.staticFile = ref.staticFile
	return pod
}

// DeletePod deletes the pod (an API pod at once, without grace; a static
// pod by removing its manifest) and waits until the kubelet no longer
// lists it, its containers stopped.
func (c *Cluster) DeletePod(ref PodRef) {
	c.t.Helper()
	if ref.staticFile != "" {
		if err := os.Remove(ref.staticFile); err != nil {
			c.t.Fatal(err)
		}
	} else {
		opts := map[string]any{"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0}
		if err := c.Do("DELETE", "/api/v1/namespaces/"+ref.Namespace+"/pods/"+ref.Name, opts, nil); err != nil && !IsNotFound(err) {
			c.t.Fatalf("k8stest: deleting pod %s/%s: %v", ref.Namespace, ref.Name, err)
		}
	}
	err := c.poll(podTimeout, func(ctx context.Context) error {
		p, err := c.findPod(ctx, ref)
		if err == nil && p != nil {
			return fmt.Errorf("still listed, phase %q", p.Status.Phase)
		}
		return err
	})
	if err != nil {
		c.t.Fatalf("k8stest: pod %s/%s not gone: %v", ref.Namespace, ref.Name, err)
	}
}

// poll runs check until it succeeds, the kubelet exits or bound passes.
func (c *Cluster) poll(bound time.Duration, check func(context.Context) error) error {
	return c.kubelet.waitUntil(bound, "the kubelet", check)
}
