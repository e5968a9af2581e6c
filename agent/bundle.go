package agent

import (
	"bytes"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"slices"

	"github.com/go-jose/go-jose/v4"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
)

// Bundle is a trust bundle with the encodings the Workload API sends,
// computed once when the bundle changes rather than on every fetch.
type Bundle struct {
	*spiffebundle.Bundle
	// X509DER is the X.509 authorities' DER, concatenated.
	X509DER []byte
	// JWKS is the JWT authorities as a JWKS whose keys carry kid and use.
	JWKS []byte
}

func newBundle(b *spiffebundle.Bundle) (*Bundle, error) {
	var der bytes.Buffer
	for _, c := range b.X509Authorities() {
		der.Write(c.Raw)
	}
	authorities := b.JWTAuthorities()
	kids := make([]string, 0, len(authorities))
	for kid := range authorities {
		kids = append(kids, kid)
	}
	slices.Sort(kids)
	set := jose.JSONWebKeySet{Keys: make([]jose.JSONWebKey, 0, len(kids))}
	for _, kid := range kids {
		set.Keys = append(set.Keys, jose.JSONWebKey{Key: authorities[kid], KeyID: kid, Use: "jwt-svid"})
	}
	jwks, err := json.Marshal(set)
	if err != nil {
		return nil, fmt.Errorf("encoding the JWT authorities of %s: %w", b.TrustDomain(), err)
	}
	return &Bundle{Bundle: b, X509DER: der.Bytes(), JWKS: jwks}, nil
}

// chainsTo reports whether chain ends at one of the bundle's X.509
// authorities. It compares key identifiers and signatures, not validity
// periods: it tells whether an SVID must be re-signed after a CA rotation.
func (b *Bundle) chainsTo(chain []*x509.Certificate) bool {
	if b == nil || len(chain) == 0 {
		return false
	}
	top := chain[len(chain)-1]
	for _, root := range b.X509Authorities() {
		if top.Equal(root) {
			return true
		}
		if bytes.Equal(top.AuthorityKeyId, root.SubjectKeyId) && top.CheckSignatureFrom(root) == nil {
			return true
		}
	}
	return false
}

// holdsJWTKey reports whether kid names one of the bundle's JWT authorities.
func (b *Bundle) holdsJWTKey(kid string) bool {
	if b == nil {
		return false
	}
	_, ok := b.FindJWTAuthority(kid)
	return ok
}
