package k8stest

import (
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"testing"

	"github.com/lanyard-dev/lanyard/internal/testkit"
)

// clusterPKI is the cluster's credentials, as files under dir/pki.
type clusterPKI struct {
	dir string
	// clusterCA signs the API server's serving certificate and client
	// certificates; it is the kube-root-ca.crt every pod trusts.
	clusterCA *testkit.CA
	// kubeletCA signs only the kubelet's serving certificate, so a test
	// proves the attestor checks the kubelet against kubelet_ca_path.
	kubeletCA  *testkit.CA
	adminToken string
}

// File names under pki/.
const (
	clusterCAFile   = "cluster-ca.crt"
	kubeletCAFile   = "kubelet-ca.crt"
	apiCertFile     = "apiserver.crt"
	apiKeyFile      = "apiserver.key"
	kubeletCertFile = "kubelet.crt"
	kubeletKeyFile  = "kubelet.key"
	saKeyFile       = "service-account.key"
	saPubFile       = "service-account.pub"
	tokensFile      = "tokens.csv"
)

func newClusterPKI(t testing.TB, dir, nodeName string) *clusterPKI {
	t.Helper()
	p := &clusterPKI{dir: filepath.Join(dir, "pki")}
	if err := os.MkdirAll(p.dir, 0o755); err != nil {
		t.Fatal(err)
	}
	p.clusterCA = testkit.NewCA(t, "", testkit.WithCommonName("k8stest cluster CA"))
	p.kubeletCA = testkit.NewCA(t, "", testkit.WithCommonName("k8stest kubelet CA"))
	p.writeCert(t, clusterCAFile, p.clusterCA.Cert)
	p.writeCert(t, kubeletCAFile, p.kubeletCA.Cert)
	loopback := []net.IP{net.IPv4(127, 0, 0, 1)}
	p.serving(t, p.clusterCA, apiCertFile, apiKeyFile, "kube-apiserver",
		[]string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"}, loopback)
	p.serving(t, p.kubeletCA, kubeletCertFile, kubeletKeyFile, nodeName,
		[]string{nodeName, "localhost"}, loopback)
	saKey := testkit.NewKey(t)
	testkit.WritePEM(t, p.path(saKeyFile), "PRIVATE KEY", testkit.PKCS8(t, saKey))
	pub, err := x509.MarshalPKIXPublicKey(saKey.Public())
	if err != nil {
		t.Fatal(err)
	}
	// The API server reads public keys from PEM "PUBLIC KEY" blocks only.
	testkit.WritePEM(t, p.path(saPubFile), "PUBLIC KEY", pub)

	var token [16]byte
	if _, err := rand.Read(token[:]); err != nil {
		t.Fatal(err)
	}
	p.adminToken = hex.EncodeToString(token[:])
	// token,user,uid,"group1,group2"
	line := p.adminToken + `,k8stest-admin,k8stest-admin,"system:masters"` + "\n"
	if err := os.WriteFile(p.path(tokensFile), []byte(line), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func (p *clusterPKI) path(name string) string { return filepath.Join(p.dir, name) }

func (p *clusterPKI) writeCert(t testing.TB, name string, cert *x509.Certificate) {
	t.Helper()
	if err := os.WriteFile(p.path(name), testkit.PEM("CERTIFICATE", cert.Raw), 0o644); err != nil {
		t.Fatal(err)
	}
}

func (p *clusterPKI) serving(t testing.TB, ca *testkit.CA, certName, keyName, cn string, dns []string, ips []net.IP) {
	t.Helper()
	key := testkit.NewKey(t)
	cert := ca.Issue(t, &x509.Certificate{
		Subject:     pkix.Name{CommonName: cn},
		DNSNames:    dns,
		IPAddresses: ips,
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}, key.Public())
	p.writeCert(t, certName, cert)
	testkit.WritePEM(t, p.path(keyName), "PRIVATE KEY", testkit.PKCS8(t, key))
}

// ClientCert issues a client certificate from the cluster CA for user
// (the subject's CN) in groups (its O), as files in a fresh dir: the
// kubelet and the API server both accept it. A user needs RBAC to do
// anything (BindClusterRole).
func (c *Cluster) ClientCert(user string, groups ...string) (certPath, keyPath string) {
	t := c.t
	t.Helper()
	key := testkit.NewKey(t)
	cert := c.pki.clusterCA.Issue(t, &x509.Certificate{
		Subject:     pkix.Name{CommonName: user, Organization: groups},
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}, key.Public())
	dir, err := os.MkdirTemp(c.pki.dir, "client-")
	if err != nil {
		t.Fatal(err)
	}
	certPath, keyPath = filepath.Join(dir, "client.crt"), filepath.Join(dir, "client.key")
	if err := os.WriteFile(certPath, testkit.PEM("CERTIFICATE", cert.Raw), 0o644); err != nil {
		t.Fatal(err)
	}
	testkit.WritePEM(t, keyPath, "PRIVATE KEY", testkit.PKCS8(t, key))
	return certPath, keyPath
}

// KubeletCAPath is the CA that signed the kubelet's serving certificate:
// the attestor's kubelet_ca_path.
func (c *Cluster) KubeletCAPath() string { return c.pki.path(kubeletCAFile) }

// ClusterCAPath is the CA of the API server's certificate, also what pods
// get as kube-root-ca.crt (a service account's ca.crt).
func (c *Cluster) ClusterCAPath() string { return c.pki.path(clusterCAFile) }

// ServiceAccountPublicKeyPath is the public key (PEM, PKIX ECDSA) that
// verifies the cluster's service account tokens.
func (c *Cluster) ServiceAccountPublicKeyPath() string { return c.pki.path(saPubFile) }

// Kubeconfig is the path of a kubeconfig for the cluster's admin
// (system:masters).
func (c *Cluster) Kubeconfig() string { return filepath.Join(c.Dir, "admin.kubeconfig") }

// writeKubeconfig writes a kubeconfig (as JSON, which every kubeconfig
// reader accepts) that reaches the API server with token.
func (c *Cluster) writeKubeconfig(path, user, token string) error {
	ca, err := os.ReadFile(c.ClusterCAPath())
	if err != nil {
		return err
	}
	cfg := map[string]any{
		"apiVersion": "v1",
		"kind":       "Config",
		"clusters": []any{map[string]any{"name": "k8stest", "cluster": map[string]any{
			"server":                     c.APIServer,
			"certificate-authority-data": base64.StdEncoding.EncodeToString(ca),
		}}},
		"users": []any{map[string]any{"name": user, "user": map[string]any{"token": token}}},
		"contexts": []any{map[string]any{"name": "k8stest", "context": map[string]any{
			"cluster": "k8stest", "user": user,
		}}},
		"current-context": "k8stest",
	}
	data, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, data, 0o600)
}
