package k8stest

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"
	"time"
)

// controllers are the controller-manager's loops the tests need: workloads
// (DaemonSet, Deployment and its ReplicaSets), the garbage collector that
// removes what they own, and the node lifecycle controller, which lifts the
// node.kubernetes.io/not-ready taint the kubelet registers with (the
// scheduler places nothing but DaemonSet pods until then). Service
// accounts and kube-root-ca.crt are bootstrap's.
const controllers = "daemonset,deployment,replicaset,garbagecollector,nodelifecycle"

// startControlPlane runs kube-controller-manager and kube-scheduler as the
// admin, on no port (nothing probes them; the objects they act on show
// that they work).
func (c *Cluster) startControlPlane() error {
	p := c.pki
	if _, err := c.startDaemon("kube-controller-manager", filepath.Join(c.bin, "kube-controller-manager"),
		"--kubeconfig="+c.Kubeconfig(),
		"--secure-port=0",
		"--leader-elect=false",
		"--controllers="+controllers,
		"--root-ca-file="+p.path(clusterCAFile),
		"--service-account-private-key-file="+p.path(saKeyFile),
		"--profiling=false",
	); err != nil {
		return err
	}
	_, err := c.startDaemon("kube-scheduler", filepath.Join(c.bin, "kube-scheduler"),
		"--kubeconfig="+c.Kubeconfig(),
		"--secure-port=0",
		"--leader-elect=false",
		"--profiling=false",
	)
	return err
}

// ImportImage loads an image tarball (docker-archive, as `make image`
// writes) into the node's containerd, where pods find it without a pull.
func (c *Cluster) ImportImage(tar string) {
	c.t.Helper()
	if _, err := c.ctr(2*time.Minute, "images", "import", tar); err != nil {
		c.t.Fatalf("k8stest: importing %s: %v", tar, err)
	}
}

// resources maps the kinds Apply knows to their API paths: group/version
// prefix and plural, and whether they live in a namespace.
var resources = map[string]struct {
	prefix, plural string
	namespaced     bool
}{
	"Namespace":          {"/api/v1", "namespaces", false},
	"ServiceAccount":     {"/api/v1", "serviceaccounts", true},
	"ConfigMap":          {"/api/v1", "configmaps", true},
	"Pod":                {"/api/v1", "pods", true},
	"ClusterRole":        {"/apis/rbac.authorization.k8s.io/v1", "clusterroles", false},
	"ClusterRoleBinding": {"/apis/rbac.authorization.k8s.io/v1", "clusterrolebindings", false},
	"DaemonSet":          {"/apis/apps/v1", "daemonsets", true},
	"Deployment":         {"/apis/apps/v1", "deployments", true},
}

// ObjectPath is the API path of a named object of kind, e.g.
// /apis/apps/v1/namespaces/spire/daemonsets/lanyard.
func ObjectPath(kind, ns, name string) (string, error) {
	r, ok := resources[kind]
	if !ok {
		return "", fmt.Errorf("k8stest: kind %s unknown", kind)
	}
	if !r.namespaced {
		return r.prefix + "/" + r.plural + "/" + name, nil
	}
	if ns == "" {
		ns = "default"
	}
	return r.prefix + "/namespaces/" + ns + "/" + r.plural + "/" + name, nil
}

// Apply creates or updates obj (a map, a k8s.io/api object, or its JSON)
// with server-side apply, as `kubectl apply --server-side` does: objects
// that exist (the namespaces bootstrap made) are updated, not refused.
func (c *Cluster) Apply(obj any) {
	c.t.Helper()
	data, ok := obj.([]byte)
	if !ok {
		var err error
		if data, err = json.Marshal(obj); err != nil {
			c.t.Fatalf("k8stest: encoding: %v", err)
		}
	}
	var head struct {
		Kind     string
		Metadata struct{ Name, Namespace string }
	}
	if err := json.Unmarshal(data, &head); err != nil {
		c.t.Fatalf("k8stest: decoding the object to apply: %v", err)
	}
	path, err := ObjectPath(head.Kind, head.Metadata.Namespace, head.Metadata.Name)
	if err != nil {
		c.t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// JSON is YAML, so the apply content type takes it as it is.
	err = c.api.send(ctx, "PATCH", path+"?fieldManager=k8stest&force=true", "application/apply-patch+yaml", data, nil)
	if err != nil {
		c.t.Fatalf("k8stest: applying %s %s: %v", head.Kind, strings.TrimPrefix(head.Metadata.Namespace+"/"+head.Metadata.Name, "/"), err)
	}
}

// MergePatch applies a JSON merge patch to an object, as `kubectl patch
// --type merge` (and `kubectl rollout restart`) do.
func (c *Cluster) MergePatch(kind, ns, name string, patch any) {
	c.t.Helper()
	path, err := ObjectPath(kind, ns, name)
	if err != nil {
		c.t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := c.api.send(ctx, "PATCH", path, "application/merge-patch+json", patch, nil); err != nil {
		c.t.Fatalf("k8stest: patching %s %s/%s: %v", kind, ns, name, err)
	}
}
