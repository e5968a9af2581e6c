package e2e

import (
	"crypto/x509"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// partnerBundle writes a SPIFFE bundle for partner.org and returns its path
// and root.
func partnerBundle(t *testing.T, dir string) (string, *x509.Certificate) {
	td := spiffeid.RequireTrustDomainFromString("partner.org")
	ca := testkit.NewTrustDomainCA(t, td, testkit.WithCommonName("partner"))
	root, key := ca.Cert, ca.Key
	b := spiffebundle.FromX509Authorities(td, []*x509.Certificate{root})
	if err := b.AddJWTAuthority("partner-kid", key.Public()); err != nil {
		t.Fatal(err)
	}
	raw, err := b.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "partner.json")
	if err := os.WriteFile(path, raw, 0o644); err != nil {
		t.Fatal(err)
	}
	return path, root
}

func TestFederatedBundles(t *testing.T) {
	dir := newAgentDir(t)
	path, root := partnerBundle(t, dir)
	cfg := withEntries(`
      entry {
        spiffe_id      = "spiffe://example.org/user/@UID@"
        selectors      = ["unix:uid:@UID@"]
        federates_with = ["partner.org"]
      }
      federated_bundle {
        trust_domain = "partner.org"
        path         = "` + path + `"
      }
`)
	a := startAgentIn(t, dir, cfg)
	ctx := testContext(t)
	partner := spiffeid.RequireTrustDomainFromString("partner.org")

	x509ctx, err := a.client(t).FetchX509Context(ctx)
	if err != nil {
		t.Fatal(err)
	}
	pb, err := x509ctx.Bundles.GetX509BundleForTrustDomain(partner)
	if err != nil {
		t.Fatalf("no partner.org bundle in the X.509 context: %v", err)
	}
	if !pb.HasX509Authority(root) {
		t.Fatal("the partner.org bundle lacks its root")
	}
	jwtBundles, err := a.client(t).FetchJWTBundles(ctx)
	if err != nil {
		t.Fatal(err)
	}
	jb, err := jwtBundles.GetJWTBundleForTrustDomain(partner)
	if err != nil || !jb.HasJWTAuthority("partner-kid") {
		t.Fatalf("partner.org JWT bundle: %v", err)
	}

	// Without federates_with, the partner's bundle is not handed out.
	a.reload(strings.Replace(cfg, `federates_with = ["partner.org"]`, ``, 1), "Reloaded the config")
	waitFor(t, 10*time.Second, "the partner bundle to be withdrawn", func() bool {
		b, err := a.client(t).FetchX509Bundles(ctx)
		if err != nil {
			return false
		}
		_, err = b.GetX509BundleForTrustDomain(partner)
		return err != nil
	})
}
