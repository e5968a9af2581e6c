package k8s

import (
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/lanyard-dev/lanyard/internal/testkit"
	authorizationv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// fakeAPIServer answers what the k8s attestor asks the kube-apiserver, in
// its shapes (k8s.io/api types): GET of a pod, the pods' metadata as pages
// of PartialObjectMetadataList, SubjectAccessReview creation. It
// authenticates a bearer token and answers a metav1.Status on errors.
type fakeAPIServer struct {
	srv *httptest.Server
	ca  *testkit.CA

	mu    sync.Mutex
	token string
	pods  []corev1.Pod
	// allow decides a review; nil denies with no reason, as RBAC does.
	allow func(spec authorizationv1.SubjectAccessReviewSpec) (bool, string)
	// sarStatus, when set, is answered to reviews instead.
	sarStatus int
	// pageBytes, when set, pads each page of the list to that size.
	pageBytes int
	// redirect, when set, is where every request is sent (307).
	redirect string
	reviews  []authorizationv1.SubjectAccessReview
	requests []string // "METHOD path?query"
}

func newFakeAPIServer(t testing.TB, token string) *fakeAPIServer {
	t.Helper()
	s := &fakeAPIServer{token: token, ca: testkit.NewCA(t, "")}
	s.srv = httptest.NewUnstartedServer(http.HandlerFunc(s.serve))
	s.srv.Config.ErrorLog = log.New(io.Discard, "", 0)
	key := testkit.NewKey(t)
	cert := s.ca.Issue(t, &x509.Certificate{
		Subject:     pkix.Name{CommonName: "kube-apiserver"},
		DNSNames:    []string{"kubernetes.default.svc"},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}, key.Public())
	s.srv.TLS = &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{cert.Raw, s.ca.Cert.Raw}, PrivateKey: key}}}
	s.srv.StartTLS()
	t.Cleanup(s.srv.Close)
	return s
}

func (s *fakeAPIServer) port() string {
	_, p, _ := net.SplitHostPort(s.srv.Listener.Addr().String())
	return p
}

func (s *fakeAPIServer) set(f func(s *fakeAPIServer)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	f(s)
}

func (s *fakeAPIServer) log() (requests []string, reviews []authorizationv1.SubjectAccessReview) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.requests...), append([]authorizationv1.SubjectAccessReview(nil), s.reviews...)
}

// status answers as the API server does on errors.
func status(w http.ResponseWriter, code int, reason metav1.StatusReason, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(metav1.Status{
		TypeMeta: metav1.TypeMeta{Kind: "Status", APIVersion: "v1"},
		Status:   metav1.StatusFailure, Message: msg, Reason: reason, Code: int32(code),
	})
}

func (s *fakeAPIServer) serve(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.requests = append(s.requests, r.Method+" "+r.URL.RequestURI())
	if s.redirect != "" {
		http.Redirect(w, r, s.redirect+r.URL.RequestURI(), http.StatusTemporaryRedirect)
		return
	}
	if r.Header.Get("Authorization") != "Bearer "+s.token {
		status(w, http.StatusUnauthorized, metav1.StatusReasonUnauthorized, "Unauthorized")
		return
	}
	parts := strings.Split(strings.Trim(r.URL.Path, "/"), "/")
	switch {
	case r.Method == http.MethodGet && len(parts) == 6 && parts[0] == "api" && parts[2] == "namespaces" && parts[4] == "pods":
		for _, p := range s.pods {
			if p.Namespace == parts[3] && p.Name == parts[5] {
				writeJSON(w, http.StatusOK, p)
				return
			}
		}
		status(w, http.StatusNotFound, metav1.StatusReasonNotFound, fmt.Sprintf("pods %q not found", parts[5]))
	case r.Method == http.MethodGet && r.URL.Path == "/api/v1/pods":
		s.listMetadata(w, r)
	case r.Method == http.MethodPost && r.URL.Path == "/apis/authorization.k8s.io/v1/subjectaccessreviews":
		s.review(w, r)
	default:
		status(w, http.StatusNotFound, metav1.StatusReasonNotFound, "the server could not find the requested resource")
	}
}

// listMetadata answers a page of the pods as PartialObjectMetadataList;
// the continue token is the next item's index.
func (s *fakeAPIServer) listMetadata(w http.ResponseWriter, r *http.Request) {
	if !strings.Contains(r.Header.Get("Accept"), "as=PartialObjectMetadataList;g=meta.k8s.io;v=v1") {
		status(w, http.StatusNotAcceptable, metav1.StatusReasonNotAcceptable, "want metadata only in this test")
		return
	}
	limit, _ := strconv.Atoi(r.URL.Query().Get("limit"))
	start, _ := strconv.Atoi(r.URL.Query().Get("continue"))
	if limit <= 0 {
		limit = len(s.pods)
	}
	end := min(start+limit, len(s.pods))
	list := metav1.PartialObjectMetadataList{TypeMeta: metav1.TypeMeta{Kind: "PartialObjectMetadataList", APIVersion: "meta.k8s.io/v1"}}
	list.ResourceVersion = "4242"
	if end < len(s.pods) {
		list.Continue = strconv.Itoa(end)
	}
	for _, p := range s.pods[start:end] {
		list.Items = append(list.Items, metav1.PartialObjectMetadata{TypeMeta: metav1.TypeMeta{Kind: "PartialObjectMetadata", APIVersion: "meta.k8s.io/v1"}, ObjectMeta: p.ObjectMeta})
	}
	if s.pageBytes > 0 && len(list.Items) > 0 {
		list.Items[0].Annotations = map[string]string{"padding": strings.Repeat("x", s.pageBytes)}
	}
	writeJSON(w, http.StatusOK, list)
}

func (s *fakeAPIServer) review(w http.ResponseWriter, r *http.Request) {
	var sar authorizationv1.SubjectAccessReview
	dec := json.NewDecoder(r.Body)
	dec.DisallowUnknownFields()
	if err := dec.Decode(&sar); err != nil || sar.Kind != "SubjectAccessReview" || sar.APIVersion != "authorization.k8s.io/v1" {
		status(w, http.StatusBadRequest, metav1.StatusReasonBadRequest, fmt.Sprintf("not a SubjectAccessReview: %v", err))
		return
	}
	s.reviews = append(s.reviews, sar)
	if s.sarStatus != 0 {
		status(w, s.sarStatus, metav1.StatusReasonForbidden, `subjectaccessreviews.authorization.k8s.io is forbidden: User "system:serviceaccount:spire:spire-agent" cannot create resource "subjectaccessreviews" in API group "authorization.k8s.io" at the cluster scope`)
		return
	}
	if s.allow != nil {
		sar.Status.Allowed, sar.Status.Reason = s.allow(sar.Spec)
	}
	writeJSON(w, http.StatusCreated, sar)
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(v)
}

// newBrokerEnv is newSecureEnv with an API server reached as in a pod
// (KUBERNETES_SERVICE_HOST and _PORT), which accepts the same token.
func newBrokerEnv(t testing.TB, hcl string) (*testEnv, *fakeAPIServer) {
	t.Helper()
	e := &testEnv{t: t, dir: t.TempDir(), env: map[string]string{}}
	e.kubelet = newFakeKubelet(t, kubeletOptions{dnsNames: []string{"node-a"}})
	e.kubelet.tokens[testToken] = "system:serviceaccount:spire:spire-agent"
	e.kubelet.allowed["system:serviceaccount:spire:spire-agent"] = true
	api := newFakeAPIServer(t, testToken)
	testkit.WritePEM(t, e.path("ca.crt"), "CERTIFICATE", e.kubelet.ca.Cert.Raw)
	testkit.WritePEM(t, e.path("api-ca.crt"), "CERTIFICATE", api.ca.Cert.Raw)
	e.writeToken(testToken)
	e.env["KUBERNETES_SERVICE_HOST"], e.env["KUBERNETES_SERVICE_PORT"] = "127.0.0.1", api.port()
	e.build(fmt.Sprintf("kubelet_secure_port = %d\nkubelet_ca_path = %q\ntoken_path = %q\napi_server_ca_path = %q\npoll_retry_interval = \"1ms\"\n%s",
		e.kubelet.port(), e.path("ca.crt"), e.path("token"), e.path("api-ca.crt"), hcl))
	return e, api
}
