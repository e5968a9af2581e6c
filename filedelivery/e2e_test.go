package filedelivery

import (
	"bytes"
	"crypto"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
)

// lanyardBin is the binary under test: both the agent and the helper.
var lanyardBin string

// childLogEnv makes the test binary the child role: the program a helper
// starts as cmd (or finds through pid_file_name), which records every
// signal it gets in the file the variable names.
const childLogEnv = "FILEDELIVERY_TEST_CHILD_LOG"

func TestMain(m *testing.M) {
	if log := os.Getenv(childLogEnv); log != "" {
		os.Exit(runChildRole(log, os.Getenv("FILEDELIVERY_TEST_CHILD_CERT"), os.Getenv("FILEDELIVERY_TEST_CHILD_KEY")))
	}
	os.Exit(testkit.RunWithLanyard(m, func(bin string) error { lanyardBin = bin; return nil }))
}

// runChildRole appends "start <pid> <serial>", then "usr1 <serial> <ok|mismatch>"
// for every SIGUSR1 (reading the certificate and key as a reloading
// server would), and "term" on SIGTERM, then exits 0.
func runChildRole(logPath, certPath, keyPath string) int {
	sigs := make(chan os.Signal, 16)
	signal.Notify(sigs, syscall.SIGUSR1, syscall.SIGTERM)
	f, err := os.OpenFile(logPath, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return 3
	}
	defer f.Close()
	look := func() string {
		leaf, key, err := readPair(certPath, keyPath)
		if err != nil {
			return "unreadable " + strings.ReplaceAll(err.Error(), " ", "_")
		}
		verdict := "ok"
		if !keyMatches(leaf, key) {
			verdict = "mismatch"
		}
		return leaf.SerialNumber.String() + " " + verdict
	}
	fmt.Fprintf(f, "start %d %s\n", os.Getpid(), look())
	for s := range sigs {
		if s == syscall.SIGTERM {
			fmt.Fprintln(f, "term")
			return 0
		}
		fmt.Fprintln(f, "usr1 "+look())
	}
	return 0
}

func readPair(certPath, keyPath string) (*x509.Certificate, crypto.Signer, error) {
	certPEM, err := os.ReadFile(certPath)
	if err != nil {
		return nil, nil, err
	}
	keyPEM, err := os.ReadFile(keyPath)
	if err != nil {
		return nil, nil, err
	}
	certs, err := parseCerts(certPEM)
	if err != nil {
		return nil, nil, err
	}
	key, err := parseKey(keyPEM)
	return certs[0], key, err
}

// parseCerts parses a file of CERTIFICATE blocks strictly: a partial
// file fails.
func parseCerts(data []byte) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	for len(bytes.TrimSpace(data)) > 0 {
		var b *pem.Block
		b, data = pem.Decode(data)
		if b == nil || b.Type != "CERTIFICATE" || len(b.Headers) != 0 {
			return nil, fmt.Errorf("not a clean CERTIFICATE block")
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no certificate")
	}
	return out, nil
}

func parseKey(data []byte) (crypto.Signer, error) {
	b, rest := pem.Decode(data)
	if b == nil || b.Type != "PRIVATE KEY" || len(bytes.TrimSpace(rest)) != 0 {
		return nil, fmt.Errorf("not one PRIVATE KEY block")
	}
	k, err := x509.ParsePKCS8PrivateKey(b.Bytes)
	if err != nil {
		return nil, err
	}
	return k.(crypto.Signer), nil
}

func keyMatches(leaf *x509.Certificate, key crypto.Signer) bool {
	pub, ok := leaf.PublicKey.(interface{ Equal(crypto.PublicKey) bool })
	return ok && pub.Equal(key.Public())
}

// parseCredentialBundle checks the Filesystem Delivery rules: a PKCS#8
// PRIVATE KEY block, then CERTIFICATE blocks, no headers, nothing between
// or around blocks, and a leaf that matches the key.
func parseCredentialBundle(data []byte) (crypto.Signer, []*x509.Certificate, error) {
	var blocks []*pem.Block
	rest := data
	for len(rest) > 0 {
		b, r := pem.Decode(rest)
		if b == nil {
			return nil, nil, fmt.Errorf("data that is not a PEM block: %q", rest)
		}
		// Nothing between blocks: what Decode skipped is exactly nothing.
		if !bytes.HasPrefix(rest, []byte("-----BEGIN ")) {
			return nil, nil, fmt.Errorf("data before a block")
		}
		if len(b.Headers) != 0 {
			return nil, nil, fmt.Errorf("a block with headers")
		}
		blocks, rest = append(blocks, b), r
	}
	if len(blocks) < 2 || blocks[0].Type != "PRIVATE KEY" {
		return nil, nil, fmt.Errorf("want a PRIVATE KEY block then certificates, got %d blocks", len(blocks))
	}
	k, err := x509.ParsePKCS8PrivateKey(blocks[0].Bytes)
	if err != nil {
		return nil, nil, err
	}
	var chain []*x509.Certificate
	for _, b := range blocks[1:] {
		if b.Type != "CERTIFICATE" {
			return nil, nil, fmt.Errorf("a %s block", b.Type)
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, nil, err
		}
		chain = append(chain, c)
	}
	key := k.(crypto.Signer)
	if !keyMatches(chain[0], key) {
		return nil, nil, fmt.Errorf("the key does not match the leaf %s", chain[0].SerialNumber)
	}
	return key, chain, nil
}

// validateJWTFiles validates the token file against the JWT bundle file
// in spiffe-helper's format.
func validateJWTFiles(tokenPath, bundlePath, audience string) (*jwtsvid.SVID, error) {
	token, err := os.ReadFile(tokenPath)
	if err != nil {
		return nil, err
	}
	raw, err := os.ReadFile(bundlePath)
	if err != nil {
		return nil, err
	}
	var m map[string]string
	if err := json.Unmarshal(raw, &m); err != nil {
		return nil, fmt.Errorf("the JWT bundle file: %w", err)
	}
	set := jwtbundle.NewSet()
	for td, b64 := range m {
		jwks, err := base64.StdEncoding.DecodeString(b64)
		if err != nil {
			return nil, err
		}
		b, err := jwtbundle.Parse(spiffeid.RequireTrustDomainFromString(td), jwks)
		if err != nil {
			return nil, err
		}
		set.Add(b)
	}
	return jwtsvid.ParseAndValidate(string(token), set, []string{audience})
}

// agentConfig is a lanyard agent with the embedded CA issuing this uid
// short-lived SVIDs, so that rotations come every few seconds.
const agentConfig = `agent {
  trust_domain = "example.org"
  data_dir     = "@DATA@"
  socket_path  = "@SOCKET@"
}
plugins {
  WorkloadAttestor "unix" { plugin_data {} }
  UpstreamAuthority "local" {
    plugin_data {
      x509_svid_ttl = "4s"
      jwt_svid_ttl  = "6s"
      entry {
        spiffe_id = "spiffe://example.org/app"
        selectors = ["unix:uid:@UID@"]
      }
    }
  }
}
`

// startAgent runs the real agent and returns its socket.
func startAgent(t *testing.T) string {
	t.Helper()
	dir := testkit.ShortDir(t, "fd-")
	socket := filepath.Join(dir, "api.sock")
	cfg := strings.NewReplacer("@DATA@", filepath.Join(dir, "data"), "@SOCKET@", socket, "@UID@", strconv.Itoa(os.Getuid())).Replace(agentConfig)
	path := filepath.Join(dir, "agent.conf")
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	p, err := testkit.Start(t, lanyardBin, "run", "-config", path)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.WaitServing(socket, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	return socket
}

func writeHelperConfig(t *testing.T, dir, body string) string {
	t.Helper()
	path := filepath.Join(dir, "helper.conf")
	if err := os.WriteFile(path, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func requireMode(t *testing.T, path string, want os.FileMode) {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != want {
		t.Errorf("%s has mode %#o, want %#o", path, st.Mode().Perm(), want)
	}
}
