package e2e

import (
	"crypto/ecdsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// attackerName is how the agent names the attacker in its messages.
var attackerName = "uid " + strconv.Itoa(attackerUID)

var exampleTD = spiffeid.RequireTrustDomainFromString("example.org")

// attackerState is a local_ca.json holding a CA and JWT key the attacker
// made, and that CA.
func attackerState(t *testing.T) ([]byte, *x509.Certificate) {
	t.Helper()
	now := time.Now()
	ca := testkit.NewCA(t, "spiffe://example.org", testkit.WithCommonName("attacker"),
		testkit.WithValidity(now.Add(-time.Minute), now.Add(24*time.Hour)))
	pkcs8 := func(k *ecdsa.PrivateKey) string { return string(testkit.PEM("PRIVATE KEY", testkit.PKCS8(t, k))) }
	state, err := json.Marshal(map[string]any{
		"authorities": []map[string]any{{
			"x509_cert": string(testkit.PEM("CERTIFICATE", ca.Cert.Raw)),
			"x509_key":  pkcs8(ca.Key), "jwt_kid": "attacker", "jwt_key": pkcs8(testkit.NewKey(t)),
			"not_before": ca.Cert.NotBefore, "not_after": ca.Cert.NotAfter,
		}},
		"active": 0, "sequence": 1000,
	})
	if err != nil {
		t.Fatal(err)
	}
	return state, ca.Cert
}

// asAttacker runs a shell command as attackerUID.
func asAttacker(t *testing.T, script string) {
	t.Helper()
	cmd := exec.Command("/bin/sh", "-c", script)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: attackerUID, Gid: attackerUID}}
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("as uid %d: %s: %v\n%s", attackerUID, script, err, out)
	}
}

// startExpectRefusal runs the agent on dir and waits, for a bounded time,
// for it to exit. It returns the agent's output and true if it exited,
// or false if it served instead (it is then stopped at cleanup).
func startExpectRefusal(t *testing.T, dir, config string) (*agentProc, string, bool) {
	t.Helper()
	a := newAgentProc(t, dir, config)
	p, err := testkit.Start(t, lanyardBin, "run", "-config", a.config)
	if err != nil {
		t.Fatal(err)
	}
	a.Process = p
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-p.Exited:
			return a, p.Logs.String(), true
		default:
		}
		if testkit.Serving(a.socket) {
			return a, p.Logs.String(), false
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("the agent neither served nor exited within 30s:\n%s", p.Logs.String())
	return nil, "", false
}

// Finding 3: a data_dir owned by another user is refused at start. Before,
// the agent chmodded it 0700 and kept its owner, who then replaced
// local_ca.json with a CA of their own, and the next mint signed with it.
func TestDataDirOwnedByAnotherUserIsRefused(t *testing.T) {
	dir := newAgentDir(t)
	data := filepath.Join(dir, "data")
	mkdirOwnedByAttacker(t, data)
	a, out, exited := startExpectRefusal(t, dir, baseConfig)
	if !exited {
		// The attack the refusal prevents: the owner swaps the CA.
		state, attackerCA := attackerState(t)
		staged := filepath.Join(dir, "attacker.json")
		if err := os.WriteFile(staged, state, 0o644); err != nil {
			t.Fatal(err)
		}
		asAttacker(t, fmt.Sprintf("cp %s %s/.x && mv %s/.x %s/local_ca.json", staged, data, data, data))
		if mintedKID(t, a.client(t), "victim-db") == "attacker" {
			t.Fatalf("the agent started on a data_dir owned by uid %d, and that user's JWT key (CA %s) then signed the victim's JWT-SVID", attackerUID, fingerprint(attackerCA))
		}
		t.Fatalf("the agent started on a data_dir owned by uid %d", attackerUID)
	}
	for _, want := range []string{data, attackerName, "0755"} {
		if !strings.Contains(out, want) {
			t.Errorf("the refusal does not name %q:\n%s", want, out)
		}
	}
	if info, err := os.Stat(data); err != nil || info.Mode().Perm() != 0o755 {
		t.Errorf("the refused data_dir was changed: %v %v", info.Mode(), err)
	}
}

// Finding 3: data -> /srv/victim is refused, and the target keeps its mode.
func TestDataDirSymlinkIsRefused(t *testing.T) {
	dir := newAgentDir(t)
	victim := filepath.Join(dir, "victim")
	if err := os.Mkdir(victim, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(victim, filepath.Join(dir, "data")); err != nil {
		t.Fatal(err)
	}
	_, out, exited := startExpectRefusal(t, dir, baseConfig)
	if info, err := os.Stat(victim); err != nil || info.Mode().Perm() != 0o755 {
		t.Errorf("the symbolic link's target was changed to %v (%v)", info.Mode(), err)
	}
	if !exited {
		t.Fatal("the agent started on a data_dir that is a symbolic link")
	}
	if !strings.Contains(out, "symbolic link") || !strings.Contains(out, victim) {
		t.Errorf("the refusal does not say it is a link to %s:\n%s", victim, out)
	}
}

// Finding 3: a data_dir below a directory another user owns is refused:
// that user could rename it away and put their own in its place.
func TestDataDirUnderAnotherUsersDirectoryIsRefused(t *testing.T) {
	dir := newAgentDir(t)
	home := filepath.Join(dir, "home")
	mkdirOwnedByAttacker(t, home)
	_, out, exited := startExpectRefusal(t, dir, strings.Replace(baseConfig, `data_dir     = "@DATA@"`, fmt.Sprintf("data_dir = %q", filepath.Join(home, "data")), 1))
	if !exited {
		t.Fatalf("the agent started below a directory owned by uid %d", attackerUID)
	}
	if !strings.Contains(out, home) || !strings.Contains(out, attackerName) {
		t.Errorf("the refusal does not name %s and its owner:\n%s", home, out)
	}
}

// mintedKID has the agent mint a JWT-SVID (a new audience each time, so
// that none is served from its cache) and returns the key ID it was
// signed with.
func mintedKID(t *testing.T, c *workloadapi.Client, audience string) string {
	t.Helper()
	svid, err := c.FetchJWTSVID(testContext(t), jwtParams(audience))
	if err != nil {
		t.Fatal(err)
	}
	hdr, err := base64.RawURLEncoding.DecodeString(strings.Split(svid.Marshal(), ".")[0])
	if err != nil {
		t.Fatal(err)
	}
	var h struct {
		KID string `json:"kid"`
	}
	if err := json.Unmarshal(hdr, &h); err != nil {
		t.Fatal(err)
	}
	return h.KID
}

// fingerprint is what the agent logs for a CA: SHA-256 of its DER.
func fingerprint(c *x509.Certificate) string {
	sum := sha256.Sum256(c.Raw)
	parts := make([]string, len(sum))
	for i, b := range sum {
		parts[i] = fmt.Sprintf("%02X", b)
	}
	return strings.Join(parts, ":")
}

// swapCAState puts data in place of local_ca.json by rename, with the
// given owner and mode, as any writer of it would.
func swapCAState(t *testing.T, dataDir string, data []byte, uid int, mode os.FileMode) {
	t.Helper()
	testkit.ReplaceFile(t, filepath.Join(dataDir, "local_ca.json"), data, uid, mode)
}

// Finding 3: a local_ca.json that changes under the running agent is only
// reloaded if it is the agent's own 0600 file; otherwise the agent keeps
// its CA and warns. A reload is a warning with the new CA's fingerprint.
func TestCAStateReloadOnlyFromAgentsOwnFile(t *testing.T) {
	a := startAgent(t, baseConfig)
	c := a.client(t)
	ctx := testContext(t)
	before, err := c.FetchX509Context(ctx)
	if err != nil {
		t.Fatal(err)
	}
	local, err := before.Bundles.GetX509BundleForTrustDomain(exampleTD)
	if err != nil {
		t.Fatal(err)
	}
	ourRoot := local.X509Authorities()[0]
	state, attackerCA := attackerState(t)

	for i, bad := range []struct {
		uid  int
		mode os.FileMode
	}{{attackerUID, 0o600}, {os.Getuid(), 0o644}} {
		swapCAState(t, a.dataDir, state, bad.uid, bad.mode)
		if mintedKID(t, c, fmt.Sprintf("bad-%d", i)) == "attacker" {
			t.Fatalf("a local_ca.json owned by uid %d with mode %o was reloaded: the attacker's key signed a JWT-SVID", bad.uid, bad.mode)
		}
	}
	waitFor(t, 10*time.Second, "the refusal to be logged", func() bool {
		return strings.Contains(a.Logs.String(), "Refusing to reload the CA state")
	})
	if logs := a.Logs.String(); !strings.Contains(logs, attackerName) || !strings.Contains(logs, filepath.Join(a.dataDir, "local_ca.json")) {
		t.Errorf("the refusal does not name the file and its owner:\n%s", logs)
	}
	svid, err := c.FetchX509SVID(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if svid.Certificates[0].CheckSignatureFrom(ourRoot) != nil {
		t.Fatal("after a refused reload the SVID is not signed by the agent's CA")
	}

	// The agent's own 0600 file is reloaded, with a warning that names it.
	swapCAState(t, a.dataDir, state, os.Getuid(), 0o600)
	if kid := mintedKID(t, c, "good"); kid != "attacker" {
		t.Fatalf("the agent's own 0600 local_ca.json was not reloaded (kid %s)", kid)
	}
	// The new CA signs before the warning is written: wait for it.
	waitFor(t, 10*time.Second, "the reload to be warned about with the new CA's fingerprint "+fingerprint(attackerCA), func() bool {
		logs := a.Logs.String()
		return strings.Contains(logs, "[WARN]") && strings.Contains(logs, "Reloaded the local CA state") && strings.Contains(logs, fingerprint(attackerCA))
	})
}

// Finding 7: temporary files that a SIGKILL during a save left (each holds
// CA private keys) are removed at start.
func TestStaleTempFilesRemovedAtStart(t *testing.T) {
	dir := newAgentDir(t)
	data := filepath.Join(dir, "data")
	if err := os.Mkdir(data, 0o700); err != nil {
		t.Fatal(err)
	}
	var stale []string
	for i := range 63 {
		name := fmt.Sprintf(".local_ca.json.tmp-%d", 1000000+i)
		if i%2 == 1 {
			name = fmt.Sprintf(".cache.json.tmp-%d", 1000000+i)
		}
		stale = append(stale, name)
		if err := os.WriteFile(filepath.Join(data, name), []byte("-----BEGIN PRIVATE KEY-----"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	a := startAgentIn(t, dir, baseConfig)
	for _, name := range stale {
		if _, err := os.Lstat(filepath.Join(data, name)); err == nil {
			t.Fatalf("%s is still in data_dir after the start", name)
		}
	}
	if !strings.Contains(a.Logs.String(), "Removed temporary files") {
		t.Errorf("the removal was not logged:\n%s", a.Logs.String())
	}
	files, err := os.ReadDir(data)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		if strings.Contains(f.Name(), ".tmp-") {
			t.Errorf("%s left in data_dir", f.Name())
		}
	}
}

// mkdirOwnedByAttacker makes a directory, mode 0755, that attackerUID owns.
func mkdirOwnedByAttacker(t *testing.T, path string) {
	t.Helper()
	if err := os.Mkdir(path, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(path, attackerUID, attackerUID); err != nil {
		t.Fatal(err)
	}
}
