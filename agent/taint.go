package agent

import (
	"crypto/x509"
)

var _ Sink = (*SVIDManager)(nil)

// TaintX509Authorities marks the SVIDs that chain to a tainted authority
// for replacement, and has the rotator replace them now. The store keeps
// the authorities while they are in the bundle: an SVID one signed that
// lands later (its signing was in flight) is marked as it lands.
func (m *SVIDManager) TaintX509Authorities(authorities []*x509.Certificate) {
	if len(authorities) == 0 {
		return
	}
	if ids := m.store.taint(authorities); len(ids) > 0 {
		m.log.Info("Re-signing X509-SVIDs issued by a tainted authority", "count", len(ids))
		m.rotator.wake(ids...)
	}
}

// TaintJWTAuthorities drops every cached JWT-SVID: tokens are cheap to
// sign again, and the cache does not keep which key signed each.
func (m *SVIDManager) TaintJWTAuthorities(keyIDs []string) {
	if len(keyIDs) == 0 {
		return
	}
	if n := m.jwts.dropAll(); n > 0 {
		m.log.Info("Dropping cached JWT-SVIDs after a JWT authority was tainted", "count", n)
	}
}
