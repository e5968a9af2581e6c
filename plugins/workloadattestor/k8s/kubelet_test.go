package k8s

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testkit"
	corev1 "k8s.io/api/core/v1"
)

func (e *testEnv) fetch() (*podList, error) {
	e.t.Helper()
	return e.a.kubelet.fetch(testkit.Context(e.t, time.Minute))
}

// wantErr checks that err is of class and says every one of says.
func wantErr(t *testing.T, err, class error, says ...string) {
	t.Helper()
	t.Logf("error: %v", err)
	if !errors.Is(err, class) {
		t.Errorf("err = %v; want %v", err, class)
		return
	}
	for _, s := range says {
		if !strings.Contains(err.Error(), s) {
			t.Errorf("error %q does not say %q", err, s)
		}
	}
}

func TestKubeletTokenRotation(t *testing.T) {
	e := newSecureEnv(t, "")
	if _, err := e.fetch(); err != nil {
		t.Fatal(err)
	}
	// The kubelet's token review now accepts only the new token, which
	// replaces the file as a projected volume rotates it.
	e.kubelet.set(func(k *fakeKubelet) {
		k.tokens = map[string]string{"rotated-token": "system:serviceaccount:spire:spire-agent"}
	})
	e.writeToken("rotated-token")
	if _, err := e.fetch(); err != nil {
		t.Fatalf("after rotation: %v", err)
	}
	if e.kubelet.lastToken != "rotated-token" {
		t.Errorf("the kubelet saw %q after rotation", e.kubelet.lastToken)
	}
}

func TestKubeletTokenRefused(t *testing.T) {
	e := newSecureEnv(t, "")
	e.kubelet.set(func(k *fakeKubelet) { k.tokens = map[string]string{} })
	_, err := e.fetch()
	wantErr(t, err, errKubeletUnauthorized, "401", e.path("token"), "expired", "--authentication-token-webhook", `the kubelet said "Unauthorized"`)
	if strings.Contains(err.Error(), testToken) || strings.Contains(e.logs.String(), testToken) {
		t.Errorf("the token is in an error or a log")
	}
	// Fixed on the kubelet's side: the next fetch works.
	e.kubelet.set(func(k *fakeKubelet) {
		k.tokens = map[string]string{testToken: "system:serviceaccount:spire:spire-agent"}
	})
	if _, err := e.fetch(); err != nil {
		t.Errorf("after the kubelet accepts the token again: %v", err)
	}
}

func TestKubeletForbidden(t *testing.T) {
	e := newSecureEnv(t, "")
	e.kubelet.set(func(k *fakeKubelet) { k.allowed = map[string]bool{} })
	_, err := e.fetch()
	wantErr(t, err, errKubeletForbidden, "403", "nodes/proxy", "ClusterRole", "Forbidden (user=system:serviceaccount:spire:spire-agent, verb=get, resource=nodes, subresource=proxy)")
}

func TestKubeletClientCertificate(t *testing.T) {
	e := newSecureEnv(t, "")
	certPath, keyPath := e.kubelet.clientCert(t, e.dir, "spire-agent")
	e.kubelet.allowed["spire-agent"] = true
	e.build(fmt.Sprintf("kubelet_secure_port = %d\nkubelet_ca_path = %q\ncertificate_path = %q\nprivate_key_path = %q", e.kubelet.port(), e.path("ca.crt"), certPath, keyPath))
	if _, err := e.fetch(); err != nil {
		t.Fatal(err)
	}
	if e.kubelet.lastToken != "" {
		t.Errorf("a token was sent with certificate authentication")
	}
	// A rotated certificate of a user without nodes/proxy: read again, and
	// refused by the kubelet's authorizer.
	e.kubelet.clientCert(t, e.dir, "someone-else")
	_, err := e.fetch()
	wantErr(t, err, errKubeletForbidden, "user=someone-else")

	// A certificate the kubelet's client CA did not sign fails the handshake.
	other := testkit.NewCA(t, "")
	key := testkit.NewKey(t)
	testkit.WritePEM(t, certPath, "CERTIFICATE", other.Issue(t, clientTemplate("spire-agent"), key.Public()).Raw)
	testkit.WritePEM(t, keyPath, "PRIVATE KEY", testkit.PKCS8(t, key))
	_, err = e.fetch()
	wantErr(t, err, errKubeletUnreachable, "refused the client certificate", "--client-ca-file")

	// A key that is not the certificate's.
	testkit.WritePEM(t, keyPath, "PRIVATE KEY", testkit.PKCS8(t, testkit.NewKey(t)))
	_, err = e.fetch()
	wantErr(t, err, errKubeletCredentials, certPath, keyPath)
}

func TestKubeletAnonymous(t *testing.T) {
	e := newSecureEnv(t, "use_anonymous_authentication = true")
	_, err := e.fetch()
	wantErr(t, err, errKubeletUnauthorized, "--anonymous-auth=false", "token_path or certificate_path")
	e.kubelet.set(func(k *fakeKubelet) { k.anonymous = true })
	_, err = e.fetch()
	wantErr(t, err, errKubeletForbidden, "user=system:anonymous")
	e.kubelet.set(func(k *fakeKubelet) { k.allowed["system:anonymous"] = true })
	if _, err := e.fetch(); err != nil {
		t.Fatal(err)
	}
	if e.kubelet.lastToken != "" {
		t.Errorf("a token was sent with anonymous authentication")
	}
}

// Which address the kubelet is reached at and which name its certificate
// must carry, with and without a node name, as SPIRE does it.
func TestKubeletVerification(t *testing.T) {
	e := newSecureEnv(t, "")
	base := fmt.Sprintf("kubelet_secure_port = %d\ntoken_path = %q\n", e.kubelet.port(), e.path("token"))
	testkit.WritePEM(t, e.path("other-ca.crt"), "CERTIFICATE", testkit.NewCA(t, "").Cert.Raw)
	for _, tc := range []struct {
		name, hcl string
		ca        string // kubelet_ca_path's file, ca.crt when empty
		env       map[string]string
		wantURL   string
		redirect  bool
		wantErr   []string
	}{
		// The certificate names node-a, not 127.0.0.1: without a node name
		// only the chain is checked.
		{name: "no node name: the chain only", wantURL: "https://127.0.0.1:"},
		{name: "no node name: another CA", ca: "other-ca.crt", wantErr: []string{"not trusted", "unknown authority", "check kubelet_ca_path"}},
		{name: "node_name on the certificate", hcl: `node_name = "node-a"`, redirect: true, wantURL: "https://node-a:"},
		{name: "node_name not on the certificate", hcl: `node_name = "node-b"`, redirect: true, wantErr: []string{"not trusted", "node-b", "must name the node"}},
		{name: "node name from MY_NODE_NAME", env: map[string]string{"MY_NODE_NAME": "node-a"}, redirect: true, wantURL: "https://node-a:"},
		{name: "node name from node_name_env", hcl: `node_name_env = "NODE"`, env: map[string]string{"NODE": "node-b", "MY_NODE_NAME": "node-a"}, redirect: true, wantErr: []string{"node-b"}},
		{name: "node_name before the variable", hcl: `node_name = "node-a"`, env: map[string]string{"MY_NODE_NAME": "node-b"}, redirect: true, wantURL: "https://node-a:"},
		{name: "skip verification", ca: "other-ca.crt", hcl: "skip_kubelet_verification = true\nnode_name = \"node-b\"", redirect: true, wantURL: "https://node-b:"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e.env = map[string]string{}
			for k, v := range tc.env {
				e.env[k] = v
			}
			var dial dialFunc
			if tc.redirect {
				dial = e.redirectDial()
			}
			a, _, err := e.tryBuild(base+fmt.Sprintf("kubelet_ca_path = %q\n", e.path(orDefault(tc.ca, "ca.crt")))+tc.hcl, dial)
			if err != nil {
				t.Fatal(err)
			}
			_, err = a.kubelet.fetch(testkit.Context(t, time.Minute))
			if tc.wantErr != nil {
				wantErr(t, err, errKubeletNotTrusted, tc.wantErr...)
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !strings.HasPrefix(a.kubelet.url, tc.wantURL) {
				t.Errorf("URL %s, want %s...", a.kubelet.url, tc.wantURL)
			}
		})
	}
}

func TestKubeletCredentialFiles(t *testing.T) {
	e := newSecureEnv(t, "")
	port := e.kubelet.port()
	if err := os.WriteFile(e.path("garbage.crt"), []byte("not a certificate"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(e.path("empty-token"), []byte(" \n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, hcl string
		says      []string
	}{
		{"no CA file", fmt.Sprintf("kubelet_ca_path = %q\ntoken_path = %q", e.path("missing.crt"), e.path("token")), []string{"kubelet_ca_path", "missing.crt", "no such file", "skip_kubelet_verification"}},
		{"not a CA file", fmt.Sprintf("kubelet_ca_path = %q\ntoken_path = %q", e.path("garbage.crt"), e.path("token")), []string{"garbage.crt", "no PEM certificate"}},
		{"no token", fmt.Sprintf("kubelet_ca_path = %q\ntoken_path = %q", e.path("ca.crt"), e.path("missing-token")), []string{"token_path", "missing-token", "no such file"}},
		{"an empty token", fmt.Sprintf("kubelet_ca_path = %q\ntoken_path = %q", e.path("ca.crt"), e.path("empty-token")), []string{"empty-token", "is empty"}},
		{"no client certificate", fmt.Sprintf("kubelet_ca_path = %q\ncertificate_path = %q\nprivate_key_path = %q", e.path("ca.crt"), e.path("missing.crt"), e.path("missing.key")), []string{"certificate_path", "missing.crt"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, _, err := e.tryBuild(fmt.Sprintf("kubelet_secure_port = %d\n%s", port, tc.hcl), nil)
			if err != nil {
				t.Fatalf("the constructor must not read files: %v", err)
			}
			_, err = a.kubelet.fetch(testkit.Context(t, time.Minute))
			wantErr(t, err, errKubeletCredentials, tc.says...)
		})
	}
	if n := e.kubelet.count(); n != 0 {
		t.Errorf("the kubelet was asked %d times without credentials", n)
	}
}

func TestKubeletAnswers(t *testing.T) {
	e := newSecureEnv(t, "max_pod_list_size = 2000")
	e.kubelet.pods = func(int) []corev1.Pod { return testPods(3) }
	_, err := e.fetch()
	wantErr(t, err, errPodListTooLarge, "max_pod_list_size", "2000 bytes")

	e.kubelet.set(func(k *fakeKubelet) { k.body = []byte(`{"kind":"Status","status":"Failure"`) })
	_, err = e.fetch()
	wantErr(t, err, errMalformedPodList, "unexpected EOF")

	e.kubelet.set(func(k *fakeKubelet) { k.body, k.status = nil, http.StatusServiceUnavailable })
	_, err = e.fetch()
	wantErr(t, err, errKubeletStatus, "503 Service Unavailable", "internal error")
}

func TestKubeletUnreachable(t *testing.T) {
	// Nothing listens on a port just closed.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closedPort := l.Addr().(*net.TCPAddr).Port
	l.Close()
	a, _, err := buildAttestor(fmt.Sprintf("kubelet_secure_port = %d\nskip_kubelet_verification = true\nuse_anonymous_authentication = true", closedPort), nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	_, err = a.kubelet.fetch(testkit.Context(t, time.Minute))
	wantErr(t, err, errKubeletUnreachable, "nothing listens", "kubelet_secure_port", "hostNetwork")

	// The secure port's settings against the read-only port, and back.
	plain := newFakeKubelet(t, kubeletOptions{plain: true})
	a, _, err = buildAttestor(fmt.Sprintf("kubelet_secure_port = %d\nskip_kubelet_verification = true\nuse_anonymous_authentication = true", plain.port()), nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	_, err = a.kubelet.fetch(testkit.Context(t, time.Minute))
	wantErr(t, err, errKubeletUnreachable, "serves plain HTTP", "kubelet_read_only_port")
	e := newSecureEnv(t, "")
	a, _, err = buildAttestor(fmt.Sprintf("kubelet_read_only_port = %d", e.kubelet.port()), nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	_, err = a.kubelet.fetch(testkit.Context(t, time.Minute))
	wantErr(t, err, errKubeletStatus, "serves TLS", "kubelet_secure_port")

	// A kubelet that never answers.
	gate := make(chan struct{})
	t.Cleanup(func() { close(gate) })
	e.kubelet.set(func(k *fakeKubelet) { k.gate = gate })
	e.a.kubelet.timeout = 100 * time.Millisecond
	_, err = e.fetch()
	// Headers may arrive before the deadline (the gate holds the body), or not.
	wantErr(t, err, errKubeletUnreachable, "within 100ms")
}
