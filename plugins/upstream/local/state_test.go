package local

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/lanyard-dev/lanyard/internal/testkit/fakeagent"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// otherUID is neither root nor the agent: an attacker with a shell.
const otherUID = 4242

// newLoggedLocal is newLocal with its log kept.
func newLoggedLocal(t *testing.T, dir, body string) (*Local, *testkit.Buffer) {
	t.Helper()
	log, logs := testkit.NewLogger(hclog.Debug)
	l, err := newLocalLog(dir, body, log)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	l.mu.Lock()
	l.sink = fakeagent.NewSink()
	l.mu.Unlock()
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("logs:\n%s", logs)
		}
	})
	return l, logs
}

func sinkOf(l *Local) *fakeagent.Sink {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.sink.(*fakeagent.Sink)
}

// smallDisk is a data directory on a 256 KiB tmpfs (see testkit.SmallDisk).
func smallDisk(t *testing.T) (dir string, fill, free func()) {
	t.Helper()
	dir = filepath.Join(t.TempDir(), "data")
	fill, free = testkit.SmallDisk(t, dir)
	return dir, fill, free
}

// checkSigns mints an X509-SVID and a JWT-SVID for e at now and checks
// that both were signed by want and verify against the bundle the sink
// holds: the CA that signs is always in the published bundle.
func checkSigns(t *testing.T, l *Local, e *agent.Entry, now time.Time, want *authority) {
	t.Helper()
	chain, _ := mintX509(t, l, e)
	b := sinkOf(l).LocalBundle()
	if b == nil {
		t.Fatal("an SVID was signed before any bundle was published")
	}
	checkSignedBy(t, l, e, chain, b, now, want)
}

// checkSignedBy checks that want signed chain, an X509-SVID for e, and a
// JWT-SVID it mints for e, and that both verify against b at now.
func checkSignedBy(t *testing.T, l *Local, e *agent.Entry, chain []*x509.Certificate, b *spiffebundle.Bundle, now time.Time, want *authority) {
	t.Helper()
	if _, _, err := x509svid.Verify(chain, b, x509svid.WithTime(now)); err != nil {
		t.Errorf("the X509-SVID does not verify against the published bundle: %v", err)
	}
	if err := chain[0].CheckSignatureFrom(want.cert); err != nil {
		t.Errorf("the X509-SVID is not signed by the expected CA: %v", err)
	}
	svid, err := l.MintJWTSVID(context.Background(), e, []string{"a"})
	if err != nil {
		t.Fatal(err)
	}
	checkJWT(t, svid.Token, b, want.jwtKID)
}

func checkJWT(t *testing.T, token string, b *spiffebundle.Bundle, wantKID string) {
	t.Helper()
	tok := parseJWT(t, token)
	kid := tok.Headers[0].KeyID
	key, ok := b.FindJWTAuthority(kid)
	if !ok {
		t.Fatalf("the JWT-SVID's key %s is not in the published bundle", kid)
	}
	var claims jwt.Claims
	if err := tok.Claims(key, &claims); err != nil {
		t.Errorf("the JWT-SVID does not verify with the published key: %v", err)
	}
	if kid != wantKID {
		t.Errorf("the JWT-SVID is signed with key %s, want %s", kid, wantKID)
	}
}

// Finding 6: with a full data directory at half-life, the next CA is
// published but not saved. It must not sign at two thirds: the current one
// keeps signing (every SVID verifies against the published bundle), the
// save is retried and warned about once, the sink is told (degraded
// readiness), and the activation happens once the save succeeds.
func TestActivationWaitsForItsSave(t *testing.T) {
	dir, fill, free := smallDisk(t)
	l, logs := newLoggedLocal(t, dir, `ca_ttl = "1h"
x509_svid_ttl = "5m"
`+webEntry)
	sink := sinkOf(l)
	old := l.authorities[0]
	now := time.Now()
	move := setClock(l, now)
	web := entryFor(t, l, "spiffe://example.org/web")
	checkSigns(t, l, web, now, old)

	fill()
	now = old.at(prepareAt).Add(time.Second)
	move(now)
	if _, changed, err := l.rotate(); err != nil || !changed {
		t.Fatalf("rotate past half-life on a full disk: changed=%v err=%v", changed, err)
	}
	if len(l.authorities) != 2 || l.active != 0 {
		t.Fatalf("%d authorities, active %d; want the next CA prepared", len(l.authorities), l.active)
	}
	next := l.authorities[1]
	if b := sink.LocalBundle(); !b.HasX509Authority(next.root) || !b.HasJWTAuthority(next.jwtKID) {
		t.Error("the prepared CA is not in the published bundle although its save failed")
	}
	if err := sink.SaveErr(l.statePath); err == nil || !strings.Contains(err.Error(), "no space left") {
		t.Errorf("the failed save was reported as %v", err)
	}
	checkSigns(t, l, web, now, old)

	// Past two thirds, and for many retries: the unsaved CA never signs,
	// and Run is never asked to come back at once.
	now = old.at(activateAt).Add(time.Second)
	for range 20 {
		move(now)
		next, _, err := l.rotate()
		if err != nil {
			t.Fatalf("rotate: %v", err)
		}
		if l.active != 0 {
			t.Fatal("an unsaved CA was activated")
		}
		if !next.After(now) {
			t.Fatalf("rotate asks to run again at %v, not after now %v", next, now)
		}
		checkSigns(t, l, web, now, old)
		now = now.Add(saveRetryMax(time.Hour))
	}
	if n := strings.Count(logs.String(), "Could not save the local CA state"); n != 1 {
		t.Errorf("the failed save was warned about %d times in %s, want once a minute", n, 20*saveRetryMax(time.Hour))
	}
	if strings.Contains(logs.String(), "PRIVATE KEY") {
		t.Error("a private key was logged")
	}

	free()
	move(now)
	if _, _, err := l.rotate(); err != nil {
		t.Fatal(err)
	}
	if l.active != 1 || l.authorities[1] != next {
		t.Fatalf("active %d after the save succeeded; want the prepared CA", l.active)
	}
	if err := sink.SaveErr(l.statePath); err != nil {
		t.Errorf("the successful save was not reported: %v", err)
	}
	checkSigns(t, l, web, now, next)
	auths, active, _, err := loadState(l.statePath, nil)
	if err != nil || len(auths) != 2 || active != 1 {
		t.Errorf("the state on disk: %d authorities, active %d, %v", len(auths), active, err)
	}
}

// A prepared CA that was never saved is lost by a restart; that is
// harmless because it never signed. The restarted agent keeps the saved CA.
func TestUnsavedCALostByRestartNeverSigned(t *testing.T) {
	dir, fill, free := smallDisk(t)
	l := newLocal(t, dir, `ca_ttl = "2h"`)
	old := l.authorities[0]
	fill()
	move := setClock(l, old.at(prepareAt).Add(time.Second))
	if _, _, err := l.rotate(); err != nil {
		t.Fatal(err)
	}
	move(old.at(activateAt).Add(time.Second))
	if _, _, err := l.rotate(); err != nil {
		t.Fatal(err)
	}
	if l.active != 0 {
		t.Fatal("an unsaved CA was activated")
	}
	free()
	restarted := newLocal(t, dir, `ca_ttl = "2h"`)
	if len(restarted.authorities) != 1 || !restarted.authorities[0].cert.Equal(old.cert) {
		t.Errorf("after a restart: %d authorities; want the saved one only", len(restarted.authorities))
	}
}

// A first start on a full disk makes a CA that cannot be saved: it signs
// nothing until it is saved, then works without a restart.
func TestFirstCASignsOnceSaved(t *testing.T) {
	dir, fill, free := smallDisk(t)
	fill()
	l := newLocal(t, dir, webEntry)
	web := entryFor(t, l, "spiffe://example.org/web")
	_, err := l.MintX509SVIDs(context.Background(), []agent.X509Request{{Entry: web, Key: testkit.NewKey(t)}})
	if err == nil || !strings.Contains(err.Error(), "not saved") {
		t.Fatalf("signing with an unsaved CA: %v", err)
	}
	free()
	now := time.Now().Add(time.Minute)
	setClock(l, now)
	if _, _, err := l.rotate(); err != nil {
		t.Fatal(err)
	}
	checkSigns(t, l, web, now, l.authorities[0])
}

// swapState replaces the state file by rename with the state of another
// CA, made by a second Local in a scratch directory, and returns that CA.
func swapState(t *testing.T, l *Local, mode os.FileMode, uid int) *authority {
	t.Helper()
	other := newLocal(t, t.TempDir(), webEntry)
	data, err := os.ReadFile(other.statePath)
	if err != nil {
		t.Fatal(err)
	}
	testkit.ReplaceFile(t, l.statePath, data, uid, mode)
	return other.authorities[other.active]
}

// Finding 3: a state file that changes under a running agent is reloaded
// only when it is the agent's own private file; any other is refused with
// a warning once a minute, and the CA in memory keeps signing. A reload
// is a warning with the new CA's fingerprint, and the reloaded CA is in
// the published bundle before it signs.
func TestStateReloadOnlyFromOwnPrivateFile(t *testing.T) {
	testkit.RequireRoot(t, "to chown")
	dir := t.TempDir()
	l, logs := newLoggedLocal(t, dir, webEntry)
	web := entryFor(t, l, "spiffe://example.org/web")
	mine := l.authorities[l.active]
	now := time.Now()

	for _, c := range []struct {
		what string
		mode os.FileMode
		uid  int
	}{
		{"owned by another user", 0o600, otherUID},
		{"readable by others", 0o644, 0},
		{"group-writable", 0o660, 0},
	} {
		swapState(t, l, c.mode, c.uid)
		checkSigns(t, l, web, now, mine)
		if strings.Contains(logs.String(), "Reloaded the local CA state") {
			t.Fatalf("a state file %s was reloaded", c.what)
		}
	}
	// A symbolic link to a file of the right owner and mode is refused too.
	theirs := filepath.Join(t.TempDir(), "state.json")
	swapState(t, l, 0o600, 0)
	if err := os.Rename(l.statePath, theirs); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(theirs, l.statePath); err != nil {
		t.Fatal(err)
	}
	checkSigns(t, l, web, now, mine)
	if n := strings.Count(logs.String(), "Refusing to reload the CA state"); n != 1 {
		t.Errorf("%d refusals logged, want one (once a minute)", n)
	}
	for _, want := range []string{l.statePath, "uid 4242", "0600"} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("the refusal does not name %q:\n%s", want, logs)
		}
	}
	if strings.Contains(logs.String(), "Reloaded the local CA state") {
		t.Fatal("a symbolic link was followed to reload the state")
	}

	// The agent's own 0600 file is reloaded, loudly, and published first.
	if err := os.Remove(l.statePath); err != nil {
		t.Fatal(err)
	}
	swapped := swapState(t, l, 0o600, os.Geteuid())
	checkSigns(t, l, web, now, swapped)
	for _, want := range []string{"[WARN]", "Reloaded the local CA state", agent.Fingerprint(swapped.root), agent.Fingerprint(mine.root)} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("the reload log lacks %q:\n%s", want, logs)
		}
	}
}

// Finding 10: a state file that is gone while the saved cache is not means
// workloads hold the old CA's SVIDs and bundle; the new CA is a warning
// that names both.
func TestMissingStateWithSavedCacheWarns(t *testing.T) {
	dir := t.TempDir()
	l, logs := newLoggedLocal(t, dir, webEntry)
	old := l.authorities[0]
	if strings.Contains(logs.String(), "[WARN]") {
		t.Fatalf("a first start warned:\n%s", logs)
	}
	b, _ := mustBundles(t, l)
	raw, err := b.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	cache, err := json.Marshal(map[string]any{"version": 1, "local_bundle": json.RawMessage(raw)})
	if err != nil {
		t.Fatal(err)
	}
	if err := agent.WriteFileAtomic(filepath.Join(dir, "cache.json"), cache); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(l.statePath); err != nil {
		t.Fatal(err)
	}
	l2, logs2 := newLoggedLocal(t, dir, webEntry)
	out := logs2.String()
	for _, want := range []string{"[WARN]", "state is missing but the saved cache is not", agent.Fingerprint(old.root), agent.Fingerprint(l2.authorities[0].root)} {
		if !strings.Contains(out, want) {
			t.Errorf("the new CA's log lacks %q:\n%s", want, out)
		}
	}
}
