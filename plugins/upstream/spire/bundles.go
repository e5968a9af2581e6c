package spire

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/lanyard-dev/lanyard/agent"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	bundlev1 "github.com/spiffe/spire-api-sdk/proto/spire/api/server/bundle/v1"
	"github.com/spiffe/spire-api-sdk/proto/spire/api/types"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// syncBundles fetches the trust domain's bundle and those of the trust
// domains the served entries federate with.
func (s *syncer) syncBundles(ctx context.Context) error {
	st := &s.view
	want := map[spiffeid.TrustDomain]bool{}
	for _, se := range st.entries {
		if se.entry == nil {
			continue
		}
		for _, td := range se.entry.FederatesWith {
			if td != s.td {
				want[td] = true
			}
		}
	}
	var local *types.Bundle
	fed := map[spiffeid.TrustDomain]*types.Bundle{}
	err := s.client.call(ctx, func(ctx context.Context, cc *grpc.ClientConn) error {
		client := bundlev1.NewBundleClient(cc)
		var err error
		if local, err = client.GetBundle(ctx, &bundlev1.GetBundleRequest{}); err != nil {
			return fmt.Errorf("fetching the bundle: %w", err)
		}
		for td := range want {
			b, err := client.GetFederatedBundle(ctx, &bundlev1.GetFederatedBundleRequest{TrustDomain: td.Name()})
			switch status.Code(err) {
			case codes.OK:
				fed[td] = b
				if st.missingFed[td] {
					delete(st.missingFed, td)
					s.log.Info("The federated bundle is now on the SPIRE Server", "trust_domain", td)
				}
			case codes.NotFound:
				if !st.missingFed[td] {
					st.missingFed[td] = true
					s.log.Warn("An entry federates with a trust domain whose bundle the SPIRE Server does not have: create the federation relationship on the server", "trust_domain", td)
				}
			default:
				return fmt.Errorf("fetching the federated bundle of %s: %w", td, err)
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	if !proto.Equal(local, st.localProto) {
		b, err := bundleFromProto(local)
		if err != nil {
			return err
		}
		if b.TrustDomain() != s.td {
			return fmt.Errorf("the SPIRE Server serves trust domain %s, not %s: check trust_domain", b.TrustDomain(), s.td)
		}
		if len(b.X509Authorities()) == 0 {
			return errors.New("the SPIRE Server's bundle has no X.509 authority")
		}
		if st.local == nil || !st.local.Equal(b) {
			st.bundlesDirty = true
		}
		if st.local == nil || !x509AuthoritiesEqual(st.local.X509Authorities(), b.X509Authorities()) {
			s.identity.setRoots(b.X509Authorities())
			if st.local != nil {
				s.log.Info("The trust domain's X.509 authorities changed", "count", len(b.X509Authorities()))
			}
		}
		st.localProto, st.local = local, b
	}
	next := make(map[spiffeid.TrustDomain]*spiffebundle.Bundle, len(fed))
	for td, pb := range fed {
		if old := st.fedProto[td]; old != nil && proto.Equal(old, pb) {
			next[td] = st.federated[td]
			continue
		}
		b, err := bundleFromProto(pb)
		if err != nil {
			s.log.Warn("Ignoring a federated bundle the agent cannot read", "trust_domain", td, "error", err)
			continue
		}
		if b.TrustDomain() != td {
			s.log.Warn("Ignoring a federated bundle for another trust domain than asked", "asked", td, "got", b.TrustDomain())
			continue
		}
		next[td] = b
		st.bundlesDirty = true
	}
	if len(next) != len(st.federated) {
		st.bundlesDirty = true
	}
	st.fedProto, st.federated = fed, next
	return nil
}

func x509AuthoritiesEqual(a, b []*x509.Certificate) bool {
	return slices.EqualFunc(a, b, func(x, y *x509.Certificate) bool { return x.Equal(y) })
}

// applyTaints acts on newly tainted authorities of the local bundle, as
// spire-agent does: the SVIDs they signed are replaced at once, the
// agent's own included.
func (s *syncer) applyTaints(sink agent.Sink) {
	st := &s.view
	if st.localProto == nil {
		return
	}
	var x509s []*x509.Certificate
	var kids []string
	for _, a := range st.localProto.X509Authorities {
		if a.Tainted && !st.taintedX509[string(a.Asn1)] {
			cert, err := x509.ParseCertificate(a.Asn1)
			if err != nil {
				continue
			}
			st.taintedX509[string(a.Asn1)] = true
			x509s = append(x509s, cert)
		}
	}
	for _, k := range st.localProto.JwtAuthorities {
		if k.Tainted && !st.taintedJWT[k.KeyId] {
			st.taintedJWT[k.KeyId] = true
			kids = append(kids, k.KeyId)
		}
	}
	if len(x509s) == 0 && len(kids) == 0 {
		return
	}
	s.log.Info("Authorities of the trust domain were tainted; replacing what they signed", "x509_authorities", len(x509s), "jwt_authorities", len(kids))
	sink.TaintX509Authorities(x509s)
	sink.TaintJWTAuthorities(kids)
	s.identity.taint(x509s)
}

// signedBy reports whether chain verifies up to one of roots. It verifies
// at a time the chain and the root are all valid: now, clamped into their
// common validity. (At the leaf's NotBefore a root made moments before the
// agent started is not valid yet: SPIRE backdates NotBefore by 10 s.)
func signedBy(chain []*x509.Certificate, roots []*x509.Certificate) bool {
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	now := time.Now()
	for _, r := range roots {
		at, ok := commonValidity(now, append(slices.Clone(chain), r))
		if !ok {
			continue
		}
		pool := x509.NewCertPool()
		pool.AddCert(r)
		_, err := chain[0].Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}, CurrentTime: at})
		if err == nil {
			return true
		}
	}
	return false
}

// commonValidity returns t clamped into the time when every cert is valid;
// false when there is no such time.
func commonValidity(t time.Time, certs []*x509.Certificate) (time.Time, bool) {
	from, until := certs[0].NotBefore, certs[0].NotAfter
	for _, c := range certs[1:] {
		if c.NotBefore.After(from) {
			from = c.NotBefore
		}
		if c.NotAfter.Before(until) {
			until = c.NotAfter
		}
	}
	switch {
	case from.After(until):
		return time.Time{}, false
	case t.Before(from):
		return from, true
	case t.After(until):
		return until, true
	}
	return t, true
}

// bundleFromProto converts a server bundle.
func bundleFromProto(b *types.Bundle) (*spiffebundle.Bundle, error) {
	if b == nil {
		return nil, errors.New("the SPIRE Server returned no bundle")
	}
	td, err := spiffeid.TrustDomainFromString(b.TrustDomain)
	if err != nil {
		return nil, fmt.Errorf("the SPIRE Server's bundle names a bad trust domain %q: %w", b.TrustDomain, err)
	}
	out := spiffebundle.New(td)
	for _, a := range b.X509Authorities {
		cert, err := x509.ParseCertificate(a.Asn1)
		if err != nil {
			return nil, fmt.Errorf("parsing an X.509 authority of %s: %w", td, err)
		}
		out.AddX509Authority(cert)
	}
	for _, k := range b.JwtAuthorities {
		pub, err := x509.ParsePKIXPublicKey(k.PublicKey)
		if err != nil {
			return nil, fmt.Errorf("parsing JWT authority %q of %s: %w", k.KeyId, td, err)
		}
		if k.KeyId == "" {
			return nil, fmt.Errorf("a JWT authority of %s has no key ID", td)
		}
		if err := out.AddJWTAuthority(k.KeyId, pub); err != nil {
			return nil, fmt.Errorf("JWT authority %q of %s: %w", k.KeyId, td, err)
		}
	}
	if b.RefreshHint > 0 {
		out.SetRefreshHint(time.Duration(b.RefreshHint) * time.Second)
	}
	out.SetSequenceNumber(b.SequenceNumber)
	return out, nil
}
