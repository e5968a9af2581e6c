package k8s

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Bounds of the API server's answers and of the waits for them.
const (
	apiRequestTimeout = 10 * time.Second
	// maxPodObjectSize bounds one pod: etcd stores at most 1.5 MiB an
	// object.
	maxPodObjectSize = 4 << 20
	// podMetadataPageSize pods a page of the cluster's pod list, each
	// answered as metadata only (5-20 KiB with managedFields).
	podMetadataPageSize = 250
	maxPodMetadataPage  = 16 << 20
	// maxPodMetadataPages bounds the pages read for a UID: 100 000 pods,
	// twice the largest cluster Kubernetes supports.
	maxPodMetadataPages = 400
	// maxReviewSize bounds a SubjectAccessReview's answer.
	maxReviewSize = 1 << 20
	// acceptMetadataList asks for a list of PartialObjectMetadata, as
	// client-go's metadata client does: names, namespaces, UIDs, no specs.
	acceptMetadataList = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,application/json"
)

var (
	errAPIServerUnavailable = errors.New("cannot ask the Kubernetes API server")
	errAPIServerRefused     = errors.New("the Kubernetes API server refused the agent")
)

// apiClient asks the kube-apiserver, as the agent's service account, for
// pods (pod_reference_scope "cluster") and SubjectAccessReviews
// (access_policy "enforced"). It is built at first use and kept for the
// attestor's life, so that its connection is reused.
type apiClient struct {
	url       string
	host      string // of url, which the certificate must name
	tokenPath string
	caPath    string
	reload    time.Duration
	http      *http.Client
	transport *http.Transport

	reviews reviewCache
	names   podNames

	mu     sync.Mutex
	token  watchedFile
	ca     watchedFile
	bearer string
	roots  *x509.CertPool
}

func newAPIClient(s settings, dial dialFunc) *apiClient {
	c := &apiClient{
		url: s.apiServer, tokenPath: s.tokenPath, caPath: s.apiCAPath, reload: s.reloadInterval,
		token: watchedFile{path: s.tokenPath}, ca: watchedFile{path: s.apiCAPath},
	}
	if u, err := url.Parse(s.apiServer); err == nil {
		c.host = u.Hostname()
	}
	if dial == nil {
		dial = (&net.Dialer{Timeout: kubeletDialTimeout, KeepAlive: 30 * time.Second}).DialContext
	}
	c.transport = &http.Transport{
		// Never a proxy from the environment: the service address is
		// in-cluster, and the token must reach only the API server.
		Proxy:       nil,
		DialContext: dial,
		TLSClientConfig: &tls.Config{
			MinVersion: tls.VersionTLS12,
			// verify replaces Go's check, with the reloadable CA.
			InsecureSkipVerify: true, //nolint:gosec // VerifyConnection verifies
			VerifyConnection:   c.verify,
		},
		TLSHandshakeTimeout:   kubeletTLSTimeout,
		ResponseHeaderTimeout: apiRequestTimeout,
		MaxIdleConnsPerHost:   2,
		IdleConnTimeout:       90 * time.Second,
	}
	c.http = &http.Client{Transport: c.transport, CheckRedirect: noRedirects}
	return c
}

// refresh reloads the token and CA when they changed.
func (c *apiClient) refresh() (string, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := time.Now()
	pemData, changed, err := c.ca.load(now, c.reload)
	if err != nil {
		return "", fmt.Errorf("%w: loading the API server's CA (api_server_ca_path): %v", errAPIServerUnavailable, err)
	}
	if changed || c.roots == nil {
		roots, err := parseCertPool(pemData)
		if err != nil {
			return "", fmt.Errorf("%w: the API server's CA %s: %v", errAPIServerUnavailable, c.caPath, err)
		}
		if c.roots != nil {
			c.transport.CloseIdleConnections()
		}
		c.roots = roots
	}
	data, _, err := c.token.load(now, c.reload)
	if err != nil {
		return "", fmt.Errorf("%w: loading the service account token (token_path): %v", errAPIServerUnavailable, err)
	}
	c.bearer = string(bytes.TrimSpace(data))
	if c.bearer == "" {
		return "", fmt.Errorf("%w: the token file %s is empty", errAPIServerUnavailable, c.tokenPath)
	}
	return c.bearer, nil
}

func (c *apiClient) verify(cs tls.ConnectionState) error {
	c.mu.Lock()
	roots := c.roots
	c.mu.Unlock()
	if roots == nil || len(cs.PeerCertificates) == 0 {
		return errors.New("no CA loaded, or no certificate presented")
	}
	opts := x509.VerifyOptions{Roots: roots, Intermediates: x509.NewCertPool(), DNSName: c.host}
	for _, ic := range cs.PeerCertificates[1:] {
		opts.Intermediates.AddCert(ic)
	}
	if _, err := cs.PeerCertificates[0].Verify(opts); err != nil {
		return fmt.Errorf("the API server's certificate is not trusted (check api_server_ca_path): %w", err)
	}
	return nil
}

// do sends one request and decodes a 200 answer of at most limit bytes
// into out. It returns the status of any other answer with the API
// server's message; 404 is errNotFoundStatus.
func (c *apiClient) do(ctx context.Context, method, path, accept string, body, out any, limit int64) error {
	if c.url == "" {
		return fmt.Errorf("%w: KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are not set: the agent must run in a pod to reach the API server", errAPIServerUnavailable)
	}
	bearer, err := c.refresh()
	if err != nil {
		return err
	}
	var reqBody io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		reqBody = bytes.NewReader(b)
	}
	ctx, cancel := context.WithTimeout(ctx, apiRequestTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, c.url+path, reqBody)
	if err != nil {
		return fmt.Errorf("%w: %v", errAPIServerUnavailable, err)
	}
	req.Header.Set("Accept", accept)
	req.Header.Set("Authorization", "Bearer "+bearer)
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("%w: %s %s: %v", errAPIServerUnavailable, method, c.url+pathOnly(path), err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK && resp.StatusCode != http.StatusCreated {
		return c.statusError(method, path, resp)
	}
	lr := &limitedReader{r: resp.Body, limit: limit}
	if err := json.NewDecoder(lr).Decode(out); err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("%w: %s %s: no whole answer within %s", errAPIServerUnavailable, method, c.url+pathOnly(path), apiRequestTimeout)
		}
		if lr.n > limit {
			return fmt.Errorf("%w: %s %s: the answer is larger than %d bytes", errAPIServerUnavailable, method, c.url+pathOnly(path), limit)
		}
		return fmt.Errorf("%w: %s %s: malformed answer: %v", errAPIServerUnavailable, method, c.url+pathOnly(path), err)
	}
	return nil
}

// errNotFoundStatus: the API server answered 404.
var errNotFoundStatus = errors.New("404 Not Found")

// apiStatus is what the API server says with an error (metav1.Status).
type apiStatus struct {
	Message string `json:"message"`
}

func (c *apiClient) statusError(method, path string, resp *http.Response) error {
	said := quoteBody(resp.Body)
	var st apiStatus
	if json.Unmarshal([]byte(said), &st) == nil && st.Message != "" {
		said = st.Message
	}
	where := method + " " + c.url + pathOnly(path)
	switch resp.StatusCode {
	case http.StatusNotFound:
		return fmt.Errorf("%s: %w", where, errNotFoundStatus)
	case http.StatusUnauthorized:
		c.mu.Lock()
		c.token.stale = true // perhaps rotated since it was read
		c.mu.Unlock()
		return fmt.Errorf("%w: %s: 401 Unauthorized: the token in %s is not accepted (it is read again next time)", errAPIServerRefused, where, c.tokenPath)
	case http.StatusForbidden:
		return fmt.Errorf("%w: %s: 403 Forbidden: %q: grant the agent's service account get and list on pods, and create on subjectaccessreviews.authorization.k8s.io for access_policy \"enforced\"", errAPIServerRefused, where, said)
	}
	return fmt.Errorf("%w: %s: %s: %q", errAPIServerUnavailable, where, resp.Status, said)
}

// pathOnly drops the query (a continue token) from what errors quote.
func pathOnly(path string) string {
	p, _, _ := strings.Cut(path, "?")
	return p
}

// getPod reads one pod; a pod that does not exist is ErrPodNotFound.
func (c *apiClient) getPod(ctx context.Context, namespace, name string) (*pod, error) {
	var p pod
	err := c.do(ctx, http.MethodGet, "/api/v1/namespaces/"+url.PathEscape(namespace)+"/pods/"+url.PathEscape(name), "application/json", nil, &p, maxPodObjectSize)
	switch {
	case errors.Is(err, errNotFoundStatus):
		return nil, fmt.Errorf("pod %s/%s: %w in the cluster", namespace, name, ErrPodNotFound)
	case err != nil:
		return nil, err
	case p.Metadata.UID == "":
		return nil, fmt.Errorf("%w: the API server answered pod %s/%s without a UID", errAPIServerUnavailable, namespace, name)
	}
	return &p, nil
}

// podMetadataList is a page of PartialObjectMetadataList: only what finds
// a pod by UID.
type podMetadataList struct {
	Metadata struct {
		Continue string `json:"continue"`
	} `json:"metadata"`
	Items []struct {
		Metadata struct {
			Name      string `json:"name"`
			Namespace string `json:"namespace"`
			UID       string `json:"uid"`
		} `json:"metadata"`
	} `json:"items"`
}

// findPodByUID finds a pod of the whole cluster by UID. The API server has
// no field selector on metadata.uid for pods, so, as SPIRE does, it lists
// the pods' metadata (in bounded pages here) and then reads the pod found.
// Where a UID was found is remembered: the next time one GET answers.
func (c *apiClient) findPodByUID(ctx context.Context, uid string) (*pod, error) {
	if ns, name, ok := c.names.get(uid); ok {
		p, err := c.getPod(ctx, ns, name)
		switch {
		case err == nil && p.Metadata.UID == uid:
			return p, nil
		case err == nil || errors.Is(err, ErrPodNotFound):
			return nil, fmt.Errorf("pod with UID %s: %w in the cluster (it was %s/%s)", uid, ErrPodNotFound, ns, name)
		}
		return nil, err
	}
	next := ""
	for page := 0; page < maxPodMetadataPages; page++ {
		path := "/api/v1/pods?limit=" + strconv.Itoa(podMetadataPageSize)
		if next != "" {
			path += "&continue=" + url.QueryEscape(next)
		}
		var list podMetadataList
		if err := c.do(ctx, http.MethodGet, path, acceptMetadataList, nil, &list, maxPodMetadataPage); err != nil {
			return nil, err
		}
		for _, it := range list.Items {
			if it.Metadata.UID != uid {
				continue
			}
			c.names.put(uid, it.Metadata.Namespace, it.Metadata.Name)
			p, err := c.getPod(ctx, it.Metadata.Namespace, it.Metadata.Name)
			if err != nil {
				return nil, err
			}
			if p.Metadata.UID != uid {
				// Deleted and created again between the two reads.
				return nil, fmt.Errorf("pod with UID %s: %w in the cluster", uid, ErrPodNotFound)
			}
			return p, nil
		}
		if next = list.Metadata.Continue; next == "" {
			return nil, fmt.Errorf("pod with UID %s: %w in the cluster", uid, ErrPodNotFound)
		}
	}
	return nil, fmt.Errorf("%w: pod with UID %s: not found in the first %d pages of %d pods", errAPIServerUnavailable, uid, maxPodMetadataPages, podMetadataPageSize)
}

// The SubjectAccessReview of authorization.k8s.io/v1, as much as is sent
// and read.
type subjectAccessReview struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Spec       struct {
		User               string `json:"user"`
		ResourceAttributes struct {
			Namespace string `json:"namespace,omitempty"`
			Verb      string `json:"verb,omitempty"`
			Group     string `json:"group,omitempty"`
			Resource  string `json:"resource,omitempty"`
			Name      string `json:"name,omitempty"`
		} `json:"resourceAttributes"`
	} `json:"spec"`
	Status struct {
		Allowed         bool   `json:"allowed"`
		Denied          bool   `json:"denied,omitempty"`
		Reason          string `json:"reason,omitempty"`
		EvaluationError string `json:"evaluationError,omitempty"`
	} `json:"status"`
}

// reviewImpersonation asks whether user may impersonate-via-spire the pod
// namespace/name, as SPIRE asks it: that user, no groups, the core group's
// pods. An allowed answer stands for reviewTTL.
func (c *apiClient) reviewImpersonation(ctx context.Context, user, namespace, name string) (allowed bool, reason string, err error) {
	key := reviewKey{user, namespace, name}
	if c.reviews.has(key, time.Now()) {
		return true, "", nil
	}
	var req subjectAccessReview
	req.APIVersion, req.Kind = "authorization.k8s.io/v1", "SubjectAccessReview"
	req.Spec.User = user
	ra := &req.Spec.ResourceAttributes
	ra.Namespace, ra.Name, ra.Group, ra.Resource, ra.Verb = namespace, name, "", "pods", impersonateVerb
	var resp subjectAccessReview
	if err := c.do(ctx, http.MethodPost, "/apis/authorization.k8s.io/v1/subjectaccessreviews", "application/json", &req, &resp, maxReviewSize); err != nil {
		return false, "", fmt.Errorf("SubjectAccessReview: %w", err)
	}
	reason = resp.Status.Reason
	if resp.Status.EvaluationError != "" {
		reason += " (evaluation error: " + resp.Status.EvaluationError + ")"
	}
	allowed = resp.Status.Allowed && !resp.Status.Denied
	if allowed {
		c.reviews.remember(key, time.Now())
	}
	return allowed, printable(reason, maxErrorBodySize), nil
}
