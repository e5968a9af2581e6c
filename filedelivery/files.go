package filedelivery

import (
	"bytes"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/lanyard-dev/lanyard/agent"
	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// The Filesystem Delivery names (SPIFFE standard, section 2).
const (
	CredentialBundleName  = "credential-bundle.private-key.pem"
	TrustBundleNameSuffix = ".spiffe-trust-bundle.pem"
)

// pickX509SVID is the SVID with the configured hint, or the default one.
func pickX509SVID(xc *workloadapi.X509Context, hint string) (*x509svid.SVID, error) {
	if len(xc.SVIDs) == 0 {
		return nil, fmt.Errorf("the Workload API sent no X.509-SVID")
	}
	if hint == "" {
		return xc.DefaultSVID(), nil
	}
	for _, s := range xc.SVIDs {
		if s.Hint == hint {
			return s, nil
		}
	}
	return nil, fmt.Errorf("no X.509-SVID has the hint %q", hint)
}

func pickJWTSVID(svids []*jwtsvid.SVID, hint string) (*jwtsvid.SVID, error) {
	if len(svids) == 0 {
		return nil, fmt.Errorf("the Workload API sent no JWT-SVID")
	}
	if hint == "" {
		return svids[0], nil
	}
	for _, s := range svids {
		if s.Hint == hint {
			return s, nil
		}
	}
	return nil, fmt.Errorf("no JWT-SVID has the hint %q", hint)
}

func encodeCerts(certs []*x509.Certificate, omitExpired bool, now time.Time) []byte {
	var b bytes.Buffer
	for _, c := range certs {
		if omitExpired && now.After(c.NotAfter) {
			continue
		}
		_ = pem.Encode(&b, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	}
	return b.Bytes()
}

func encodeKey(svid *x509svid.SVID) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(svid.PrivateKey)
	if err != nil {
		return nil, fmt.Errorf("encoding the private key of %s: %w", svid.ID, err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// ownBundleAndKey is the bundle of the SVID's trust domain and its PEM key.
func ownBundleAndKey(svid *x509svid.SVID, bundles *x509bundle.Set) (*x509bundle.Bundle, []byte, error) {
	own, ok := bundles.Get(svid.ID.TrustDomain())
	if !ok {
		return nil, nil, fmt.Errorf("the Workload API sent no bundle for %s", svid.ID.TrustDomain())
	}
	key, err := encodeKey(svid)
	return own, key, err
}

// writeX509 writes spiffe-helper's three files, the key first, so that a
// certificate is never on disk before its key.
func writeX509(c *Config, svid *x509svid.SVID, bundles *x509bundle.Set, now time.Time) error {
	own, key, err := ownBundleAndKey(svid, bundles)
	if err != nil {
		return err
	}
	chain := svid.Certificates
	authorities := own.X509Authorities()
	if c.AddIntermediatesToBundle {
		authorities = append(authorities, chain[1:]...)
		chain = chain[:1]
	}
	if c.IncludeFederatedDomains {
		for _, b := range bundles.Bundles() {
			if b.TrustDomain() != own.TrustDomain() {
				authorities = append(authorities, b.X509Authorities()...)
			}
		}
	}
	if err := agent.WriteFileAtomicMode(c.SVIDKeyFile, key, c.KeyFileMode); err != nil {
		return err
	}
	if err := agent.WriteFileAtomicMode(c.SVIDFile, encodeCerts(chain, c.OmitExpired, now), c.CertFileMode); err != nil {
		return err
	}
	return agent.WriteFileAtomicMode(c.SVIDBundleFile, encodeCerts(authorities, c.OmitExpired, now), c.CertFileMode)
}

// writeCredentialFolder writes the Filesystem Delivery layout: one
// owner-only file with the key and the chain (so that a reader that opens
// it once always gets a matching pair), and one trust bundle file per
// trust domain. Trust bundle files of trust domains no longer sent are
// removed.
func writeCredentialFolder(c *Config, svid *x509svid.SVID, bundles *x509bundle.Set) error {
	own, key, err := ownBundleAndKey(svid, bundles)
	if err != nil {
		return err
	}
	var chain []*x509.Certificate
	for _, cert := range svid.Certificates {
		if !own.HasX509Authority(cert) { // the standard's chain stops before the anchor
			chain = append(chain, cert)
		}
	}
	data := append(key, encodeCerts(chain, false, time.Time{})...)
	if err := agent.WriteFileAtomic(filepath.Join(c.CredentialFolder, CredentialBundleName), data); err != nil {
		return err
	}
	keep := map[string]bool{}
	for _, b := range bundles.Bundles() {
		if b.TrustDomain() != own.TrustDomain() && !c.IncludeFederatedDomains {
			continue
		}
		name := b.TrustDomain().Name() + TrustBundleNameSuffix
		keep[name] = true
		if err := agent.WriteFileAtomicMode(filepath.Join(c.CredentialFolder, name), encodeCerts(b.X509Authorities(), false, time.Time{}), c.CertFileMode); err != nil {
			return err
		}
	}
	entries, err := os.ReadDir(c.CredentialFolder)
	if err != nil {
		return err
	}
	for _, e := range entries {
		if n := e.Name(); strings.HasSuffix(n, TrustBundleNameSuffix) && !keep[n] && e.Type().IsRegular() {
			if err := os.Remove(filepath.Join(c.CredentialFolder, n)); err != nil {
				return err
			}
		}
	}
	return nil
}

// encodeJWTBundles is spiffe-helper's JWT bundle file: a JSON object from
// trust domain name to the base64 of that trust domain's JWKS document.
func encodeJWTBundles(set *jwtbundle.Set) ([]byte, error) {
	out := map[string]string{}
	for _, b := range set.Bundles() {
		jwks, err := b.Marshal()
		if err != nil {
			return nil, fmt.Errorf("encoding the JWT bundle of %s: %w", b.TrustDomain(), err)
		}
		out[b.TrustDomain().Name()] = base64.StdEncoding.EncodeToString(jwks)
	}
	return json.Marshal(out)
}

func writeJWTBundles(c *Config, set *jwtbundle.Set) error {
	data, err := encodeJWTBundles(set)
	if err != nil {
		return err
	}
	return agent.WriteFileAtomicMode(c.JWTBundleFile, data, c.JWTBundleFileMode)
}

func writeJWTSVID(c *Config, j JWTSVID, svids []*jwtsvid.SVID) (*jwtsvid.SVID, error) {
	svid, err := pickJWTSVID(svids, c.Hint)
	if err != nil {
		return nil, err
	}
	return svid, agent.WriteFileAtomicMode(j.FileName, []byte(svid.Marshal()), c.JWTSVIDFileMode)
}
