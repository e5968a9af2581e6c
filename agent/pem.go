package agent

import (
	"crypto/sha256"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"strings"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// ParseCertificatesPEM returns the certificates of a PEM file in order,
// skipping blocks of other types (keys, parameters) that often share it.
// An empty result is not an error: callers say what they expected. It is
// go-spiffe's bundle parser, which also drops a repeated certificate; the
// trust domain is moot, only the certificates are read.
func ParseCertificatesPEM(data []byte) ([]*x509.Certificate, error) {
	// go-spiffe refuses data with no PEM block at all.
	if block, _ := pem.Decode(data); block == nil {
		return nil, nil
	}
	b, err := x509bundle.Parse(spiffeid.TrustDomain{}, data)
	if err != nil {
		return nil, err
	}
	return b.X509Authorities(), nil
}

// Fingerprint is the SHA-256 of a certificate's DER, in the colon-separated
// upper-case hex of `openssl x509 -noout -fingerprint -sha256`, so that an
// operator can compare a logged CA with a bundle file.
func Fingerprint(cert *x509.Certificate) string {
	sum := sha256.Sum256(cert.Raw)
	var b strings.Builder
	for i, c := range sum {
		if i > 0 {
			b.WriteByte(':')
		}
		fmt.Fprintf(&b, "%02X", c)
	}
	return b.String()
}
