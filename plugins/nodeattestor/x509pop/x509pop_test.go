package x509pop

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/conf"
	"github.com/lanyard-dev/lanyard/internal/testkit"
)

// popServer plays the SPIRE Server's x509pop attestor: it checks the chain
// against its CA, sends a nonce and verifies the signed answer.
type popServer struct {
	ca       *x509.Certificate
	nonce    []byte
	leaf     *x509.Certificate
	chainLen int
	verified bool
}

func (p *popServer) SendAttestationData(_ context.Context, d agent.AttestationData) ([]byte, error) {
	if d.Type != "x509pop" {
		return nil, fmt.Errorf("type %q", d.Type)
	}
	var ad struct {
		Certificates [][]byte `json:"certificates"`
	}
	if err := json.Unmarshal(d.Payload, &ad); err != nil {
		return nil, err
	}
	p.chainLen = len(ad.Certificates)
	certs := make([]*x509.Certificate, len(ad.Certificates))
	for i, der := range ad.Certificates {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, err
		}
		certs[i] = c
	}
	roots := x509.NewCertPool()
	roots.AddCert(p.ca)
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	if _, err := certs[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return nil, err
	}
	p.leaf = certs[0]
	p.nonce = make([]byte, 32)
	if _, err := rand.Read(p.nonce); err != nil {
		return nil, err
	}
	ch := map[string]any{}
	switch p.leaf.PublicKey.(type) {
	case *rsa.PublicKey:
		ch["rsa_signature"] = map[string][]byte{"nonce": p.nonce}
	case *ecdsa.PublicKey:
		ch["ecdsa_signature"] = map[string][]byte{"nonce": p.nonce}
	}
	return json.Marshal(ch)
}

func (p *popServer) SendChallengeResponse(_ context.Context, raw []byte) ([]byte, error) {
	var r struct {
		RSA *struct {
			Nonce, Signature []byte
		} `json:"rsa_signature"`
		ECDSA *struct {
			Nonce, R, S []byte
		} `json:"ecdsa_signature"`
	}
	if err := json.Unmarshal(raw, &r); err != nil {
		return nil, err
	}
	digest := func(ours []byte) []byte {
		h := sha256.New()
		h.Write(p.nonce)
		h.Write(ours)
		return h.Sum(nil)
	}
	switch pub := p.leaf.PublicKey.(type) {
	case *rsa.PublicKey:
		if r.RSA == nil || len(r.RSA.Nonce) != 32 {
			return nil, errors.New("no RSA response")
		}
		if err := rsa.VerifyPSS(pub, crypto.SHA256, digest(r.RSA.Nonce), r.RSA.Signature, nil); err != nil {
			return nil, err
		}
	case *ecdsa.PublicKey:
		if r.ECDSA == nil || len(r.ECDSA.Nonce) != 32 {
			return nil, errors.New("no ECDSA response")
		}
		if !ecdsa.Verify(pub, digest(r.ECDSA.Nonce), new(big.Int).SetBytes(r.ECDSA.R), new(big.Int).SetBytes(r.ECDSA.S)) {
			return nil, errors.New("ECDSA signature verify failed")
		}
	}
	p.verified = true
	return nil, nil
}

type pki struct {
	dir                        string
	ca, inter                  *x509.Certificate
	certPath, keyPath, intPath string
}

// newPKI writes a CA -> intermediate -> node chain; the node key is RSA or
// ECDSA, and the node certificate has usage as its key usage.
func newPKI(t *testing.T, rsaKey bool, usage x509.KeyUsage) *pki {
	t.Helper()
	dir := t.TempDir()
	ca := testkit.NewCA(t, "", testkit.WithCommonName("ca"))
	inter := ca.NewIntermediate(t, "", testkit.WithCommonName("inter"))
	var nodeKey crypto.Signer = testkit.NewKey(t)
	if rsaKey {
		nodeKey, _ = rsa.GenerateKey(rand.Reader, 2048)
	}
	node := inter.Issue(t, &x509.Certificate{Subject: pkix.Name{CommonName: "node"}, KeyUsage: usage}, nodeKey.Public())
	p := &pki{dir: dir, ca: ca.Cert, inter: inter.Cert,
		certPath: filepath.Join(dir, "node.pem"), keyPath: filepath.Join(dir, "node.key"), intPath: filepath.Join(dir, "inter.pem")}
	testkit.WritePEM(t, p.certPath, "CERTIFICATE", node.Raw)
	testkit.WritePEM(t, p.keyPath, "PRIVATE KEY", testkit.PKCS8(t, nodeKey))
	testkit.WritePEM(t, p.intPath, "CERTIFICATE", inter.Cert.Raw)
	return p
}

func build(t *testing.T, body string) (agent.NodeAttestor, error) {
	t.Helper()
	data, err := conf.NewSection("agent.conf", body)
	if err != nil {
		t.Fatal(err)
	}
	return New(agent.NodeAttestorConfig{Name: Name, Data: data, Log: hclog.NewNullLogger()})
}

func TestProvesPossession(t *testing.T) {
	for _, rsaKey := range []bool{false, true} {
		t.Run(fmt.Sprintf("rsa=%v", rsaKey), func(t *testing.T) {
			p := newPKI(t, rsaKey, x509.KeyUsageDigitalSignature)
			a, err := build(t, fmt.Sprintf("private_key_path = %q\ncertificate_path = %q\nintermediates_path = %q", p.keyPath, p.certPath, p.intPath))
			if err != nil {
				t.Fatal(err)
			}
			srv := &popServer{ca: p.ca}
			if err := a.Attest(context.Background(), srv); err != nil {
				t.Fatal(err)
			}
			if !srv.verified || srv.chainLen != 2 {
				t.Fatalf("verified=%v chain=%d, want a verified leaf+intermediate", srv.verified, srv.chainLen)
			}
		})
	}
}

func TestWithoutIntermediatesTheChainDoesNotVerify(t *testing.T) {
	p := newPKI(t, false, x509.KeyUsageDigitalSignature)
	a, err := build(t, fmt.Sprintf("private_key_path = %q\ncertificate_path = %q", p.keyPath, p.certPath))
	if err != nil {
		t.Fatal(err)
	}
	srv := &popServer{ca: p.ca}
	if err := a.Attest(context.Background(), srv); err == nil || srv.verified {
		t.Fatal("attestation passed without the intermediate the server needs")
	}
}

func TestPicksUpARenewedCertificate(t *testing.T) {
	p := newPKI(t, false, x509.KeyUsageDigitalSignature)
	a, err := build(t, fmt.Sprintf("private_key_path = %q\ncertificate_path = %q\nintermediates_path = %q", p.keyPath, p.certPath, p.intPath))
	if err != nil {
		t.Fatal(err)
	}
	// Another PKI's files replace the node's: the attestor reads them anew.
	q := newPKI(t, true, x509.KeyUsageDigitalSignature)
	for _, f := range [][2]string{{q.certPath, p.certPath}, {q.keyPath, p.keyPath}, {q.intPath, p.intPath}} {
		data, err := os.ReadFile(f[0])
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(f[1], data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	srv := &popServer{ca: q.ca}
	if err := a.Attest(context.Background(), srv); err != nil {
		t.Fatal(err)
	}
	if _, ok := srv.leaf.PublicKey.(*rsa.PublicKey); !ok {
		t.Fatal("the attestor sent the old certificate")
	}
}

func TestConfigErrors(t *testing.T) {
	p := newPKI(t, false, x509.KeyUsageDigitalSignature)
	noUsage := newPKI(t, false, x509.KeyUsageKeyEncipherment)
	for _, tc := range []struct {
		name, body, want string
	}{
		{"no key", fmt.Sprintf("certificate_path = %q", p.certPath), "private_key_path is required"},
		{"no cert", fmt.Sprintf("private_key_path = %q", p.keyPath), "certificate_path is required"},
		{"unknown key", fmt.Sprintf("private_key_path = %q\ncertificate_path = %q\nagent_path_template = \"x\"", p.keyPath, p.certPath), "agent_path_template"},
		{"missing file", fmt.Sprintf("private_key_path = %q\ncertificate_path = %q", p.keyPath, filepath.Join(p.dir, "nope.pem")), "nope.pem"},
		{"mismatched pair", fmt.Sprintf("private_key_path = %q\ncertificate_path = %q", noUsage.keyPath, p.certPath), "loading the key pair"},
		{"no digitalSignature", fmt.Sprintf("private_key_path = %q\ncertificate_path = %q", noUsage.keyPath, noUsage.certPath), "digitalSignature"},
		{"bad intermediates", fmt.Sprintf("private_key_path = %q\ncertificate_path = %q\nintermediates_path = %q", p.keyPath, p.certPath, p.keyPath), "holds no PEM certificate"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := build(t, tc.body)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want it to mention %q", err, tc.want)
			}
		})
	}
}

// A wrong-length nonce from the server is refused rather than signed.
func TestRefusesAShortNonce(t *testing.T) {
	p := newPKI(t, false, x509.KeyUsageDigitalSignature)
	key, _, err := (&attestor{cfg: pluginConfig{PrivateKeyPath: p.keyPath, CertificatePath: p.certPath}}).load()
	if err != nil {
		t.Fatal(err)
	}
	_, err = respond(key, &challenge{ECDSASignature: &nonceChallenge{Nonce: []byte("short")}})
	if err == nil || !strings.Contains(err.Error(), "nonce") {
		t.Fatalf("err = %v, want the nonce refused", err)
	}
	_, err = respond(key, &challenge{RSASignature: &nonceChallenge{Nonce: make([]byte, 32)}})
	if err == nil || !strings.Contains(err.Error(), "ECDSA challenge") {
		t.Fatalf("err = %v, want the missing ECDSA challenge named", err)
	}
}
