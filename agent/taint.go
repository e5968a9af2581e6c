package agent

import (
	"crypto/x509"
	"slices"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
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

// taint marks for replacement the SVIDs that chain to a tainted authority
// and returns their entries; the SVIDs they sign from now on are marked
// as they land (see put).
func (s *entryStore) taint(authorities []*x509.Certificate) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var all []*x509.Certificate
	if s.tainted != nil {
		all = s.tainted.X509Authorities()
	}
	for _, a := range authorities {
		if !slices.ContainsFunc(all, a.Equal) {
			all = append(all, a)
		}
	}
	s.tainted = authoritiesBundle(all)
	var ids []string
	for id, svid := range s.svids {
		if s.tainted.chainsTo(svid.Chain) {
			svid.replace.Store(true)
			ids = append(ids, id)
		}
	}
	return ids
}

// keepTainted keeps of the tainted authorities those still in the local
// bundle, so that they are kept no longer than they sign anything served.
func keepTainted(tainted *Bundle, local *spiffebundle.Bundle) *Bundle {
	if tainted == nil {
		return nil
	}
	in := local.X509Authorities()
	kept := slices.DeleteFunc(tainted.X509Authorities(), func(a *x509.Certificate) bool {
		return !slices.ContainsFunc(in, a.Equal)
	})
	return authoritiesBundle(kept)
}

// authoritiesBundle holds X.509 authorities for chainsTo, which reads
// nothing else (the trust domain is moot); nil when there are none.
func authoritiesBundle(authorities []*x509.Certificate) *Bundle {
	if len(authorities) == 0 {
		return nil
	}
	return &Bundle{Bundle: spiffebundle.FromX509Authorities(spiffeid.TrustDomain{}, authorities)}
}
