package agent

import (
	"crypto/x509"
	"encoding/pem"
	"slices"
	"testing"
)

func TestParseCertificatesPEM(t *testing.T) {
	a, b := newTestCA(t, testTD).Cert, newTestCA(t, testTD).Cert
	var data []byte
	data = append(data, "preamble\n"...)
	data = append(data, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: a.Raw})...)
	data = append(data, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: []byte("not read")})...)
	data = append(data, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: b.Raw})...)
	certs, err := ParseCertificatesPEM(data)
	if err != nil || !slices.EqualFunc(certs, []*x509.Certificate{a, b}, (*x509.Certificate).Equal) {
		t.Fatalf("ParseCertificatesPEM = %v, %v; want the two certificates in order", certs, err)
	}
	for _, none := range [][]byte{nil, []byte("no PEM here"), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: []byte("x")})} {
		if certs, err := ParseCertificatesPEM(none); err != nil || len(certs) != 0 {
			t.Errorf("ParseCertificatesPEM(%q) = %v, %v; want none and no error", none, certs, err)
		}
	}
	if _, err := ParseCertificatesPEM(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte("bad")})); err == nil {
		t.Error("a CERTIFICATE block that does not parse was accepted")
	}
}
