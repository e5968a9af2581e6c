package files

import (
	"strings"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testkit"
)

// TestCheckCredentialBundleRefuses shows the credential folder reader
// catches what it is there to catch: it passes a well-formed bundle and
// refuses a mismatched key, a partial file, stray bytes, the trust anchor
// and a wrong block order.
func TestCheckCredentialBundleRefuses(t *testing.T) {
	ca := testkit.NewTrustDomainCA(t, appID.TrustDomain())
	trust := ca.Bundle(appID.TrustDomain()).X509Bundle()
	cert, key := ca.SVID(t, appID.String(), time.Hour)
	_, otherKey := ca.SVID(t, appID.String(), time.Hour)
	keyPEM := testkit.PEM("PRIVATE KEY", testkit.PKCS8(t, key))
	certPEM := testkit.PEM("CERTIFICATE", cert.Raw)
	good := string(keyPEM) + string(certPEM)
	if _, err := checkCredentialBundle([]byte(good), trust); err != nil {
		t.Fatalf("a well-formed bundle: %v", err)
	}
	for name, data := range map[string]string{
		"mismatched key":    string(testkit.PEM("PRIVATE KEY", testkit.PKCS8(t, otherKey))) + string(certPEM),
		"partial":           good[:len(good)-40],
		"key only":          string(keyPEM),
		"trailing bytes":    good + "\n",
		"between blocks":    string(keyPEM) + "# comment\n" + string(certPEM),
		"trust anchor":      good + string(testkit.PEM("CERTIFICATE", ca.Cert.Raw)),
		"certificate first": string(certPEM) + string(keyPEM),
		"EC key block":      strings.Replace(good, "PRIVATE KEY", "EC PRIVATE KEY", 2),
	} {
		if _, err := checkCredentialBundle([]byte(data), trust); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
