package agent

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/x509"
	"encoding/json"
	"slices"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
)

func TestBundleEncodings(t *testing.T) {
	ca1, ca2 := newTestCA(t, testTD), newTestCA(t, testTD)
	k1, k2 := testkit.NewKey(t), testkit.NewKey(t)
	sb := spiffebundle.FromX509Authorities(testTD, []*x509.Certificate{ca1.Cert, ca2.Cert})
	_ = sb.AddJWTAuthority("b", k2.Public())
	_ = sb.AddJWTAuthority("a", k1.Public())
	b, err := newBundle(sb)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(b.X509DER, append(slices.Clone(ca1.Cert.Raw), ca2.Cert.Raw...)) {
		t.Error("X509DER is not the authorities' DER in order")
	}
	var set jose.JSONWebKeySet
	if err := json.Unmarshal(b.JWKS, &set); err != nil {
		t.Fatal(err)
	}
	if len(set.Keys) != 2 || set.Keys[0].KeyID != "a" || set.Keys[1].KeyID != "b" {
		t.Fatalf("JWKS keys %+v, want kids a, b", set.Keys)
	}
	for _, k := range set.Keys {
		if k.Use != "jwt-svid" {
			t.Errorf("kid %s has use %q", k.KeyID, k.Use)
		}
	}
	if !set.Keys[0].Key.(*ecdsa.PublicKey).Equal(k1.Public()) {
		t.Error("kid a carries the wrong key")
	}
}

func TestChainsTo(t *testing.T) {
	ca1, ca2 := newTestCA(t, testTD), newTestCA(t, testTD)
	key := testkit.NewKey(t)
	leaf, err := ca1.SignSVID(key.Public(), "spiffe://example.org/a", time.Now(), time.Now().Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	b1, _ := newBundle(spiffebundle.FromX509Authorities(testTD, []*x509.Certificate{ca1.Cert}))
	b2, _ := newBundle(spiffebundle.FromX509Authorities(testTD, []*x509.Certificate{ca2.Cert}))
	if !b1.chainsTo([]*x509.Certificate{leaf}) || !b1.chainsTo([]*x509.Certificate{leaf, ca1.Cert}) {
		t.Error("a chain from the bundle's CA does not chain to it")
	}
	if b2.chainsTo([]*x509.Certificate{leaf}) {
		t.Error("a chain from another CA chains to the bundle")
	}
	// A certificate naming ca2's key ID but signed by ca1 is not ca2's.
	forged := *ca1.Cert
	forged.SubjectKeyId = ca2.Cert.SubjectKeyId
	tmpl := &x509.Certificate{SerialNumber: testkit.Serial(), NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour),
		URIs: leaf.URIs, KeyUsage: x509.KeyUsageDigitalSignature, BasicConstraintsValid: true}
	liar := (&testkit.CA{Cert: &forged, Key: ca1.Key}).Issue(t, tmpl, key.Public())
	if !bytes.Equal(liar.AuthorityKeyId, ca2.Cert.SubjectKeyId) {
		t.Fatal("could not forge the authority key ID")
	}
	if b2.chainsTo([]*x509.Certificate{liar}) {
		t.Error("a matching authority key ID without a matching signature chained")
	}
	var nilBundle *Bundle
	if nilBundle.chainsTo([]*x509.Certificate{leaf}) || b1.chainsTo(nil) {
		t.Error("a nil bundle or empty chain chained")
	}
}
