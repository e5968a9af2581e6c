package local

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net/url"
	"os"
	"time"

	"github.com/lanyard-dev/lanyard/agent"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// An authority is one generation of the CA: an X.509 signing CA and a JWT
// signing key with one lifetime. The bundle carries every authority that
// has not expired, so that old and new overlap across a rotation.
type authority struct {
	cert   *x509.Certificate // the signing CA
	key    crypto.Signer
	chain  []*x509.Certificate // sent after the leaf: from cert up to and excluding root
	root   *x509.Certificate   // the trust anchor published in the bundle
	jwtKID string
	jwtKey crypto.Signer
	// notBefore and notAfter bound this authority's life. For a generated
	// CA they are the certificate's; a CA from ca_cert_path outlives many
	// authorities, each starting when it was made.
	notBefore time.Time
	notAfter  time.Time
	// saved is set once the state file holds this authority: only then may
	// it sign (see Local).
	saved bool
}

// Rotation points, as fractions of an authority's lifetime: the next
// authority is published in the bundle at half-life and signs from two
// thirds on, so verifiers have a sixth of the lifetime to learn it.
const (
	prepareAt  = 1.0 / 2
	activateAt = 2.0 / 3
)

func (a *authority) at(fraction float64) time.Time {
	life := a.notAfter.Sub(a.notBefore)
	return a.notBefore.Add(time.Duration(float64(life) * fraction))
}

// newAuthority generates a self-signed CA and a JWT key valid for ttl.
func newAuthority(td spiffeid.TrustDomain, ttl time.Duration, now time.Time) (*authority, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generating the CA key: %w", err)
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, err
	}
	tdURI, err := url.Parse(td.IDString())
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{Organization: []string{"Lanyard"}, CommonName: "Lanyard local CA " + td.Name()},
		URIs:                  []*url.URL{tdURI},
		NotBefore:             now.Add(-time.Minute),
		NotAfter:              now.Add(ttl),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("signing the CA certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	// The rotation points count from now, not from the backdated
	// NotBefore: with a short ca_ttl the backdate would put them in the
	// past, and the CA would be prepared and activated as soon as made.
	a := &authority{cert: cert, key: key, root: cert, notBefore: now, notAfter: cert.NotAfter}
	if err := a.newJWTKey(); err != nil {
		return nil, err
	}
	return a, nil
}

func (a *authority) newJWTKey() error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("generating a JWT signing key: %w", err)
	}
	kid := make([]byte, 24)
	if _, err := rand.Read(kid); err != nil {
		return err
	}
	a.jwtKey, a.jwtKID = key, base64.RawURLEncoding.EncodeToString(kid)
	return nil
}

func randomSerial() (*big.Int, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("generating a serial number: %w", err)
	}
	return serial.Add(serial, big.NewInt(1)), nil
}

// The CA state file. Keys are PKCS#8 PEM; the file is mode 0600.
type stateFile struct {
	Authorities []storedAuthority `json:"authorities"`
	Active      int               `json:"active"`
	// Sequence is the bundle's sequence number, kept so that it only grows.
	Sequence uint64 `json:"sequence"`
}

type storedAuthority struct {
	CertPEM   string    `json:"x509_cert,omitempty"` // empty when the CA comes from ca_cert_path
	KeyPEM    string    `json:"x509_key,omitempty"`
	JWTKID    string    `json:"jwt_kid"`
	JWTKeyPEM string    `json:"jwt_key"`
	NotBefore time.Time `json:"not_before"`
	NotAfter  time.Time `json:"not_after"`
}

func encodeKey(key crypto.Signer) (string, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return "", err
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})), nil
}

func decodeKey(s string) (crypto.Signer, error) {
	block, _ := pem.Decode([]byte(s))
	if block == nil {
		return nil, errors.New("no PEM block")
	}
	return parseKey(block.Bytes)
}

func parseKey(der []byte) (crypto.Signer, error) {
	if key, err := x509.ParsePKCS8PrivateKey(der); err == nil {
		if s, ok := key.(crypto.Signer); ok {
			return s, nil
		}
		return nil, errors.New("the key cannot sign")
	}
	if key, err := x509.ParseECPrivateKey(der); err == nil {
		return key, nil
	}
	if key, err := x509.ParsePKCS1PrivateKey(der); err == nil {
		return key, nil
	}
	return nil, errors.New("not a PKCS#8, SEC 1 or PKCS#1 private key")
}

func saveState(path string, auths []*authority, active int, seq uint64, fromFile bool) error {
	st := stateFile{Active: active, Sequence: seq}
	for _, a := range auths {
		jwtKey, err := encodeKey(a.jwtKey)
		if err != nil {
			return fmt.Errorf("encoding a JWT key: %w", err)
		}
		sa := storedAuthority{JWTKID: a.jwtKID, JWTKeyPEM: jwtKey, NotBefore: a.notBefore, NotAfter: a.notAfter}
		if !fromFile {
			caKey, err := encodeKey(a.key)
			if err != nil {
				return fmt.Errorf("encoding a CA key: %w", err)
			}
			sa.CertPEM = string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: a.cert.Raw}))
			sa.KeyPEM = caKey
		}
		st.Authorities = append(st.Authorities, sa)
	}
	data, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return err
	}
	return agent.WriteFileAtomic(path, data)
}

// loadState reads the CA state: the authorities, the active one's index and
// the bundle sequence number. A missing file is no authorities and no
// error. When fileCA is set, the X.509 half of every authority is that CA.
func loadState(path string, fileCA *authority) ([]*authority, int, uint64, error) {
	data, err := agent.ReadPrivateFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, 0, 0, nil
	}
	var unsafe *agent.UnsafeFileError
	if errors.As(err, &unsafe) {
		return nil, 0, 0, err
	}
	if err != nil {
		return nil, 0, 0, fmt.Errorf("reading the CA state %s: %w", path, err)
	}
	var st stateFile
	if err := json.Unmarshal(data, &st); err != nil {
		return nil, 0, 0, fmt.Errorf("the CA state %s is corrupt (%v): move it away to generate a new CA", path, err)
	}
	if len(st.Authorities) == 0 || st.Active < 0 || st.Active >= len(st.Authorities) {
		return nil, 0, 0, fmt.Errorf("the CA state %s has no active authority: move it away to generate a new CA", path)
	}
	var auths []*authority
	for i, sa := range st.Authorities {
		a := &authority{jwtKID: sa.JWTKID, notBefore: sa.NotBefore, notAfter: sa.NotAfter}
		if a.jwtKey, err = decodeKey(sa.JWTKeyPEM); err != nil {
			return nil, 0, 0, fmt.Errorf("the CA state %s: JWT key %d: %v", path, i, err)
		}
		switch {
		case fileCA != nil:
			a.cert, a.key, a.chain, a.root = fileCA.cert, fileCA.key, fileCA.chain, fileCA.root
		case sa.CertPEM == "":
			// The state was written for a CA from ca_cert_path, which is
			// no longer configured: keep only the JWT key, start afresh.
			return nil, 0, 0, nil
		default:
			block, _ := pem.Decode([]byte(sa.CertPEM))
			if block == nil {
				return nil, 0, 0, fmt.Errorf("the CA state %s: certificate %d is not PEM", path, i)
			}
			if a.cert, err = x509.ParseCertificate(block.Bytes); err != nil {
				return nil, 0, 0, fmt.Errorf("the CA state %s: certificate %d: %v", path, i, err)
			}
			if a.key, err = decodeKey(sa.KeyPEM); err != nil {
				return nil, 0, 0, fmt.Errorf("the CA state %s: CA key %d: %v", path, i, err)
			}
			a.root = a.cert
		}
		if a.notBefore.IsZero() || a.notBefore.After(a.notAfter) {
			a.notBefore = a.cert.NotBefore
		}
		auths = append(auths, a)
	}
	return auths, st.Active, st.Sequence, nil
}

// loadFileCA reads a CA from ca_cert_path and ca_key_path. The cert file
// holds the signing CA first, then any intermediates, then optionally the
// root; without a self-signed root the last certificate is the trust anchor.
func loadFileCA(certPath, keyPath string) (*authority, error) {
	certPEM, err := os.ReadFile(certPath)
	if err != nil {
		return nil, fmt.Errorf("reading ca_cert_path: %w", err)
	}
	certs, err := agent.ParseCertificatesPEM(certPEM)
	if err != nil {
		return nil, fmt.Errorf("ca_cert_path %s: %w", certPath, err)
	}
	if len(certs) == 0 {
		return nil, fmt.Errorf("ca_cert_path %s holds no PEM certificate", certPath)
	}
	if !certs[0].IsCA || certs[0].KeyUsage&x509.KeyUsageCertSign == 0 {
		return nil, fmt.Errorf("the first certificate in ca_cert_path %s is not a CA that may sign certificates", certPath)
	}
	keyPEM, err := os.ReadFile(keyPath)
	if err != nil {
		return nil, fmt.Errorf("reading ca_key_path: %w", err)
	}
	block, _ := pem.Decode(keyPEM)
	if block == nil {
		return nil, fmt.Errorf("ca_key_path %s holds no PEM block", keyPath)
	}
	key, err := parseKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("ca_key_path %s: %w", keyPath, err)
	}
	if !publicKeysEqual(key.Public(), certs[0].PublicKey) {
		return nil, fmt.Errorf("the key in ca_key_path %s does not belong to the first certificate in ca_cert_path %s", keyPath, certPath)
	}
	// The last certificate is the trust anchor (a root, or the top
	// intermediate when no root is given); the ones below it travel in
	// every SVID chain after the leaf.
	return &authority{
		cert:      certs[0],
		key:       key,
		chain:     certs[:len(certs)-1],
		root:      certs[len(certs)-1],
		notBefore: certs[0].NotBefore,
		notAfter:  certs[0].NotAfter,
	}, nil
}

func publicKeysEqual(a, b crypto.PublicKey) bool {
	type equaler interface{ Equal(crypto.PublicKey) bool }
	e, ok := a.(equaler)
	return ok && e.Equal(b)
}
