package local

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/conf"
	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/lanyard-dev/lanyard/telemetry"
	"github.com/lanyard-dev/lanyard/telemetry/metrictest"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// makeCA makes a self-signed CA certificate and its key; uri may be empty.
func makeCA(t *testing.T, uri string, notBefore, notAfter time.Time) (*x509.Certificate, *ecdsa.PrivateKey) {
	t.Helper()
	ca := testkit.NewCA(t, uri, testkit.WithValidity(notBefore, notAfter))
	return ca.Cert, ca.Key
}

func pkcs8PEM(t *testing.T, key crypto.Signer) []byte {
	return testkit.PEM("PRIVATE KEY", testkit.PKCS8(t, key))
}

func jwtKIDs(b *spiffebundle.Bundle) []string {
	var kids []string
	for kid := range b.JWTAuthorities() {
		kids = append(kids, kid)
	}
	slices.Sort(kids)
	return kids
}

func sameRoots(a, b *spiffebundle.Bundle) bool {
	return slices.EqualFunc(a.X509Authorities(), b.X509Authorities(), func(x, y *x509.Certificate) bool { return x.Equal(y) })
}

func TestStateFilePersists(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	if err := agent.EnsureDataDir(dir); err != nil {
		t.Fatal(err)
	}
	l1 := newLocal(t, dir, webEntry)
	statePath := filepath.Join(dir, stateFileName)
	info, err := os.Stat(statePath)
	if err != nil {
		t.Fatalf("no state file: %v", err)
	}
	if info.Mode().Perm() != 0o600 {
		t.Errorf("state file mode %o, want 600", info.Mode().Perm())
	}
	if info, err := os.Stat(dir); err != nil || info.Mode().Perm() != 0o700 {
		t.Errorf("data dir mode %v (%v), want 700", info.Mode().Perm(), err)
	}
	names, err := os.ReadDir(dir)
	if err != nil || len(names) != 1 {
		t.Errorf("data dir holds %v, want the state file only", names)
	}

	l2 := newLocal(t, dir, webEntry)
	b1, _ := mustBundles(t, l1)
	b2, _ := mustBundles(t, l2)
	if !sameRoots(b1, b2) || len(b1.X509Authorities()) != 1 {
		t.Error("a second start made another CA instead of loading the first")
	}
	if !slices.Equal(jwtKIDs(b1), jwtKIDs(b2)) || len(jwtKIDs(b1)) != 1 {
		t.Errorf("JWT kids %v then %v", jwtKIDs(b1), jwtKIDs(b2))
	}
	// The loaded key signs, and its SVIDs verify against the first bundle.
	chain, _ := mintX509(t, l2, entryFor(t, l2, "spiffe://example.org/web"))
	if _, _, err := x509svid.Verify(chain, b1); err != nil {
		t.Errorf("an SVID from the reloaded CA does not verify: %v", err)
	}
}

func TestCorruptStateFile(t *testing.T) {
	validKey := pkcs8PEM(t, testkit.NewKey(t))
	for _, tc := range []struct {
		name, content, want string
	}{
		{"not json", "{not json", "is corrupt"},
		{"no authorities", `{"authorities": [], "active": 0}`, "no active authority"},
		{"active out of range", fmt.Sprintf(`{"authorities": [{"jwt_kid": "k", "jwt_key": %q}], "active": 3}`, validKey), "no active authority"},
		{"bad jwt key", `{"authorities": [{"jwt_kid": "k", "jwt_key": "nope", "x509_cert": "x", "x509_key": "y"}], "active": 0}`, "JWT key 0"},
		{"bad cert", fmt.Sprintf(`{"authorities": [{"jwt_kid": "k", "jwt_key": %q, "x509_cert": "x", "x509_key": "y"}], "active": 0}`, validKey), "certificate 0 is not PEM"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, stateFileName)
			writeFile(t, path, []byte(tc.content))
			log, logs := testkit.NewLogger(hclog.Error)
			sec, err := conf.NewSection("test.conf", webEntry)
			if err != nil {
				t.Fatal(err)
			}
			up, err := New(agent.UpstreamConfig{Name: "local", Data: sec, TrustDomain: td, DataDir: dir,
				Log: log})
			if err != nil {
				t.Fatalf("New: %v (a bad state file must not stop the agent)", err)
			}
			l := up.(*Local)
			if err := openState(l); err != nil {
				t.Fatalf("opening the state: %v (a bad state file must not stop the agent)", err)
			}
			explains := func(err error) bool {
				return err != nil && strings.Contains(err.Error(), path) && strings.Contains(err.Error(), tc.want)
			}
			if !strings.Contains(logs.String(), path) || !strings.Contains(logs.String(), tc.want) {
				t.Errorf("the log %q does not name %s or say %q", logs.String(), path, tc.want)
			}
			if _, _, ok := l.bundles(); ok {
				t.Error("bundles published without a CA")
			}
			if _, err := l.MintX509SVIDs(t.Context(), []agent.X509Request{{Entry: entryFor(t, l, "spiffe://example.org/web"), Key: testkit.NewKey(t)}}); !explains(err) {
				t.Errorf("MintX509SVIDs: %v, want an error naming %s and saying %q", err, path, tc.want)
			}
			if _, err := l.MintJWTSVID(t.Context(), entryFor(t, l, "spiffe://example.org/web"), []string{"a"}); !explains(err) {
				t.Errorf("MintJWTSVID: %v", err)
			}
			if _, _, err := l.rotate(); !explains(err) {
				t.Errorf("rotate: %v", err)
			}
			if got, _ := os.ReadFile(path); string(got) != tc.content {
				t.Error("the corrupt state file was overwritten")
			}
		})
	}
}

func TestExpiredStateMakesNewCA(t *testing.T) {
	dir := t.TempDir()
	l1 := newLocal(t, dir, `ca_ttl = "2h"`)
	old := l1.authorities[0]
	// Rewrite the state as if it had expired.
	old.notAfter = time.Now().Add(-time.Minute)
	if err := saveState(l1.statePath, l1.authorities, 0, 0, false); err != nil {
		t.Fatal(err)
	}
	l2 := newLocal(t, dir, `ca_ttl = "2h"`)
	if len(l2.authorities) != 1 || l2.authorities[0].cert.Equal(old.cert) {
		t.Error("an expired CA was kept instead of replaced")
	}
}

func TestRotation(t *testing.T) {
	dir := t.TempDir()
	body := `ca_ttl = "1h"
x509_svid_ttl = "10m"
` + webEntry
	l := newLocal(t, dir, body)
	metrics := telemetry.New()
	l.metrics = metrics
	old := l.authorities[0]
	base := time.Now()
	move := setClock(l, base)
	web := entryFor(t, l, "spiffe://example.org/web")

	// Young: nothing to do until half-life.
	next, changed, err := l.rotate()
	if err != nil || changed {
		t.Fatalf("rotate at start: changed=%v err=%v", changed, err)
	}
	if !next.Equal(old.at(prepareAt)) {
		t.Errorf("next rotation at %v, want half-life %v", next, old.at(prepareAt))
	}

	// Past half-life: the next CA is published, the old one still signs.
	now := old.at(prepareAt).Add(time.Second)
	move(now)
	next, changed, err = l.rotate()
	if err != nil || !changed {
		t.Fatalf("rotate past half-life: changed=%v err=%v", changed, err)
	}
	if len(l.authorities) != 2 || l.active != 0 {
		t.Fatalf("%d authorities, active %d; want 2, 0", len(l.authorities), l.active)
	}
	if !next.Equal(old.at(activateAt)) {
		t.Errorf("next rotation at %v, want %v", next, old.at(activateAt))
	}
	nextCA := l.authorities[1]
	b, _ := mustBundles(t, l)
	if len(b.X509Authorities()) != 2 || len(b.JWTAuthorities()) != 2 {
		t.Fatalf("bundle has %d roots and %d JWT keys, want 2 and 2", len(b.X509Authorities()), len(b.JWTAuthorities()))
	}
	seqPrepared, _ := b.SequenceNumber()
	chain, _ := mintX509(t, l, web)
	checkSignedBy(t, l, web, chain, b, now, old) // after half-life, still the old CA
	// Calling again changes nothing.
	if _, changed, _ := l.rotate(); changed {
		t.Error("a second rotate at the same time changed something")
	}

	// Past two thirds: the new CA signs; both roots stay published.
	now = old.at(activateAt).Add(time.Second)
	move(now)
	next, changed, err = l.rotate()
	if err != nil || !changed {
		t.Fatalf("rotate past 2/3: changed=%v err=%v", changed, err)
	}
	if l.active != 1 || l.authorities[1] != nextCA {
		t.Fatalf("active %d; want the prepared CA", l.active)
	}
	f := metrictest.Gather(t, metrics.Registry())
	if v, _ := f.Value(telemetry.LocalCARotations.Name, nil); v != 1 {
		t.Errorf("rotations counted: %v, want 1", v)
	}
	if v, _ := f.Value(telemetry.LocalCAExpiry.Name, nil); v != float64(nextCA.notAfter.Unix()) {
		t.Errorf("CA expiry reported %v, want the new CA's %d", v, nextCA.notAfter.Unix())
	}
	// The new CA was created at the old one's half-life, so its own
	// half-life comes just before the old one ends.
	if want := minTime(old.notAfter, nextCA.at(prepareAt)); !next.Equal(want) {
		t.Errorf("next rotation at %v, want %v", next, want)
	}
	b, _ = mustBundles(t, l)
	if len(b.X509Authorities()) != 2 || len(b.JWTAuthorities()) != 2 {
		t.Errorf("bundle has %d roots and %d JWT keys after activation, want 2 and 2", len(b.X509Authorities()), len(b.JWTAuthorities()))
	}
	if seq, _ := b.SequenceNumber(); seq <= seqPrepared {
		t.Errorf("sequence number %d did not grow past %d", seq, seqPrepared)
	}
	chain, _ = mintX509(t, l, web)
	checkSignedBy(t, l, web, chain, b, now, nextCA) // after 2/3, the new CA

	// A restart now loads both, with the new one active. It rewrites the
	// state file, which l reloads from then on.
	restarted := newLocal(t, dir, body)
	if len(restarted.authorities) != 2 || restarted.active != 1 || !restarted.authorities[1].cert.Equal(nextCA.cert) {
		t.Errorf("after a restart: %d authorities, active %d", len(restarted.authorities), restarted.active)
	}

	// Past the old CA's end: it leaves the bundle.
	now = old.notAfter.Add(time.Second)
	move(now)
	next, changed, err = l.rotate()
	if err != nil || !changed {
		t.Fatalf("rotate past expiry: changed=%v err=%v", changed, err)
	}
	hasOld := slices.ContainsFunc(l.authorities, func(a *authority) bool { return a.jwtKID == old.jwtKID })
	if hasOld || l.authorities[l.active].jwtKID != nextCA.jwtKID {
		t.Fatalf("after expiry: the old CA is kept or the new one is not active (%d authorities, active %d)", len(l.authorities), l.active)
	}
	if !next.After(now) {
		t.Errorf("next rotation at %v, not after now %v", next, now)
	}
	b, _ = mustBundles(t, l)
	if b.HasX509Authority(old.cert) || !b.HasX509Authority(nextCA.cert) {
		t.Error("after expiry the bundle must drop the old root and keep the new one")
	}
	if _, ok := b.FindJWTAuthority(old.jwtKID); ok || !b.HasJWTAuthority(nextCA.jwtKID) {
		t.Error("after expiry the bundle must drop the old JWT key and keep the new one")
	}
	if len(b.X509Authorities()) != len(l.authorities) || len(b.JWTAuthorities()) != len(l.authorities) {
		t.Errorf("bundle has %d roots and %d JWT keys for %d authorities", len(b.X509Authorities()), len(b.JWTAuthorities()), len(l.authorities))
	}
}

// fileCA writes a CA chain and key for ca_cert_path and ca_key_path and
// returns the plugin_data lines naming them.
func fileCA(t *testing.T, certs []*x509.Certificate, keyPEM []byte) string {
	t.Helper()
	dir := t.TempDir()
	certPath, keyPath := filepath.Join(dir, "ca.pem"), filepath.Join(dir, "ca.key")
	writeFile(t, certPath, pemCerts(certs...))
	writeFile(t, keyPath, keyPEM)
	return fmt.Sprintf("ca_cert_path = %q\nca_key_path = %q\n", certPath, keyPath)
}

func TestCAFromFile(t *testing.T) {
	now := time.Now()
	ca, key := makeCA(t, "spiffe://example.org", now.Add(-time.Hour), now.Add(365*24*time.Hour))
	body := fileCA(t, []*x509.Certificate{ca}, pkcs8PEM(t, key)) + webEntry
	dir := t.TempDir()
	l := newLocal(t, dir, body)
	chain, _ := mintX509(t, l, entryFor(t, l, "spiffe://example.org/web"))
	if len(chain) != 1 {
		t.Fatalf("chain of %d certificates, want the leaf only", len(chain))
	}
	checkLeafRules(t, chain[0], entryFor(t, l, "spiffe://example.org/web").SPIFFEID)
	if err := chain[0].CheckSignatureFrom(ca); err != nil {
		t.Errorf("the SVID is not signed by the configured CA: %v", err)
	}
	b, _ := mustBundles(t, l)
	if len(b.X509Authorities()) != 1 || !b.X509Authorities()[0].Equal(ca) {
		t.Error("the bundle does not hold the configured CA")
	}
	if _, _, err := x509svid.Verify(chain, b); err != nil {
		t.Errorf("x509svid.Verify: %v", err)
	}
	// The state keeps JWT keys only: the CA key stays in its own file.
	state, err := os.ReadFile(filepath.Join(dir, stateFileName))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(state), "x509_key") || strings.Contains(string(state), "x509_cert") {
		t.Error("the state file copies the CA from ca_cert_path")
	}
	l2 := newLocal(t, dir, body)
	b2, _ := mustBundles(t, l2)
	if !slices.Equal(jwtKIDs(b), jwtKIDs(b2)) {
		t.Error("the JWT key was not kept across a restart")
	}
}

func TestCAFromFileWithIntermediate(t *testing.T) {
	now := time.Now()
	rootCA := testkit.NewCA(t, "spiffe://example.org", testkit.WithValidity(now.Add(-time.Hour), now.Add(365*24*time.Hour)))
	interCA := rootCA.NewIntermediate(t, "spiffe://example.org", testkit.WithValidity(now.Add(-time.Hour), now.Add(180*24*time.Hour)))
	root, inter, interKey := rootCA.Cert, interCA.Cert, interCA.Key
	// A SEC 1 key exercises the non-PKCS#8 path.
	sec1, err := x509.MarshalECPrivateKey(interKey)
	if err != nil {
		t.Fatal(err)
	}
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: sec1})
	l := newLocal(t, t.TempDir(), fileCA(t, []*x509.Certificate{inter, root}, keyPEM)+webEntry)
	web := entryFor(t, l, "spiffe://example.org/web")
	chain, _ := mintX509(t, l, web)
	if len(chain) != 2 || !chain[1].Equal(inter) {
		t.Fatalf("chain = %d certificates, want leaf and intermediate", len(chain))
	}
	checkLeafRules(t, chain[0], web.SPIFFEID)
	if !chain[0].NotAfter.Before(inter.NotAfter) {
		t.Error("leaf outlives its issuer")
	}
	b, _ := mustBundles(t, l)
	if len(b.X509Authorities()) != 1 || !b.X509Authorities()[0].Equal(root) {
		t.Fatal("the bundle must hold the root, the last certificate of the file")
	}
	inters := x509.NewCertPool()
	inters.AddCert(chain[1])
	if _, err := chain[0].Verify(x509.VerifyOptions{Roots: rootPool(b), Intermediates: inters,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
		t.Errorf("x509 Verify: %v", err)
	}
	if _, _, err := x509svid.Verify(chain, b); err != nil {
		t.Errorf("x509svid.Verify: %v", err)
	}

	// Without the root, the intermediate is the trust anchor.
	l = newLocal(t, t.TempDir(), fileCA(t, []*x509.Certificate{inter}, keyPEM)+webEntry)
	chain, _ = mintX509(t, l, web)
	b, _ = mustBundles(t, l)
	if len(chain) != 1 || len(b.X509Authorities()) != 1 || !b.X509Authorities()[0].Equal(inter) {
		t.Errorf("intermediate only: chain %d, bundle %d", len(chain), len(b.X509Authorities()))
	}
	if _, _, err := x509svid.Verify(chain, b); err != nil {
		t.Errorf("x509svid.Verify: %v", err)
	}
}

func TestCAFromFileErrors(t *testing.T) {
	now := time.Now()
	issuer := testkit.NewCA(t, "spiffe://example.org", testkit.WithValidity(now.Add(-time.Hour), now.Add(24*time.Hour)))
	ca, key := issuer.Cert, issuer.Key
	otherCA, otherKey := makeCA(t, "spiffe://other.org", now.Add(-time.Hour), now.Add(24*time.Hour))
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	leaf := issuer.Issue(t, &x509.Certificate{NotBefore: now, NotAfter: now.Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, BasicConstraintsValid: true}, rsaKey.Public())
	dir := t.TempDir()
	for _, tc := range []struct {
		name, body, want string
	}{
		{"key of another cert", fileCA(t, []*x509.Certificate{ca}, pkcs8PEM(t, otherKey)), "does not belong"},
		{"not a CA", fileCA(t, []*x509.Certificate{leaf}, pkcs8PEM(t, rsaKey)), "is not a CA"},
		{"other trust domain", fileCA(t, []*x509.Certificate{otherCA}, pkcs8PEM(t, otherKey)), "has SPIFFE ID spiffe://other.org"},
		{"no certificate", fileCA(t, nil, pkcs8PEM(t, key)), "holds no PEM certificate"},
		{"key not PEM", fileCA(t, []*x509.Certificate{ca}, []byte("garbage")), "holds no PEM block"},
		{"missing files", fmt.Sprintf("ca_cert_path = %q\nca_key_path = %q\n", filepath.Join(dir, "nope.pem"), filepath.Join(dir, "nope.key")), "nope.pem"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := newLocalErr(t.TempDir(), tc.body)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %v, want one saying %q", err, tc.want)
			}
		})
	}
	// An RSA PKCS#1 key loads.
	rsaTmpl := &x509.Certificate{SerialNumber: testkit.Serial(), Subject: pkix.Name{CommonName: "rsa"}, NotBefore: now.Add(-time.Hour),
		NotAfter: now.Add(24 * time.Hour), KeyUsage: x509.KeyUsageCertSign, BasicConstraintsValid: true, IsCA: true}
	rsaDER, err := x509.CreateCertificate(rand.Reader, rsaTmpl, rsaTmpl, rsaKey.Public(), rsaKey)
	if err != nil {
		t.Fatal(err)
	}
	rsaCert, _ := x509.ParseCertificate(rsaDER)
	pkcs1 := pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(rsaKey)})
	l := newLocal(t, t.TempDir(), fileCA(t, []*x509.Certificate{rsaCert}, pkcs1)+webEntry)
	chain, _ := mintX509(t, l, entryFor(t, l, "spiffe://example.org/web"))
	if err := chain[0].CheckSignatureFrom(rsaCert); err != nil {
		t.Errorf("an RSA CA from PKCS#1 does not sign: %v", err)
	}
}

// A CA from ca_cert_path older than ca_ttl must not make rotate() prepare
// and activate an authority on every call.
func TestFileCARotationDoesNotSpin(t *testing.T) {
	now := time.Now()
	ca, key := makeCA(t, "spiffe://example.org", now.Add(-90*24*time.Hour), now.Add(365*24*time.Hour))
	l := newLocal(t, t.TempDir(), fileCA(t, []*x509.Certificate{ca}, pkcs8PEM(t, key))+webEntry)
	setClock(l, now)
	for range 5 {
		next, _, err := l.rotate()
		if err != nil {
			t.Fatal(err)
		}
		if !next.After(now) {
			t.Fatalf("next rotation %v is not in the future (now %v); %d authorities", next.Sub(now), now, len(l.authorities))
		}
	}
	if len(l.authorities) > 2 {
		t.Errorf("%d authorities after 5 rotates at one instant", len(l.authorities))
	}
}
