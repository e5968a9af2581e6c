package local

import (
	"strings"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/agent"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

var _ agent.SelfIdentity = (*Local)(nil)

// The agent's own SVID verifies against the published bundle, names the
// node under /spire/agent/local/, is reused until half-life, and is signed
// again by the successor once the CA rotates.
func TestSelfSVIDFollowsTheCA(t *testing.T) {
	l := newLocal(t, t.TempDir(), `ca_ttl = "1h"
x509_svid_ttl = "10m"`)
	base := time.Now()
	move := setClock(l, base)

	svid, err := l.GetX509SVID()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(svid.ID.Path(), SelfPathPrefix) || svid.ID.TrustDomain() != td {
		t.Fatalf("agent ID %s, want spiffe://%s%s<host>", svid.ID, td, SelfPathPrefix)
	}
	verify := func(s *x509svid.SVID, at time.Time) {
		t.Helper()
		b, _ := mustBundles(t, l)
		if _, _, err := x509svid.Verify(s.Certificates, x509bundle.FromX509Authorities(td, b.X509Authorities()), x509svid.WithTime(at)); err != nil {
			t.Fatalf("the agent SVID does not verify against the bundle: %v", err)
		}
	}
	verify(svid, base)
	if again, _ := l.GetX509SVID(); again != svid {
		t.Error("a young agent SVID was signed again")
	}

	// Past half its life: a new one.
	move(base.Add(6 * time.Minute))
	renewed, err := l.GetX509SVID()
	if err != nil || renewed == svid {
		t.Fatalf("past half-life: renewed=%v err=%v", renewed != svid, err)
	}

	// The successor CA signs from two thirds of the CA's life on.
	old := l.authorities[0]
	for _, at := range []time.Time{old.at(prepareAt).Add(time.Second), old.at(activateAt).Add(time.Second)} {
		move(at)
		if _, _, err := l.rotate(); err != nil {
			t.Fatal(err)
		}
	}
	if l.authorities[l.active] == old {
		t.Fatal("the CA did not rotate")
	}
	rotated, err := l.GetX509SVID()
	if err != nil {
		t.Fatal(err)
	}
	if rotated == renewed || rotated.Certificates[0].CheckSignatureFrom(l.authorities[l.active].cert) != nil {
		t.Fatal("after the CA rotated, the agent SVID is not signed by the new CA")
	}
	verify(rotated, old.at(activateAt).Add(time.Second))
}
