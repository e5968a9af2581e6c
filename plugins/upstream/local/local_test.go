package local

import (
	"context"
	"crypto/ecdsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/conf"
	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/lanyard-dev/lanyard/internal/testkit/fakeagent"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

var td = spiffeid.RequireTrustDomainFromString("example.org")

var (
	oidKeyUsage = asn1.ObjectIdentifier{2, 5, 29, 15}
	oidSAN      = asn1.ObjectIdentifier{2, 5, 29, 17}
)

const webEntry = `
entry {
  spiffe_id = "spiffe://example.org/web"
  selectors = ["unix:uid:1000"]
  dns_names = ["web.example.org", "www.example.org"]
}
entry {
  spiffe_id      = "spiffe://example.org/db"
  selectors      = ["unix:uid:1001", "unix:gid:50"]
  x509_svid_ttl  = "5m"
  jwt_svid_ttl   = "90s"
  hint           = "database"
}
`

func newLocalErr(dir, body string) (*Local, error) {
	return newLocalLog(dir, body, hclog.NewNullLogger())
}

func newLocalLog(dir, body string, log hclog.Logger) (*Local, error) {
	sec, err := conf.NewSection("test.conf", body)
	if err != nil {
		return nil, err
	}
	up, err := New(agent.UpstreamConfig{Name: "local", Data: sec, Log: log, TrustDomain: td, DataDir: dir})
	if err != nil {
		return nil, err
	}
	return up.(*Local), openState(up.(*Local))
}

// openState loads or creates the CA state, as Run does first.
func openState(l *Local) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.openLocked()
}

// newLocal builds a Local with a sink attached, as Run attaches one, so
// that it publishes its bundle and may sign without Run.
func newLocal(t *testing.T, dir, body string) *Local {
	t.Helper()
	l, err := newLocalErr(dir, body)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	l.mu.Lock()
	l.sink = fakeagent.NewSink()
	l.mu.Unlock()
	return l
}

// setClock makes l read a fake clock and returns a function that moves it.
func setClock(l *Local, start time.Time) func(time.Time) {
	var mu sync.Mutex
	now := start
	l.mu.Lock()
	l.now = func() time.Time {
		mu.Lock()
		defer mu.Unlock()
		return now
	}
	l.mu.Unlock()
	return func(t time.Time) {
		mu.Lock()
		now = t
		mu.Unlock()
	}
}

// mustBundles returns l's bundles, failing the test while its CA is unavailable.
func mustBundles(t *testing.T, l *Local) (*spiffebundle.Bundle, []*spiffebundle.Bundle) {
	t.Helper()
	local, federated, ok := l.bundles()
	if !ok {
		t.Fatal("the local CA is unavailable")
	}
	return local, federated
}

func entryFor(t *testing.T, l *Local, id string) *agent.Entry {
	t.Helper()
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, e := range l.settings.entries {
		if e.SPIFFEID.String() == id {
			return e
		}
	}
	t.Fatalf("no entry for %s", id)
	return nil
}

func mintX509(t *testing.T, l *Local, e *agent.Entry) ([]*x509.Certificate, *ecdsa.PrivateKey) {
	t.Helper()
	key := testkit.NewKey(t)
	res, err := l.MintX509SVIDs(context.Background(), []agent.X509Request{{Entry: e, Key: key}})
	if err != nil {
		t.Fatalf("MintX509SVIDs: %v", err)
	}
	if len(res) != 1 || res[0].Err != nil {
		t.Fatalf("MintX509SVIDs results: %+v", res)
	}
	return res[0].Chain, key
}

func findExt(c *x509.Certificate, oid asn1.ObjectIdentifier) *pkix.Extension {
	for i := range c.Extensions {
		if c.Extensions[i].Id.Equal(oid) {
			return &c.Extensions[i]
		}
	}
	return nil
}

func rootPool(b *spiffebundle.Bundle) *x509.CertPool {
	pool := x509.NewCertPool()
	for _, c := range b.X509Authorities() {
		pool.AddCert(c)
	}
	return pool
}

// checkLeafRules checks the X509-SVID rules every leaf must follow.
func checkLeafRules(t *testing.T, leaf *x509.Certificate, id spiffeid.ID) {
	t.Helper()
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != id.String() {
		t.Errorf("URI SANs = %v, want exactly [%s]", leaf.URIs, id)
	}
	ku := findExt(leaf, oidKeyUsage)
	if ku == nil || !ku.Critical {
		t.Errorf("KeyUsage extension = %+v, want present and critical", ku)
	}
	if leaf.KeyUsage&x509.KeyUsageDigitalSignature == 0 {
		t.Error("KeyUsage lacks digitalSignature")
	}
	if leaf.KeyUsage&(x509.KeyUsageCertSign|x509.KeyUsageCRLSign) != 0 {
		t.Errorf("KeyUsage %b has keyCertSign or cRLSign", leaf.KeyUsage)
	}
	if !leaf.BasicConstraintsValid || leaf.IsCA {
		t.Errorf("BasicConstraints valid=%v CA=%v, want valid and CA=false", leaf.BasicConstraintsValid, leaf.IsCA)
	}
	if !slices.Contains(leaf.ExtKeyUsage, x509.ExtKeyUsageServerAuth) || !slices.Contains(leaf.ExtKeyUsage, x509.ExtKeyUsageClientAuth) {
		t.Errorf("ExtKeyUsage = %v, want serverAuth and clientAuth", leaf.ExtKeyUsage)
	}
	// An empty subject would need a critical SAN; ours is never empty.
	var subject pkix.RDNSequence
	if _, err := asn1.Unmarshal(leaf.RawSubject, &subject); err != nil || len(subject) == 0 {
		t.Errorf("subject is empty (%v): the SAN extension would have to be critical", err)
	}
}

func TestX509SVIDFollowsSpec(t *testing.T) {
	l := newLocal(t, t.TempDir(), webEntry)
	start := time.Now().Truncate(time.Second)
	setClock(l, start)
	web := entryFor(t, l, "spiffe://example.org/web")
	chain, key := mintX509(t, l, web)
	if len(chain) != 1 {
		t.Fatalf("chain has %d certificates, want the leaf only (the CA is its own root)", len(chain))
	}
	leaf := chain[0]
	checkLeafRules(t, leaf, web.SPIFFEID)
	if !key.PublicKey.Equal(leaf.PublicKey) {
		t.Error("the leaf does not certify the requested key")
	}
	if !slices.Equal(leaf.DNSNames, []string{"web.example.org", "www.example.org"}) {
		t.Errorf("DNS SANs = %v", leaf.DNSNames)
	}
	if leaf.Subject.CommonName != "web.example.org" {
		t.Errorf("CN = %q, want the first DNS name", leaf.Subject.CommonName)
	}
	if want := start.Add(defaultX509SVIDTTL); !leaf.NotAfter.Equal(want) {
		t.Errorf("NotAfter = %v, want %v (the default TTL)", leaf.NotAfter, want)
	}
	if want := start.Add(-backdate); !leaf.NotBefore.Equal(want) {
		t.Errorf("NotBefore = %v, want %v", leaf.NotBefore, want)
	}

	bundle, _ := mustBundles(t, l)
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: rootPool(bundle), CurrentTime: start,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Errorf("x509 Verify against the bundle: %v", err)
	}
	id, _, err := x509svid.Verify(chain, bundle, x509svid.WithTime(start))
	if err != nil || id != web.SPIFFEID {
		t.Errorf("x509svid.Verify = %v, %v", id, err)
	}
	if _, _, err := x509svid.ParseAndVerify([][]byte{leaf.Raw}, bundle, x509svid.WithTime(start)); err != nil {
		t.Errorf("x509svid.ParseAndVerify: %v", err)
	}

	db := entryFor(t, l, "spiffe://example.org/db")
	chain, _ = mintX509(t, l, db)
	leaf = chain[0]
	checkLeafRules(t, leaf, db.SPIFFEID)
	if len(leaf.DNSNames) != 0 || leaf.Subject.CommonName != "" {
		t.Errorf("entry without dns_names got DNS %v CN %q", leaf.DNSNames, leaf.Subject.CommonName)
	}
	if want := start.Add(5 * time.Minute); !leaf.NotAfter.Equal(want) {
		t.Errorf("NotAfter = %v, want %v (the entry's x509_svid_ttl)", leaf.NotAfter, want)
	}
}

func TestX509SVIDCappedByCA(t *testing.T) {
	l := newLocal(t, t.TempDir(), webEntry)
	ca := l.authorities[l.active].cert
	at := ca.NotAfter.Add(-30 * time.Second)
	setClock(l, at)
	chain, _ := mintX509(t, l, entryFor(t, l, "spiffe://example.org/web"))
	if !chain[0].NotAfter.Equal(ca.NotAfter) {
		t.Errorf("NotAfter = %v, want the CA's %v", chain[0].NotAfter, ca.NotAfter)
	}
	bundle, _ := mustBundles(t, l)
	if _, _, err := x509svid.Verify(chain, bundle, x509svid.WithTime(at)); err != nil {
		t.Errorf("x509svid.Verify: %v", err)
	}
}

// Go marks the SAN extension critical when the subject is empty, which is
// what the X509-SVID spec asks; we rely on it should the subject go away.
func TestEmptySubjectGetsCriticalSAN(t *testing.T) {
	u, _ := url.Parse("spiffe://example.org/x")
	c := testkit.NewCA(t, "").Issue(t, &x509.Certificate{URIs: []*url.URL{u},
		NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour)}, testkit.NewKey(t).Public())
	if san := findExt(c, oidSAN); san == nil || !san.Critical {
		t.Errorf("SAN extension with an empty subject = %+v, want critical", san)
	}
}

func TestCACertificate(t *testing.T) {
	l := newLocal(t, t.TempDir(), webEntry)
	a := l.authorities[l.active]
	ca := a.cert
	if !ca.BasicConstraintsValid || !ca.IsCA {
		t.Errorf("CA BasicConstraints valid=%v CA=%v", ca.BasicConstraintsValid, ca.IsCA)
	}
	if ca.KeyUsage&x509.KeyUsageCertSign == 0 {
		t.Error("CA lacks keyCertSign")
	}
	if ku := findExt(ca, oidKeyUsage); ku == nil || !ku.Critical {
		t.Error("CA KeyUsage is not critical")
	}
	if len(ca.URIs) != 1 || ca.URIs[0].String() != "spiffe://example.org" || ca.URIs[0].Path != "" {
		t.Errorf("CA URI SANs = %v, want [spiffe://example.org]", ca.URIs)
	}
	if err := ca.CheckSignatureFrom(ca); err != nil {
		t.Errorf("the CA is not self-signed: %v", err)
	}
	if a.root != ca || len(a.chain) != 0 {
		t.Error("a generated CA must be its own root with an empty chain")
	}
	if got := ca.NotAfter.Sub(ca.NotBefore); got < defaultCATTL || got > defaultCATTL+2*time.Minute {
		t.Errorf("CA lifetime = %v, want about %v", got, defaultCATTL)
	}
	bundle, _ := mustBundles(t, l)
	if len(bundle.X509Authorities()) != 1 || !bundle.X509Authorities()[0].Equal(ca) {
		t.Error("the bundle does not hold the CA")
	}
}

// parseJWT parses an ES256 token without verifying it.
func parseJWT(t *testing.T, token string) *jwt.JSONWebToken {
	t.Helper()
	tok, err := jwt.ParseSigned(token, []jose.SignatureAlgorithm{jose.ES256})
	if err != nil {
		t.Fatalf("parsing the token: %v", err)
	}
	return tok
}

func TestJWTSVIDFollowsSpec(t *testing.T) {
	l := newLocal(t, t.TempDir(), webEntry)
	bundle, _ := mustBundles(t, l)
	for _, tc := range []struct {
		id  string
		ttl time.Duration
	}{
		{"spiffe://example.org/web", defaultJWTSVIDTTL},
		{"spiffe://example.org/db", 90 * time.Second},
	} {
		e := entryFor(t, l, tc.id)
		aud := []string{"https://api.example.org", "other"}
		svid, err := l.MintJWTSVID(context.Background(), e, aud)
		if err != nil {
			t.Fatalf("MintJWTSVID: %v", err)
		}
		tok := parseJWT(t, svid.Token)
		if len(tok.Headers) != 1 {
			t.Fatalf("%d JOSE headers", len(tok.Headers))
		}
		h := tok.Headers[0]
		if h.Algorithm != string(jose.ES256) {
			t.Errorf("alg = %s, want ES256", h.Algorithm)
		}
		if h.ExtraHeaders[jose.HeaderType] != "JWT" {
			t.Errorf("typ = %v, want JWT", h.ExtraHeaders[jose.HeaderType])
		}
		pub, ok := bundle.FindJWTAuthority(h.KeyID)
		if h.KeyID == "" || !ok {
			t.Fatalf("kid %q is not among the bundle's JWT authorities", h.KeyID)
		}
		var claims jwt.Claims
		var raw map[string]any
		if err := tok.Claims(pub, &claims, &raw); err != nil {
			t.Fatalf("the token's signature does not verify with its bundle key: %v", err)
		}
		for _, k := range []string{"sub", "aud", "exp", "iat"} {
			if _, ok := raw[k]; !ok {
				t.Errorf("claim %s missing", k)
			}
		}
		if claims.Subject != tc.id || !slices.Equal([]string(claims.Audience), aud) {
			t.Errorf("sub %q aud %v", claims.Subject, claims.Audience)
		}
		if got := claims.Expiry.Time().Sub(claims.IssuedAt.Time()); got != tc.ttl {
			t.Errorf("exp - iat = %v, want %v", got, tc.ttl)
		}
		if !svid.ExpiresAt.Equal(claims.Expiry.Time()) || !svid.IssuedAt.Equal(claims.IssuedAt.Time()) {
			t.Errorf("JWTSVID times %v..%v differ from the claims %v..%v", svid.IssuedAt, svid.ExpiresAt, claims.IssuedAt.Time(), claims.Expiry.Time())
		}
		if svid.ID != e.SPIFFEID || !slices.Equal(svid.Audience, aud) {
			t.Errorf("JWTSVID fields = %+v", svid)
		}
		parsed, err := jwtsvid.ParseAndValidate(svid.Token, bundle, []string{"other"})
		if err != nil {
			t.Fatalf("jwtsvid.ParseAndValidate: %v", err)
		}
		if parsed.ID != e.SPIFFEID {
			t.Errorf("validated ID %s, want %s", parsed.ID, e.SPIFFEID)
		}
		if _, err := jwtsvid.ParseAndValidate(svid.Token, bundle, []string{"nobody"}); err == nil {
			t.Error("a token validated for an audience it was not issued for")
		}
	}
}

func TestJWTSVIDCappedByAuthority(t *testing.T) {
	l := newLocal(t, t.TempDir(), webEntry)
	a := l.authorities[l.active]
	setClock(l, a.notAfter.Add(-time.Minute))
	svid, err := l.MintJWTSVID(context.Background(), entryFor(t, l, "spiffe://example.org/web"), []string{"x"})
	if err != nil {
		t.Fatal(err)
	}
	if !svid.ExpiresAt.Equal(a.notAfter.Truncate(time.Second)) {
		t.Errorf("ExpiresAt = %v, want the authority's end %v", svid.ExpiresAt, a.notAfter)
	}
}

func TestEntriesParsed(t *testing.T) {
	l := newLocal(t, t.TempDir(), webEntry+`
entry {
  spiffe_id      = "spiffe://example.org/fed"
  selectors      = ["docker:label:app:fed", "unix:uid:7", "unix:uid:7"]
  federates_with = ["spiffe://other.org", "third.org"]
}
`)
	db := entryFor(t, l, "spiffe://example.org/db")
	if db.X509SVIDTTL != 5*time.Minute || db.JWTSVIDTTL != 90*time.Second || db.Hint != "database" {
		t.Errorf("db entry = %+v", db)
	}
	if got := fmt.Sprint(db.Selectors); got != "[unix:gid:50 unix:uid:1001]" {
		t.Errorf("selectors not sorted: %s", got)
	}
	fed := entryFor(t, l, "spiffe://example.org/fed")
	if len(fed.Selectors) != 2 {
		t.Errorf("duplicate selectors kept: %v", fed.Selectors)
	}
	if fmt.Sprint(fed.FederatesWith) != "[other.org third.org]" {
		t.Errorf("federates_with = %v", fed.FederatesWith)
	}
	web := entryFor(t, l, "spiffe://example.org/web")
	if !(web.CreatedAt < db.CreatedAt && db.CreatedAt < fed.CreatedAt) {
		t.Errorf("CreatedAt does not follow file order: %d %d %d", web.CreatedAt, db.CreatedAt, fed.CreatedAt)
	}
	ids := map[string]bool{web.ID: true, db.ID: true, fed.ID: true}
	if len(ids) != 3 {
		t.Error("entry IDs collide")
	}
	// The ID is stable across loads, so a reload keeps SVIDs.
	l2 := newLocal(t, t.TempDir(), webEntry)
	if entryFor(t, l2, "spiffe://example.org/db").ID != db.ID {
		t.Error("the same entry got a different ID on another load")
	}
}

// entryX is a valid entry for spiffe://example.org/x with one more line
// (line 4) in its body.
func entryX(line string) string {
	return "entry {\n  spiffe_id = \"spiffe://example.org/x\"\n  selectors = [\"unix:uid:1\"]\n  " + line + "\n}"
}

// fedBundle is a federated_bundle block; trust_domain is on its line 2.
func fedBundle(trustDomain, path string) string {
	return fmt.Sprintf("federated_bundle {\n  trust_domain = %q\n  path = %q\n}", trustDomain, path)
}

func TestConfigErrors(t *testing.T) {
	dir := t.TempDir()
	notBundle := filepath.Join(dir, "garbage.json")
	if err := os.WriteFile(notBundle, []byte(`{"keys": "nope"}`), 0o600); err != nil {
		t.Fatal(err)
	}
	badPEM := filepath.Join(dir, "bad.pem")
	if err := os.WriteFile(badPEM, []byte("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(dir, "missing.json")
	long := strings.Repeat("h", maxHint+1)
	tests := []struct {
		name, body string
		line       int
		key, msg   string
	}{
		{"bad spiffe id", `entry {
  spiffe_id = "spiffe://example.org/a//b"
  selectors = ["unix:uid:1"]
}`, 2, "entry[0].spiffe_id", "not a valid SPIFFE ID"},
		{"other trust domain", `entry {
  selectors = ["unix:uid:1"]
  spiffe_id = "spiffe://other.org/x"
}`, 3, "entry[0].spiffe_id", "not in the agent's trust domain example.org"},
		{"no path", `entry {
  spiffe_id = "spiffe://example.org"
  selectors = ["unix:uid:1"]
}`, 2, "entry[0].spiffe_id", "has no path"},
		{"reserved path", `entry {
  spiffe_id = "spiffe://example.org/spire/agent/local/node1"
  selectors = ["unix:uid:1"]
}`, 2, "entry[0].spiffe_id", "SPIRE reserves"},
		{"missing spiffe_id", `entry {
  spiffe_id = "spiffe://example.org/ok"
  selectors = ["unix:uid:1"]
}
entry {
  selectors = ["unix:uid:1"]
}`, 5, "entry[1]", "spiffe_id is missing"},
		{"missing selectors", `
entry {
  spiffe_id = "spiffe://example.org/x"
}`, 2, "entry[0]", "has no selectors"},
		{"selector without type", `entry {
  spiffe_id = "spiffe://example.org/x"
  selectors = ["uid1000"]
}`, 3, "entry[0].selectors", "has no type"},
		{"bad entry duration", entryX(`x509_svid_ttl = "1 hour"`), 4, "entry[0].x509_svid_ttl", "bad duration"},
		{"zero jwt ttl", entryX(`jwt_svid_ttl = "0s"`), 4, "entry[0].jwt_svid_ttl", "more than zero"},
		{"bad top-level duration", `
ca_ttl = "soon"`, 2, "ca_ttl", "bad duration"},
		{"svid ttl not under ca ttl", `ca_ttl = "1h"
x509_svid_ttl = "2h"`, 2, "x509_svid_ttl", "must be shorter than ca_ttl"},
		{"duplicate entry", `entry {
  spiffe_id = "spiffe://example.org/x"
  selectors = ["unix:uid:1", "unix:gid:2"]
}
entry {
  spiffe_id = "spiffe://example.org/x"
  selectors = ["unix:gid:2", "unix:uid:1"]
}`, 5, "entry[1]", "the same as entry[0]"},
		{"hint too long", entryX(`hint = "` + long + `"`), 4, "entry[0].hint", "1025 bytes"},
		{"bad dns name", entryX(`dns_names = ["a b"]`), 4, "entry[0].dns_names", "not a DNS name"},
		{"federates with own td", entryX(`federates_with = ["example.org"]`), 4, "entry[0].federates_with", "its own trust domain"},
		{"federates with garbage", entryX(`federates_with = ["Not A TD"]`), 4, "entry[0].federates_with", "is not a trust domain"},
		{"federated bundle missing", fedBundle("other.org", missing), 3, "federated_bundle[0].path", "missing.json"},
		{"federated bundle not a bundle", fedBundle("other.org", notBundle), 3, "federated_bundle[0].path", "is not a SPIFFE bundle"},
		{"federated bundle bad pem", fedBundle("other.org", badPEM), 3, "federated_bundle[0].path", "is not a PEM bundle"},
		{"federated bundle own td", fedBundle("example.org", notBundle), 2, "federated_bundle[0].trust_domain", "own trust domain"},
		{"federated bundle no path", `federated_bundle {
  trust_domain = "other.org"
}`, 1, "federated_bundle[0]", "path is missing"},
		{"ca key without cert", `
ca_key_path = "/x.key"`, 2, "ca_key_path", "is set without ca_cert_path"},
		{"unknown key", `entry {
  spiffe_id = "spiffe://example.org/x"
  selector = ["unix:uid:1"]
}`, 3, "entry", "selector"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := newLocalErr(t.TempDir(), tt.body)
			if err == nil {
				t.Fatal("New accepted the config")
			}
			msg := err.Error()
			if !strings.HasPrefix(msg, fmt.Sprintf("test.conf:%d:", tt.line)) {
				t.Errorf("error %q does not start with test.conf:%d:", msg, tt.line)
			}
			if !strings.Contains(msg, tt.key) || !strings.Contains(msg, tt.msg) {
				t.Errorf("error %q lacks key %q or text %q", msg, tt.key, tt.msg)
			}
		})
	}
}

func writeFile(t *testing.T, path string, data []byte) {
	t.Helper()
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
}

func pemCerts(certs ...*x509.Certificate) []byte {
	var out []byte
	for _, c := range certs {
		out = append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	return out
}

func TestFederatedBundles(t *testing.T) {
	dir := t.TempDir()
	otherTD := spiffeid.RequireTrustDomainFromString("other.org")
	otherCA, _ := makeCA(t, "spiffe://other.org", time.Now().Add(-time.Hour), time.Now().Add(time.Hour))
	jwtKey := testkit.NewKey(t)
	sb := spiffebundle.New(otherTD)
	sb.AddX509Authority(otherCA)
	if err := sb.AddJWTAuthority("kid-1", jwtKey.Public()); err != nil {
		t.Fatal(err)
	}
	raw, err := sb.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	jsonPath := filepath.Join(dir, "other.json")
	writeFile(t, jsonPath, raw)

	thirdCA, _ := makeCA(t, "spiffe://third.org", time.Now().Add(-time.Hour), time.Now().Add(time.Hour))
	thirdCA2, _ := makeCA(t, "spiffe://third.org", time.Now().Add(-time.Hour), time.Now().Add(time.Hour))
	pemPath := filepath.Join(dir, "third.pem")
	writeFile(t, pemPath, append([]byte("\n"), pemCerts(thirdCA, thirdCA2)...))

	l := newLocal(t, t.TempDir(), "\n"+fedBundle("other.org", jsonPath)+"\n"+fedBundle("spiffe://third.org", pemPath))
	_, fed := mustBundles(t, l)
	if len(fed) != 2 {
		t.Fatalf("%d federated bundles, want 2", len(fed))
	}
	other, third := fed[0], fed[1]
	if other.TrustDomain() != otherTD || !other.Equal(sb) {
		t.Errorf("the SPIFFE bundle of other.org did not load intact")
	}
	if _, ok := other.FindJWTAuthority("kid-1"); !ok {
		t.Error("the JWT authority of other.org is missing")
	}
	if third.TrustDomain().Name() != "third.org" || len(third.X509Authorities()) != 2 ||
		!third.X509Authorities()[0].Equal(thirdCA) || !third.X509Authorities()[1].Equal(thirdCA2) {
		t.Errorf("the PEM bundle of third.org = %v", third.X509Authorities())
	}

	// A second bundle for the same trust domain is refused.
	_, err = newLocalErr(t.TempDir(), "\n"+fedBundle("other.org", jsonPath)+"\n"+fedBundle("other.org", pemPath))
	if err == nil || !strings.Contains(err.Error(), "federated_bundle[1].trust_domain") || !strings.Contains(err.Error(), "a second bundle") {
		t.Errorf("duplicate federated bundle: %v", err)
	}
	// An empty bundle is refused.
	empty, _ := spiffebundle.New(otherTD).Marshal()
	emptyPath := filepath.Join(dir, "empty.json")
	writeFile(t, emptyPath, empty)
	_, err = newLocalErr(t.TempDir(), fedBundle("other.org", emptyPath))
	if err == nil || !strings.Contains(err.Error(), "no authorities") {
		t.Errorf("empty federated bundle: %v", err)
	}
}

// runLocal runs l into a recording sink until the test ends; Run must
// then return nil.
func runLocal(t *testing.T, l *Local) *fakeagent.Sink {
	t.Helper()
	sink := fakeagent.NewSink()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- l.Run(ctx, sink) }()
	t.Cleanup(func() {
		cancel()
		if err := testkit.Receive(t, done, 10*time.Second, "Run to return after its context ended"); err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	return sink
}

func TestRunAndReconfigure(t *testing.T) {
	dir := t.TempDir()
	otherCA, _ := makeCA(t, "spiffe://other.org", time.Now().Add(-time.Hour), time.Now().Add(time.Hour))
	pemPath := filepath.Join(dir, "other.pem")
	writeFile(t, pemPath, pemCerts(otherCA))

	l := newLocal(t, t.TempDir(), webEntry)
	sink := runLocal(t, l)

	sink.WaitFor(t, 10*time.Second, "the first entries and bundles", func() bool { return sink.EntrySets() > 0 && sink.LocalBundle() != nil })
	if n := len(sink.Entries()); n != 2 {
		t.Errorf("Run delivered %d entries, want 2", n)
	}
	if b := sink.LocalBundle(); b.TrustDomain() != td || len(b.X509Authorities()) != 1 || len(b.JWTAuthorities()) != 1 {
		t.Errorf("Run delivered bundle %v", b)
	}

	sec, err := conf.NewSection("test.conf", webEntry+`
entry {
  spiffe_id = "spiffe://example.org/new"
  selectors = ["unix:uid:2000"]
  federates_with = ["other.org"]
}
`+fedBundle("other.org", pemPath))
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Reconfigure(sec); err != nil {
		t.Fatalf("Reconfigure: %v", err)
	}
	sink.WaitFor(t, 10*time.Second, "the reconfigured entries", func() bool {
		return len(sink.Entries()) == 3 && len(sink.FederatedBundles()) == 1
	})
	entryFor(t, l, "spiffe://example.org/new")

	before := l.settings
	bad, err := conf.NewSection("test.conf", `entry {
  spiffe_id = "spiffe://example.org/broken"
}`)
	if err != nil {
		t.Fatal(err)
	}
	err = l.Reconfigure(bad)
	if err == nil || !strings.Contains(err.Error(), "test.conf:1:") {
		t.Fatalf("Reconfigure with invalid data: %v", err)
	}
	l.mu.Lock()
	unchanged := l.settings == before && len(l.settings.entries) == 3
	l.mu.Unlock()
	if !unchanged {
		t.Error("an invalid reconfigure changed the entries")
	}
	entryFor(t, l, "spiffe://example.org/new")
}

func TestReconfigureKeepsCASettings(t *testing.T) {
	l := newLocal(t, t.TempDir(), `ca_ttl = "2h"`)
	sec, err := conf.NewSection("test.conf", `ca_ttl = "3h"`)
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Reconfigure(sec); err != nil {
		t.Fatal(err)
	}
	if l.settings.caTTL != 2*time.Hour {
		t.Errorf("ca_ttl changed on reload to %v; it takes effect at the next start", l.settings.caTTL)
	}
}

// The state file is the source of truth: when it changes under a running
// CA, signing follows it, and so must the published bundle, or workloads
// get SVIDs their peers cannot verify.
func TestStateReloadIsPublished(t *testing.T) {
	dir := t.TempDir()
	l := newLocal(t, dir, webEntry)
	sink := runLocal(t, l)
	sink.WaitFor(t, 10*time.Second, "the first bundle", func() bool { return sink.LocalBundle() != nil })

	// Another CA takes the state file's place.
	if err := os.Remove(filepath.Join(dir, stateFileName)); err != nil {
		t.Fatal(err)
	}
	other := newLocal(t, dir, webEntry)
	newRoot := other.authorities[other.active].root

	chain, _ := mintX509(t, l, entryFor(t, l, "spiffe://example.org/web"))
	if err := chain[0].CheckSignatureFrom(newRoot); err != nil {
		t.Fatalf("after the state changed, SVIDs are not signed by its CA: %v", err)
	}
	sink.WaitFor(t, 10*time.Second, "a bundle with the reloaded CA", func() bool {
		return sink.LocalBundle().HasX509Authority(newRoot)
	})
}

// New touches no state, so that `lanyard validate` can run it against the
// real data_dir; the CA is created on first use.
func TestNewWritesNothing(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	sec, err := conf.NewSection("test.conf", webEntry)
	if err != nil {
		t.Fatal(err)
	}
	up, err := New(agent.UpstreamConfig{Name: "local", Data: sec, Log: hclog.NewNullLogger(), TrustDomain: td, DataDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("New touched the data directory: %v", err)
	}
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if _, _, ok := up.(*Local).bundles(); !ok {
		t.Fatal("no CA on first use")
	}
	if _, err := os.Stat(filepath.Join(dir, stateFileName)); err != nil {
		t.Fatalf("the CA was not saved on first use: %v", err)
	}
}
