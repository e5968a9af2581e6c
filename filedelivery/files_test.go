package filedelivery

import (
	"crypto/x509"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// chainFixture is an X.509 context as the Workload API sends it: two SVIDs
// (the second with a hint) under an intermediate, the own bundle with an
// expired extra root, and a federated bundle.
type chainFixture struct {
	xc                            *workloadapi.X509Context
	root, expired, inter, fedRoot *x509.Certificate
}

func newChainFixture(t *testing.T) chainFixture {
	td, fed := spiffeid.RequireTrustDomainFromString("example.org"), spiffeid.RequireTrustDomainFromString("partner.test")
	root := testkit.NewTrustDomainCA(t, td)
	old := testkit.NewTrustDomainCA(t, td, testkit.WithValidity(time.Now().Add(-48*time.Hour), time.Now().Add(-time.Hour)))
	inter := root.NewIntermediate(t, td.IDString())
	fedCA := testkit.NewTrustDomainCA(t, fed)
	svid := func(path, hint string) *x509svid.SVID {
		leaf, key := inter.SVID(t, "spiffe://example.org/"+path, time.Hour)
		return &x509svid.SVID{ID: spiffeid.RequireFromString("spiffe://example.org/" + path), Certificates: []*x509.Certificate{leaf, inter.Cert}, PrivateKey: key, Hint: hint}
	}
	set := x509bundle.NewSet(
		x509bundle.FromX509Authorities(td, []*x509.Certificate{root.Cert, old.Cert}),
		x509bundle.FromX509Authorities(fed, []*x509.Certificate{fedCA.Cert}),
	)
	return chainFixture{
		xc:   &workloadapi.X509Context{SVIDs: []*x509svid.SVID{svid("default", ""), svid("hinted", "internal")}, Bundles: set},
		root: root.Cert, expired: old.Cert, inter: inter.Cert, fedRoot: fedCA.Cert,
	}
}

func readCertsFile(t *testing.T, path string) []*x509.Certificate {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	certs, err := parseCerts(data)
	if err != nil {
		t.Fatal(err)
	}
	return certs
}

func sameCerts(got []*x509.Certificate, want ...*x509.Certificate) bool {
	if len(got) != len(want) {
		return false
	}
	for i := range got {
		if !got[i].Equal(want[i]) {
			return false
		}
	}
	return true
}

func TestWriteX509Options(t *testing.T) {
	f := newChainFixture(t)
	for _, tc := range []struct {
		name                 string
		cfg                  Config
		wantID               string
		wantChain, wantRoots []*x509.Certificate
	}{
		{"defaults", Config{}, "spiffe://example.org/default", []*x509.Certificate{nil, f.inter}, []*x509.Certificate{f.root, f.expired}},
		{"hint", Config{Hint: "internal"}, "spiffe://example.org/hinted", []*x509.Certificate{nil, f.inter}, []*x509.Certificate{f.root, f.expired}},
		{"add_intermediates_to_bundle", Config{AddIntermediatesToBundle: true}, "spiffe://example.org/default", []*x509.Certificate{nil}, []*x509.Certificate{f.root, f.expired, f.inter}},
		{"include_federated_domains", Config{IncludeFederatedDomains: true}, "spiffe://example.org/default", []*x509.Certificate{nil, f.inter}, []*x509.Certificate{f.root, f.expired, f.fedRoot}},
		{"omit_expired", Config{OmitExpired: true}, "spiffe://example.org/default", []*x509.Certificate{nil, f.inter}, []*x509.Certificate{f.root}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			c := tc.cfg
			c.SVIDFile, c.SVIDKeyFile, c.SVIDBundleFile = filepath.Join(dir, "s.pem"), filepath.Join(dir, "k.pem"), filepath.Join(dir, "b.pem")
			c.CertFileMode, c.KeyFileMode = 0o644, 0o600
			svid, err := pickX509SVID(f.xc, c.Hint)
			if err != nil {
				t.Fatal(err)
			}
			if err := writeX509(&c, svid, f.xc.Bundles, time.Now()); err != nil {
				t.Fatal(err)
			}
			chain := readCertsFile(t, c.SVIDFile)
			if chain[0].URIs[0].String() != tc.wantID {
				t.Fatalf("wrote %s, want %s", chain[0].URIs[0], tc.wantID)
			}
			tc.wantChain[0] = chain[0]
			if !sameCerts(chain, tc.wantChain...) {
				t.Errorf("svid file has %d certificates, want %d", len(chain), len(tc.wantChain))
			}
			if !sameCerts(readCertsFile(t, c.SVIDBundleFile), tc.wantRoots...) {
				t.Errorf("bundle file differs from the %d certificates wanted", len(tc.wantRoots))
			}
		})
	}
	if _, err := pickX509SVID(f.xc, "nope"); err == nil {
		t.Error("a hint no SVID has was accepted")
	}
}

func TestWriteCredentialFolder(t *testing.T) {
	f := newChainFixture(t)
	dir := t.TempDir()
	stale := filepath.Join(dir, "gone.test"+TrustBundleNameSuffix)
	other := filepath.Join(dir, "notes.txt")
	for _, p := range []string{stale, other} {
		if err := os.WriteFile(p, []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	c := &Config{CredentialFolder: dir, CertFileMode: 0o644}
	svid := f.xc.DefaultSVID()
	if err := writeCredentialFolder(c, svid, f.xc.Bundles); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(filepath.Join(dir, CredentialBundleName))
	if err != nil {
		t.Fatal(err)
	}
	_, chain, err := parseCredentialBundle(data)
	if err != nil {
		t.Fatal(err)
	}
	if !sameCerts(chain, svid.Certificates[0], f.inter) {
		t.Fatalf("credential bundle chain has %d certificates, want the leaf and the intermediate", len(chain))
	}
	requireMode(t, filepath.Join(dir, CredentialBundleName), 0o600)
	if !sameCerts(readCertsFile(t, filepath.Join(dir, "example.org"+TrustBundleNameSuffix)), f.root, f.expired) {
		t.Error("example.org trust bundle differs")
	}
	if _, err := os.Stat(filepath.Join(dir, "partner.test"+TrustBundleNameSuffix)); !os.IsNotExist(err) {
		t.Errorf("a federated trust bundle without include_federated_domains: %v", err)
	}
	if _, err := os.Stat(stale); !os.IsNotExist(err) {
		t.Errorf("the trust bundle of a trust domain no longer sent is still there: %v", err)
	}
	if _, err := os.Stat(other); err != nil {
		t.Errorf("a file that is not a trust bundle was touched: %v", err)
	}

	// The root in the SVID's chain is left out: the chain stops before the
	// trust anchor.
	svid.Certificates = append(svid.Certificates, f.root)
	c.IncludeFederatedDomains = true
	if err := writeCredentialFolder(c, svid, f.xc.Bundles); err != nil {
		t.Fatal(err)
	}
	data, _ = os.ReadFile(filepath.Join(dir, CredentialBundleName))
	if _, chain, err = parseCredentialBundle(data); err != nil || len(chain) != 2 {
		t.Fatalf("chain of %d with the root sent: %v", len(chain), err)
	}
	if !sameCerts(readCertsFile(t, filepath.Join(dir, "partner.test"+TrustBundleNameSuffix)), f.fedRoot) {
		t.Error("partner.test trust bundle differs")
	}
}
