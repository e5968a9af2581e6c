package agent

import (
	"bytes"
	"slices"
	"sync"
)

// X509Snapshot is everything one FetchX509SVID message carries. Snapshots
// are shared between callers and never changed.
type X509Snapshot struct {
	SVIDs     []*X509SVID // the default identity first
	Hints     []string    // Hints[i] belongs to SVIDs[i]
	Local     *Bundle
	Federated []*Bundle // sorted by trust domain

	gen        uint64 // the store's when built
	encodeOnce sync.Once
	encoded    []byte
}

// Encoded returns encode(s), computed once per snapshot: the streams that
// share a snapshot send one encoding.
func (s *X509Snapshot) Encoded(encode func(*X509Snapshot) []byte) []byte {
	s.encodeOnce.Do(func() { s.encoded = encode(s) })
	return s.encoded
}

// Same reports whether two snapshots would produce the same message. Bundles
// are compared by their X.509 encoding: a change to JWT keys, a sequence
// number or a refresh hint does not show in this message.
func (s *X509Snapshot) Same(o *X509Snapshot) bool {
	return s != nil && o != nil && (s == o || slices.Equal(s.SVIDs, o.SVIDs) && slices.Equal(s.Hints, o.Hints) &&
		sameBundles(s.Local, s.Federated, o.Local, o.Federated, (*Bundle).x509Bytes))
}

func (b *Bundle) x509Bytes() []byte { return b.X509DER }
func (b *Bundle) jwtBytes() []byte  { return b.JWKS }

func sameBundles(aLocal *Bundle, aFed []*Bundle, bLocal *Bundle, bFed []*Bundle, enc func(*Bundle) []byte) bool {
	same := func(a, b *Bundle) bool {
		return a == b || (a != nil && b != nil && a.TrustDomain() == b.TrustDomain() && bytes.Equal(enc(a), enc(b)))
	}
	return same(aLocal, bLocal) && slices.EqualFunc(aFed, bFed, same)
}

// EntryIDs lists the entries the snapshot was built from.
func (s *X509Snapshot) EntryIDs() []string {
	ids := make([]string, len(s.SVIDs))
	for i, svid := range s.SVIDs {
		ids[i] = svid.EntryID
	}
	return ids
}

// BundleSnapshot is what one FetchX509Bundles or FetchJWTBundles message
// carries.
type BundleSnapshot struct {
	Local     *Bundle
	Federated []*Bundle
}

// SameX509 reports whether two snapshots would produce the same
// FetchX509Bundles message.
func (s *BundleSnapshot) SameX509(o *BundleSnapshot) bool {
	return s != nil && o != nil && sameBundles(s.Local, s.Federated, o.Local, o.Federated, (*Bundle).x509Bytes)
}

// SameJWT reports whether two snapshots would produce the same
// FetchJWTBundles message.
func (s *BundleSnapshot) SameJWT(o *BundleSnapshot) bool {
	return s != nil && o != nil && sameBundles(s.Local, s.Federated, o.Local, o.Federated, (*Bundle).jwtBytes)
}
