package filedelivery

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/lanyard-dev/lanyard/internal/testkit"
)

// TestOneShot: daemon_mode = false (or -daemon-mode=false) fetches once,
// writes every file with its mode, and exits 0.
func TestOneShot(t *testing.T) {
	socket := startAgent(t)
	dir := t.TempDir()
	certs, creds := filepath.Join(dir, "certs"), filepath.Join(dir, "creds")
	for _, d := range []string{certs, creds} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	body := `agent_address = "` + socket + `"
cert_dir = "` + certs + `"
svid_file_name = "svid.pem"
svid_key_file_name = "svid_key.pem"
svid_bundle_file_name = "svid_bundle.pem"
jwt_svids = [{jwt_audience = "db", jwt_svid_file_name = "jwt.token"}]
jwt_bundle_file_name = "bundle.json"
credential_folder = "` + creds + `"
`
	for _, tc := range []struct {
		name, body string
		args       []string
	}{
		{"daemon_mode false", body + "daemon_mode = false\n", nil},
		{"flag", body + "daemon_mode = true\n", []string{"-daemon-mode=false"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := writeHelperConfig(t, dir, tc.body)
			out, code := testkit.RunCLI(t, lanyardBin, append([]string{"helper", "-config", cfg}, tc.args...)...)
			if code != 0 {
				t.Fatalf("exit %d:\n%s", code, out)
			}
			leaf, key, err := readPair(filepath.Join(certs, "svid.pem"), filepath.Join(certs, "svid_key.pem"))
			if err != nil || !keyMatches(leaf, key) {
				t.Fatalf("the certificate and key: %v", err)
			}
			if leaf.URIs[0].String() != "spiffe://example.org/app" {
				t.Fatalf("SVID for %s", leaf.URIs[0])
			}
			bundle, err := os.ReadFile(filepath.Join(certs, "svid_bundle.pem"))
			if err != nil {
				t.Fatal(err)
			}
			roots, err := parseCerts(bundle)
			if err != nil {
				t.Fatal(err)
			}
			requireMode(t, filepath.Join(certs, "svid.pem"), 0o644)
			requireMode(t, filepath.Join(certs, "svid_bundle.pem"), 0o644)
			requireMode(t, filepath.Join(certs, "svid_key.pem"), 0o600)
			requireMode(t, filepath.Join(certs, "jwt.token"), 0o600)
			requireMode(t, filepath.Join(certs, "bundle.json"), 0o600)
			if _, err := validateJWTFiles(filepath.Join(certs, "jwt.token"), filepath.Join(certs, "bundle.json"), "db"); err != nil {
				t.Fatalf("the JWT file does not validate against the JWT bundle file: %v", err)
			}

			cb := filepath.Join(creds, CredentialBundleName)
			data, err := os.ReadFile(cb)
			if err != nil {
				t.Fatal(err)
			}
			_, chain, err := parseCredentialBundle(data)
			if err != nil {
				t.Fatal(err)
			}
			for _, c := range chain {
				for _, r := range roots {
					if c.Equal(r) {
						t.Fatal("the credential bundle holds the trust anchor")
					}
				}
			}
			requireMode(t, cb, 0o600)
			tb := filepath.Join(creds, "example.org"+TrustBundleNameSuffix)
			tbData, err := os.ReadFile(tb)
			if err != nil {
				t.Fatal(err)
			}
			if anchors, err := parseCerts(tbData); err != nil || len(anchors) != len(roots) {
				t.Fatalf("the trust bundle file: %d anchors, %v", len(anchors), err)
			}
			entries, _ := os.ReadDir(creds)
			if len(entries) != 2 {
				t.Fatalf("the credential folder holds %d files, want 2", len(entries))
			}
		})
	}
}

// TestOneShotFailsWithoutAgent: no agent at agent_address is exit 1 with
// the address in the error.
func TestOneShotFailsWithoutAgent(t *testing.T) {
	dir := t.TempDir()
	cfg := writeHelperConfig(t, dir, `agent_address = "`+dir+`/none.sock"
daemon_mode = false
cert_dir = "`+dir+`"
jwt_bundle_file_name = "b.json"
`)
	out, code := testkit.RunCLI(t, lanyardBin, "helper", "-config", cfg)
	if code != 1 || !strings.Contains(out, "none.sock") {
		t.Fatalf("exit %d, want 1 naming the socket:\n%s", code, out)
	}
}

// TestConfigErrorExit: a config error is exit 1 with file:line.
func TestConfigErrorExit(t *testing.T) {
	dir := t.TempDir()
	cfg := writeHelperConfig(t, dir, "cert_dir = \""+dir+"\"\nsvid_fil_name = \"x\"\n")
	out, code := testkit.RunCLI(t, lanyardBin, "helper", "-config", cfg)
	if code != 1 || !strings.Contains(out, cfg+":2:1: svid_fil_name: unknown key") {
		t.Fatalf("exit %d:\n%s", code, out)
	}
}
