package files

import (
	"bytes"
	"context"
	"crypto"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// reader reads files in a loop while the helper replaces them: every read
// must check out, and the credential must change `rotations` times.
type reader struct {
	seen     sequence
	mu       sync.Mutex
	reads    int
	failures []string
}

func (r *reader) record(credential string, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.reads++
	if err != nil {
		r.failures = append(r.failures, time.Now().Format("15:04:05.000")+" "+err.Error())
		return
	}
	r.seen.add(credential)
}

// readAcrossRotations runs check in a tight loop until it has seen
// `rotations` changes, then requires that every read passed.
func readAcrossRotations(t *testing.T, what string, check func() (string, error)) {
	t.Helper()
	r := &reader{}
	stop := loop(time.Millisecond, func(context.Context) { r.record(check()) })
	t.Cleanup(stop)
	testkit.WaitFor(t, 90*time.Second, fmt.Sprintf("%d renewals of the %s", rotations, what), func() bool {
		return len(r.seen.snapshot()) > rotations
	})
	stop()
	r.mu.Lock()
	defer r.mu.Unlock()
	t.Logf("%d reads of the %s across %d versions", r.reads, what, len(r.seen.snapshot()))
	if len(r.failures) > 0 {
		t.Errorf("%d of %d reads of the %s failed; the first: %v", len(r.failures), r.reads, what, r.failures[:min(5, len(r.failures))])
	}
}

// TestJWTFileValidatesAcrossRenewals reads the JWT-SVID file and the JWT
// bundle file (spiffe-helper's format: trust domain to base64 of the JWKS)
// while the helper renews the token: every token read validates against
// the bundle read after it.
func TestJWTFileValidatesAcrossRenewals(t *testing.T) {
	testkit.RequireRoot(t, "runs with the nginx and HAProxy tests")
	socket := startAgent(t)
	dir := t.TempDir()
	const audience = "files-test"
	runHelper(t, helperConfig{socket: socket, certDir: dir, extra: fmt.Sprintf(`
jwt_svids = [{jwt_audience = %q, jwt_svid_file_name = "jwt_svid.token"}]
jwt_bundle_file_name = "jwt_bundle.json"
`, audience)})
	tokenPath, bundlePath := filepath.Join(dir, "jwt_svid.token"), filepath.Join(dir, "jwt_bundle.json")
	waitFile(t, tokenPath)
	waitFile(t, bundlePath)
	for path, want := range map[string]os.FileMode{tokenPath: 0o600, bundlePath: 0o600} {
		if st, err := os.Stat(path); err != nil || st.Mode().Perm() != want {
			t.Errorf("%s: mode %v (%v), want %v", path, st.Mode().Perm(), err, want)
		}
	}
	readAcrossRotations(t, "JWT-SVID file", func() (string, error) {
		token, err := os.ReadFile(tokenPath)
		if err != nil {
			return "", err
		}
		bundles, err := readJWTBundles(bundlePath)
		if err != nil {
			return "", err
		}
		svid, err := jwtsvid.ParseAndValidate(string(token), bundles, []string{audience})
		if err != nil {
			return "", fmt.Errorf("the token does not validate against the bundle file: %w", err)
		}
		if svid.ID != appID {
			return "", fmt.Errorf("token for %s, want %s", svid.ID, appID)
		}
		return string(token), nil
	})
}

// readJWTBundles reads spiffe-helper's JWT bundle file.
func readJWTBundles(path string) (*jwtbundle.Set, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var byDomain map[string]string
	if err := json.Unmarshal(data, &byDomain); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	set := jwtbundle.NewSet()
	for name, encoded := range byDomain {
		jwks, err := base64.StdEncoding.DecodeString(encoded)
		if err != nil {
			return nil, fmt.Errorf("%s: %s: %w", path, name, err)
		}
		b, err := jwtbundle.Parse(appID.TrustDomain(), jwks)
		if err != nil || name != appID.TrustDomain().Name() {
			return nil, fmt.Errorf("%s: %q: %v", path, name, err)
		}
		set.Add(b)
	}
	return set, nil
}

// TestCredentialFolderAlwaysConsistent reads the Filesystem Delivery
// credential bundle in a tight loop across rotations: each read is whole,
// in the standard's exact shape, and its key matches its certificate.
func TestCredentialFolderAlwaysConsistent(t *testing.T) {
	testkit.RequireRoot(t, "runs with the nginx and HAProxy tests")
	socket := startAgent(t)
	folder := t.TempDir()
	runHelper(t, helperConfig{socket: socket, certDir: t.TempDir(), extra: fmt.Sprintf("credential_folder = %q\n", folder)})
	credPath := filepath.Join(folder, "credential-bundle.private-key.pem")
	trustPath := filepath.Join(folder, appID.TrustDomain().Name()+".spiffe-trust-bundle.pem")
	waitFile(t, credPath)
	waitFile(t, trustPath)
	if st, err := os.Stat(credPath); err != nil || st.Mode().Perm()&0o077 != 0 {
		t.Errorf("%s: mode %v (%v), want owner-only", credPath, st.Mode().Perm(), err)
	}
	readAcrossRotations(t, "credential bundle", func() (string, error) {
		data, err := os.ReadFile(credPath)
		if err != nil {
			return "", err
		}
		trust, err := x509bundle.Load(appID.TrustDomain(), trustPath)
		if err != nil {
			return "", err
		}
		return checkCredentialBundle(data, trust)
	})
}

// checkCredentialBundle checks a credential bundle against the standard:
// one PKCS#8 PRIVATE KEY block, then the chain leaf first, without the
// trust anchor, no headers, nothing between or around the blocks. It
// returns the leaf's fingerprint.
func checkCredentialBundle(data []byte, trust *x509bundle.Bundle) (string, error) {
	var blocks []*pem.Block
	var canonical []byte
	for rest := data; len(rest) > 0; {
		var b *pem.Block
		if b, rest = pem.Decode(rest); b == nil {
			return "", fmt.Errorf("%d bytes that are not a PEM block after %d blocks", len(rest), len(blocks))
		}
		if len(b.Headers) > 0 {
			return "", fmt.Errorf("block %d has headers", len(blocks))
		}
		blocks = append(blocks, b)
		canonical = append(canonical, pem.EncodeToMemory(b)...)
	}
	if !bytes.Equal(canonical, data) {
		return "", errors.New("bytes outside or between the PEM blocks")
	}
	if len(blocks) < 2 || blocks[0].Type != "PRIVATE KEY" {
		return "", fmt.Errorf("want a PRIVATE KEY block then certificates, got %d blocks", len(blocks))
	}
	key, err := x509.ParsePKCS8PrivateKey(blocks[0].Bytes)
	if err != nil {
		return "", fmt.Errorf("the key is not PKCS#8: %w", err)
	}
	var chain []*x509.Certificate
	for i, b := range blocks[1:] {
		if b.Type != "CERTIFICATE" {
			return "", fmt.Errorf("block %d is %s, want CERTIFICATE", i+1, b.Type)
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return "", err
		}
		if trust.HasX509Authority(c) {
			return "", fmt.Errorf("block %d is a trust anchor", i+1)
		}
		chain = append(chain, c)
	}
	id, _, err := x509svid.Verify(chain, trust)
	if err != nil {
		return "", fmt.Errorf("the chain does not verify against the trust bundle: %w", err)
	}
	if id != appID {
		return "", fmt.Errorf("SVID for %s, want %s", id, appID)
	}
	pub, ok := key.(crypto.Signer)
	if !ok || !chain[0].PublicKey.(interface{ Equal(crypto.PublicKey) bool }).Equal(pub.Public()) {
		return "", errors.New("the private key does not match the certificate")
	}
	return fingerprint(chain[0].Raw), nil
}
