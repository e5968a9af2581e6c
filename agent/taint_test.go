package agent

import (
	"crypto/x509"
	"testing"

	"github.com/lanyard-dev/lanyard/internal/testkit"
)

// TestSVIDSignedInFlightByATaintedAuthorityIsReplaced: an SVID whose
// signing was in flight when its authority was tainted lands marked for
// replacement and is replaced at once, not served until its half-life;
// the store forgets the authority once it leaves the bundle.
func TestSVIDSignedInFlightByATaintedAuthorityIsReplaced(t *testing.T) {
	c, up := newTestCache(t)
	e := entryA()
	oldCA, newCA := up.ca, newTestCA(t, testTD)
	hold(c, up, e)
	startRotation(t, c)
	gate := make(chan struct{})
	up.SetGate(gate)
	fetched := make(chan error, 1)
	go func() {
		_, err := c.X509Identities(t.Context(), e.Selectors)
		fetched <- err
	}()
	testkit.WaitFor(t, waitLimit, "the signing in flight", func() bool { return up.x509Calls.Load() == 1 })

	// The upstream moves to a new CA and taints the old one, which stays
	// in the bundle; the signing in flight was started with the old one.
	both := up.bundle()
	both.AddX509Authority(newCA.Cert)
	up.set(func(u *testUpstream) { u.ca = newCA })
	c.SetBundles(both, nil)
	c.TaintX509Authorities([]*x509.Certificate{oldCA.Cert})
	up.SetGate(nil)
	close(gate)
	if err := <-fetched; err != nil {
		t.Fatal(err)
	}
	testkit.WaitFor(t, waitLimit, "the SVID of the tainted CA replaced", func() bool {
		svid := c.svidOf("a")
		return svid != nil && svid.Chain[0].CheckSignatureFrom(newCA.Cert) == nil
	})

	c.SetBundles(up.bundle(), nil)
	c.store.mu.RLock()
	defer c.store.mu.RUnlock()
	if c.store.tainted != nil {
		t.Errorf("the store keeps tainted authorities no longer in the bundle: %d", len(c.store.tainted.X509Authorities()))
	}
}
