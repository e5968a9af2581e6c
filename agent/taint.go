package agent

import (
	"crypto/x509"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

var _ Sink = (*Cache)(nil)

// TaintX509Authorities marks the SVIDs that chain to a tainted authority
// as due, and wakes the renewal loop.
func (c *Cache) TaintX509Authorities(authorities []*x509.Certificate) {
	if len(authorities) == 0 {
		return
	}
	// chainsTo only reads the X.509 authorities; the trust domain is moot.
	tainted := &Bundle{Bundle: spiffebundle.FromX509Authorities(spiffeid.TrustDomain{}, authorities)}
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, svid := range c.svids {
		if tainted.chainsTo(svid.Chain) {
			svid.RenewAt = time.Time{}
			n++
		}
	}
	if n > 0 {
		c.log.Info("Re-signing X509-SVIDs issued by a tainted authority", "count", n)
		c.kickRenewal()
	}
}

// TaintJWTAuthorities drops every cached JWT-SVID: tokens are cheap to
// sign again, and the cache does not keep which key signed each.
func (c *Cache) TaintJWTAuthorities(keyIDs []string) {
	if len(keyIDs) == 0 {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.jwts) > 0 {
		c.log.Info("Dropping cached JWT-SVIDs after a JWT authority was tainted", "count", len(c.jwts))
		clear(c.jwts)
	}
}
