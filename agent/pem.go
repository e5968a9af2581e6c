package agent

import (
	"crypto/x509"
	"encoding/pem"
	"fmt"
)

// ParseCertificatesPEM returns the certificates of a PEM file in order,
// skipping blocks of other types (keys, parameters) that often share it.
// An empty result is not an error: callers say what they expected.
func ParseCertificatesPEM(data []byte) ([]*x509.Certificate, error) {
	var certs []*x509.Certificate
	for rest := data; ; {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			return certs, nil
		}
		if block.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("certificate %d: %w", len(certs)+1, err)
		}
		certs = append(certs, c)
	}
}
