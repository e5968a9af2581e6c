package k8s

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// maxCredentialFileSize bounds the token, CA bundle, certificate and key
// files: a service account token is about 1 KiB, a CA bundle a few.
const maxCredentialFileSize = 1 << 20

// watchedFile is a file read again when it changes (its inode, size or
// times: a projected service account token is replaced through a symlink
// swap), when it has not been read for the reload interval, or when told.
type watchedFile struct {
	path   string
	stamp  fileStamp
	readAt time.Time
	data   []byte
	stale  bool
}

type fileStamp struct {
	dev, ino     uint64
	size         int64
	mtime, ctime unix.Timespec
}

// load returns the file's content and whether it differs from the last
// load. It follows symlinks on purpose: the service account files are
// symlinks into the projected volume's current directory.
func (w *watchedFile) load(now time.Time, reload time.Duration) (data []byte, changed bool, err error) {
	var st unix.Stat_t
	if err := unix.Stat(w.path, &st); err != nil {
		return nil, false, &os.PathError{Op: "stat", Path: w.path, Err: err}
	}
	stamp := fileStamp{dev: uint64(st.Dev), ino: uint64(st.Ino), size: st.Size, mtime: st.Mtim, ctime: st.Ctim}
	if w.data != nil && !w.stale && stamp == w.stamp && now.Sub(w.readAt) < reload {
		return w.data, false, nil
	}
	data, err = readBounded(w.path, maxCredentialFileSize)
	if err != nil {
		return nil, false, err
	}
	changed = w.data == nil || !bytes.Equal(data, w.data)
	w.stamp, w.readAt, w.data, w.stale = stamp, now, data, false
	return data, changed, nil
}

func readBounded(path string, limit int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(data)) > limit {
		return nil, fmt.Errorf("%s is larger than %d bytes", path, limit)
	}
	return data, nil
}

// credentials hold what the agent shows the kubelet and trusts of it, read
// from files at first use and again when they change. Only one fetch runs
// at a time, but TLS callbacks run on the transport's goroutines: mu
// guards everything.
type credentials struct {
	s settings

	mu    sync.Mutex
	token watchedFile
	ca    watchedFile
	cert  watchedFile
	key   watchedFile
	// current values, kept while a failed reload is retried
	bearer     string
	roots      *x509.CertPool
	clientCert *tls.Certificate
}

func newCredentials(s settings) *credentials {
	return &credentials{
		s:     s,
		token: watchedFile{path: s.tokenPath},
		ca:    watchedFile{path: s.caPath},
		cert:  watchedFile{path: s.certPath},
		key:   watchedFile{path: s.keyPath},
	}
}

// refresh reloads what changed and returns the bearer token to send (empty
// unless token authentication) and whether the TLS material changed, so
// that pooled connections made with the old one are closed.
func (c *credentials) refresh(now time.Time) (bearer string, tlsChanged bool, err error) {
	if !c.s.secure {
		return "", false, nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.s.skipVerify {
		pemData, changed, err := c.ca.load(now, c.s.reloadInterval)
		if err != nil {
			return "", false, fmt.Errorf("%w: loading the kubelet CA (kubelet_ca_path): %v; point kubelet_ca_path at the CA that signed the kubelet's serving certificate, or set skip_kubelet_verification", errKubeletCredentials, err)
		}
		if changed || c.roots == nil {
			roots, err := parseCertPool(pemData)
			if err != nil {
				return "", false, fmt.Errorf("%w: the kubelet CA %s: %v", errKubeletCredentials, c.s.caPath, err)
			}
			c.roots, tlsChanged = roots, true
		}
	}
	switch c.s.auth {
	case authToken:
		data, _, err := c.token.load(now, c.s.reloadInterval)
		if err != nil {
			return "", false, fmt.Errorf("%w: loading the token (token_path): %v; mount the service account token there, or set certificate_path or use_anonymous_authentication", errKubeletCredentials, err)
		}
		c.bearer = strings.TrimSpace(string(data))
		if c.bearer == "" {
			return "", false, fmt.Errorf("%w: the token file %s is empty", errKubeletCredentials, c.s.tokenPath)
		}
	case authCertificate:
		certPEM, certChanged, err := c.cert.load(now, c.s.reloadInterval)
		if err != nil {
			return "", false, fmt.Errorf("%w: loading the client certificate (certificate_path): %v", errKubeletCredentials, err)
		}
		keyPEM, keyChanged, err := c.key.load(now, c.s.reloadInterval)
		if err != nil {
			return "", false, fmt.Errorf("%w: loading the client key (private_key_path): %v", errKubeletCredentials, err)
		}
		if certChanged || keyChanged || c.clientCert == nil {
			pair, err := tls.X509KeyPair(certPEM, keyPEM)
			if err != nil {
				// A half-written rotation: read both again next time.
				c.cert.stale, c.key.stale = true, true
				return "", false, fmt.Errorf("%w: the client certificate %s and key %s: %v", errKubeletCredentials, c.s.certPath, c.s.keyPath, err)
			}
			c.clientCert, tlsChanged = &pair, true
		}
	}
	return c.bearer, tlsChanged, nil
}

// tokenRefused makes the next fetch read the token file again whatever
// its stamp says: the kubelet refused the one we have.
func (c *credentials) tokenRefused() {
	c.mu.Lock()
	c.token.stale = true
	c.mu.Unlock()
}

func parseCertPool(pemData []byte) (*x509.CertPool, error) {
	pool := x509.NewCertPool()
	n := 0
	for rest := pemData; ; {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			continue
		}
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("certificate %d: %v", n+1, err)
		}
		pool.AddCert(cert)
		n++
	}
	if n == 0 {
		return nil, errors.New("no PEM certificate in it")
	}
	return pool, nil
}

// tlsConfig builds the one TLS configuration of the kubelet transport. The
// checks read the current credentials at each handshake, so a reloaded CA
// or client certificate needs no new transport.
//
// What is checked is SPIRE's choice: with skip_kubelet_verification
// nothing; without a node name (the kubelet is reached on 127.0.0.1) the
// chain to the CA only, as the certificate cannot name 127.0.0.1 on every
// node; with a node name the chain and that name. Go's own check is
// replaced by VerifyConnection so that a resumed session is checked too.
func (c *credentials) tlsConfig() *tls.Config {
	cfg := &tls.Config{
		MinVersion: tls.VersionTLS12,
		// The verification below replaces Go's, with the reloadable CA.
		InsecureSkipVerify: true, //nolint:gosec // VerifyConnection verifies unless skip_kubelet_verification
	}
	if !c.s.skipVerify {
		cfg.VerifyConnection = c.verifyKubelet
	}
	if c.s.auth == authCertificate {
		cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			c.mu.Lock()
			defer c.mu.Unlock()
			if c.clientCert == nil {
				return nil, errors.New("the client certificate is not loaded")
			}
			return c.clientCert, nil
		}
	}
	return cfg
}

func (c *credentials) verifyKubelet(cs tls.ConnectionState) error {
	c.mu.Lock()
	roots := c.roots
	c.mu.Unlock()
	if roots == nil {
		return errors.New("the kubelet CA is not loaded")
	}
	if len(cs.PeerCertificates) == 0 {
		return errors.New("the kubelet presented no certificate")
	}
	opts := x509.VerifyOptions{
		Roots:         roots,
		Intermediates: x509.NewCertPool(),
		DNSName:       c.s.nodeName,
	}
	for _, ic := range cs.PeerCertificates[1:] {
		opts.Intermediates.AddCert(ic)
	}
	if _, err := cs.PeerCertificates[0].Verify(opts); err != nil {
		hint := "check kubelet_ca_path, or set skip_kubelet_verification"
		if c.s.nodeName != "" {
			hint = "the certificate must name the node (node_name, or the node_name_env variable) and chain to kubelet_ca_path; or set skip_kubelet_verification"
		}
		return fmt.Errorf("%w (%v): %s", errKubeletNotTrusted, err, hint)
	}
	return nil
}
