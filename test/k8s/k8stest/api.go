package k8stest

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"time"
)

// apiClient speaks JSON to the API server as the cluster's admin.
type apiClient struct {
	base  string
	token string
	http  *http.Client
}

func newAPIClient(base, caPath, token string) *apiClient {
	pool := x509.NewCertPool()
	if pem, err := os.ReadFile(caPath); err == nil {
		pool.AppendCertsFromPEM(pem)
	}
	return &apiClient{base: base, token: token, http: &http.Client{
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}},
		Timeout:   30 * time.Second,
	}}
}

// APIError is an API server's answer other than 2xx: its code, and the
// Status object's reason and message.
type APIError struct {
	Code    int
	Reason  string
	Message string
}

func (e *APIError) Error() string {
	return fmt.Sprintf("API server: %d %s: %s", e.Code, e.Reason, e.Message)
}

// IsNotFound says whether err is the API server's 404.
func IsNotFound(err error) bool {
	var e *APIError
	return errors.As(err, &e) && e.Code == http.StatusNotFound
}

// IsAlreadyExists says whether err is the API server's 409.
func IsAlreadyExists(err error) bool {
	var e *APIError
	return errors.As(err, &e) && e.Code == http.StatusConflict
}

// maxResponse bounds what the test reads from the API server.
const maxResponse = 16 << 20

// do sends body (JSON-encoded unless it is []byte) and decodes the answer
// into out, when out is not nil.
func (a *apiClient) do(ctx context.Context, method, path string, body, out any) error {
	return a.send(ctx, method, path, "application/json", body, out)
}

// send is do with the body's content type.
func (a *apiClient) send(ctx context.Context, method, path, contentType string, body, out any) error {
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case []byte:
		rd = bytes.NewReader(b)
	default:
		data, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(data)
	}
	req, err := http.NewRequestWithContext(ctx, method, a.base+path, rd)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+a.token)
	req.Header.Set("Accept", "application/json")
	if rd != nil {
		req.Header.Set("Content-Type", contentType)
	}
	resp, err := a.http.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxResponse))
	if err != nil {
		return err
	}
	if resp.StatusCode/100 != 2 {
		var status struct{ Reason, Message string }
		_ = json.Unmarshal(data, &status)
		if status.Message == "" {
			status.Message = string(data)
		}
		return &APIError{Code: resp.StatusCode, Reason: status.Reason, Message: status.Message}
	}
	if out == nil {
		return nil
	}
	if raw, ok := out.(*[]byte); ok {
		*raw = data
		return nil
	}
	return json.Unmarshal(data, out)
}

func (a *apiClient) ready(ctx context.Context) error {
	return a.do(ctx, "GET", "/readyz", nil, nil)
}

// Do sends a request to the API server as the admin: body is JSON-encoded
// (a map, a k8s.io/api object) unless it is []byte, and the answer is
// decoded into out unless out is nil (*[]byte takes the raw JSON).
func (c *Cluster) Do(method, path string, body, out any) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return c.api.do(ctx, method, path, body, out)
}

// create POSTs obj to path, treating "already exists" as success.
func (c *Cluster) create(path string, obj any) error {
	err := c.Do("POST", path, obj, nil)
	if IsAlreadyExists(err) {
		return nil
	}
	return err
}

// Names of what bootstrap creates.
const (
	// AgentNamespace holds the agent's and the SPIRE server's service
	// accounts.
	AgentNamespace = "spire"
	// AgentServiceAccount may do what a node agent does: get nodes/proxy
	// (the kubelet's secure port), get and list pods and nodes.
	AgentServiceAccount = "spire-agent"
	// ServerServiceAccount may do what k8s_psat's server side does: create
	// TokenReviews, get pods and nodes.
	ServerServiceAccount = "spire-server"
	// AgentClusterRole and ServerClusterRole are their cluster roles.
	AgentClusterRole  = "k8stest-agent"
	ServerClusterRole = "k8stest-psat-server"
)

func meta(name string) map[string]any { return map[string]any{"name": name} }

// bootstrap creates what a controller-manager would (service accounts,
// kube-root-ca.crt) and the agent's and server's RBAC.
func (c *Cluster) bootstrap() error {
	for _, ns := range []string{"default", AgentNamespace} {
		if err := c.createNamespace(ns); err != nil {
			return err
		}
	}
	for _, sa := range []string{AgentServiceAccount, ServerServiceAccount} {
		if err := c.createServiceAccount(AgentNamespace, sa); err != nil {
			return err
		}
	}
	rule := func(group string, resources, verbs []string) map[string]any {
		return map[string]any{"apiGroups": []string{group}, "resources": resources, "verbs": verbs}
	}
	roles := map[string][]any{
		AgentClusterRole: {
			rule("", []string{"nodes/proxy"}, []string{"get"}),
			rule("", []string{"pods", "nodes"}, []string{"get", "list"}),
		},
		ServerClusterRole: {
			rule("authentication.k8s.io", []string{"tokenreviews"}, []string{"create"}),
			rule("", []string{"pods", "nodes"}, []string{"get"}),
		},
	}
	for name, rules := range roles {
		role := map[string]any{"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": meta(name), "rules": rules}
		if err := c.create("/apis/rbac.authorization.k8s.io/v1/clusterroles", role); err != nil {
			return err
		}
	}
	if err := c.bindClusterRole(AgentClusterRole, "ServiceAccount", AgentNamespace, AgentServiceAccount); err != nil {
		return err
	}
	return c.bindClusterRole(ServerClusterRole, "ServiceAccount", AgentNamespace, ServerServiceAccount)
}

// CreateNamespace creates namespace ns with its default service account and
// its kube-root-ca.crt ConfigMap (no controller-manager runs to make them).
func (c *Cluster) CreateNamespace(ns string) {
	c.t.Helper()
	if err := c.createNamespace(ns); err != nil {
		c.t.Fatalf("k8stest: creating namespace %s: %v", ns, err)
	}
}

func (c *Cluster) createNamespace(ns string) error {
	obj := map[string]any{"apiVersion": "v1", "kind": "Namespace", "metadata": meta(ns)}
	if err := c.create("/api/v1/namespaces", obj); err != nil {
		return err
	}
	ca, err := os.ReadFile(c.ClusterCAPath())
	if err != nil {
		return err
	}
	cm := map[string]any{"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta("kube-root-ca.crt"),
		"data": map[string]string{"ca.crt": string(ca)}}
	if err := c.create("/api/v1/namespaces/"+ns+"/configmaps", cm); err != nil {
		return err
	}
	return c.createServiceAccount(ns, "default")
}

// CreateServiceAccount creates service account name in namespace ns.
func (c *Cluster) CreateServiceAccount(ns, name string) {
	c.t.Helper()
	if err := c.createServiceAccount(ns, name); err != nil {
		c.t.Fatalf("k8stest: creating service account %s/%s: %v", ns, name, err)
	}
}

func (c *Cluster) createServiceAccount(ns, name string) error {
	sa := map[string]any{"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(name)}
	return c.create("/api/v1/namespaces/"+ns+"/serviceaccounts", sa)
}

// BindClusterRole grants cluster role role to a subject: kind is
// "ServiceAccount" (with its namespace), "User" or "Group" (ns empty).
func (c *Cluster) BindClusterRole(role, kind, ns, name string) {
	c.t.Helper()
	if err := c.bindClusterRole(role, kind, ns, name); err != nil {
		c.t.Fatalf("k8stest: binding %s to %s %s/%s: %v", role, kind, ns, name, err)
	}
}

func (c *Cluster) bindClusterRole(role, kind, ns, name string) error {
	subject := map[string]any{"kind": kind, "name": name}
	if kind == "ServiceAccount" {
		subject["namespace"] = ns
	} else {
		subject["apiGroup"] = "rbac.authorization.k8s.io"
	}
	binding := map[string]any{
		"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
		"metadata": meta(fmt.Sprintf("%s--%s-%s-%s", role, kind, ns, name)),
		"roleRef":  map[string]any{"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
		"subjects": []any{subject},
	}
	return c.create("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", binding)
}

// Token is a service account token from the TokenRequest API, as a
// projected volume gets it: for audience (none: the API server's), valid
// for an hour, bound to API pod boundPod in ns when boundPod is not empty
// (k8s_psat's token).
func (c *Cluster) Token(ns, sa, audience, boundPod string) string {
	c.t.Helper()
	spec := map[string]any{"expirationSeconds": 3600}
	if audience != "" {
		spec["audiences"] = []string{audience}
	}
	if boundPod != "" {
		var pod struct {
			Metadata struct{ UID string } `json:"metadata"`
		}
		if err := c.Do("GET", "/api/v1/namespaces/"+ns+"/pods/"+boundPod, nil, &pod); err != nil {
			c.t.Fatalf("k8stest: getting pod %s/%s to bind a token to: %v", ns, boundPod, err)
		}
		spec["boundObjectRef"] = map[string]any{"kind": "Pod", "apiVersion": "v1", "name": boundPod, "uid": pod.Metadata.UID}
	}
	req := map[string]any{"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
	var resp struct {
		Status struct{ Token string } `json:"status"`
	}
	if err := c.Do("POST", "/api/v1/namespaces/"+ns+"/serviceaccounts/"+sa+"/token", req, &resp); err != nil {
		c.t.Fatalf("k8stest: requesting a token for %s/%s: %v", ns, sa, err)
	}
	return resp.Status.Token
}

// KubeconfigFor writes a kubeconfig that acts as service account ns/sa
// (with an hour-long token), for a peer such as spire-server's k8s_psat,
// and returns its path.
func (c *Cluster) KubeconfigFor(ns, sa string) string {
	c.t.Helper()
	path := fmt.Sprintf("%s/%s-%s.kubeconfig", c.Dir, ns, sa)
	if err := c.writeKubeconfig(path, ns+"-"+sa, c.Token(ns, sa, "", "")); err != nil {
		c.t.Fatal(err)
	}
	return path
}

// NodeUID is the node object's UID (k8s_psat's agent ID ends with it).
func (c *Cluster) NodeUID() string { return c.nodeUID }
