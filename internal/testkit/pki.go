package testkit

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"net/url"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// CA is a real ECDSA P-256 certificate authority: its certificate and key.
type CA struct {
	Cert *x509.Certificate
	Key  *ecdsa.PrivateKey
}

// CertOption changes a certificate template before it is signed.
type CertOption func(*x509.Certificate)

// WithValidity sets the certificate's validity window.
func WithValidity(notBefore, notAfter time.Time) CertOption {
	return func(c *x509.Certificate) { c.NotBefore, c.NotAfter = notBefore, notAfter }
}

// WithCommonName sets the subject's common name.
func WithCommonName(cn string) CertOption {
	return func(c *x509.Certificate) { c.Subject = pkix.Name{CommonName: cn} }
}

// NewCA makes a self-signed CA valid from an hour ago for a day. uri, when
// not empty, is its URI SAN: a trust domain's ID for a SPIFFE CA.
func NewCA(t testing.TB, uri string, opts ...CertOption) *CA {
	t.Helper()
	return newCA(t, nil, uri, opts)
}

// NewTrustDomainCA makes a self-signed CA for td (URI SAN spiffe://td).
func NewTrustDomainCA(t testing.TB, td spiffeid.TrustDomain, opts ...CertOption) *CA {
	t.Helper()
	return newCA(t, nil, td.IDString(), opts)
}

// NewIntermediate makes a CA signed by ca.
func (ca *CA) NewIntermediate(t testing.TB, uri string, opts ...CertOption) *CA {
	t.Helper()
	return newCA(t, ca, uri, opts)
}

func newCA(t testing.TB, parent *CA, uri string, opts []CertOption) *CA {
	t.Helper()
	key := NewKey(t)
	tmpl := &x509.Certificate{
		Subject:               pkix.Name{CommonName: "test CA " + uri},
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	if uri != "" {
		tmpl.URIs = []*url.URL{parseURI(t, uri)}
	}
	for _, o := range opts {
		o(tmpl)
	}
	issuer := &CA{Cert: tmpl, Key: key} // self-signed: the template is its own issuer
	if parent != nil {
		issuer = parent
	}
	return &CA{Cert: issuer.Issue(t, tmpl, key.Public()), Key: key}
}

// Issue signs tmpl for pub and parses the result. A zero serial number
// becomes a random one, a zero validity one from an hour ago for a day.
func (ca *CA) Issue(t testing.TB, tmpl *x509.Certificate, pub crypto.PublicKey) *x509.Certificate {
	t.Helper()
	cert, err := ca.issue(tmpl, pub)
	if err != nil {
		t.Fatal(err)
	}
	return cert
}

func (ca *CA) issue(tmpl *x509.Certificate, pub crypto.PublicKey) (*x509.Certificate, error) {
	if tmpl.SerialNumber == nil {
		tmpl.SerialNumber = Serial()
	}
	if tmpl.NotBefore.IsZero() && tmpl.NotAfter.IsZero() {
		now := time.Now()
		tmpl.NotBefore, tmpl.NotAfter = now.Add(-time.Hour), now.Add(24*time.Hour)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, pub, ca.Key)
	if err != nil {
		return nil, err
	}
	return x509.ParseCertificate(der)
}

// SignSVID signs an X.509-SVID for id and pub, valid from notBefore to
// notAfter, with dnsNames as DNS SANs. It returns an error rather than
// failing a test, for fakes that sign on other goroutines.
func (ca *CA) SignSVID(pub crypto.PublicKey, id string, notBefore, notAfter time.Time, dnsNames ...string) (*x509.Certificate, error) {
	u, err := url.Parse(id)
	if err != nil {
		return nil, err
	}
	return ca.issue(&x509.Certificate{
		Subject:               pkix.Name{Organization: []string{"test"}},
		URIs:                  []*url.URL{u},
		DNSNames:              dnsNames,
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
	}, pub)
}

// ErrNoKey is UpstreamSVID's error for a request without a key: the agent
// always sends one, so this is a bug in the agent.
var ErrNoKey = errors.New("the request has no ECDSA key")

// UpstreamSVID signs an X.509-SVID as a fake upstream does for a request:
// for key, valid from backdate before now for ttl (an hour when zero).
func (ca *CA) UpstreamSVID(key crypto.Signer, id string, now time.Time, backdate, ttl time.Duration, dnsNames ...string) (*x509.Certificate, error) {
	if k, ok := key.(*ecdsa.PrivateKey); !ok || k == nil {
		return nil, ErrNoKey
	}
	if ttl == 0 {
		ttl = time.Hour
	}
	return ca.SignSVID(key.Public(), id, now.Add(-backdate), now.Add(ttl), dnsNames...)
}

// SVID makes a key and an X.509-SVID for id signed by ca, valid from a
// minute ago for ttl.
func (ca *CA) SVID(t testing.TB, id string, ttl time.Duration) (*x509.Certificate, *ecdsa.PrivateKey) {
	t.Helper()
	key := NewKey(t)
	now := time.Now()
	cert, err := ca.SignSVID(key.Public(), id, now.Add(-time.Minute), now.Add(ttl))
	if err != nil {
		t.Fatal(err)
	}
	return cert, key
}

// Bundle is a SPIFFE bundle for td holding ca's certificate as its one
// X.509 authority.
func (ca *CA) Bundle(td spiffeid.TrustDomain) *spiffebundle.Bundle {
	return spiffebundle.FromX509Authorities(td, []*x509.Certificate{ca.Cert})
}

func parseURI(t testing.TB, s string) *url.URL {
	t.Helper()
	u, err := url.Parse(s)
	if err != nil {
		t.Fatal(err)
	}
	return u
}
