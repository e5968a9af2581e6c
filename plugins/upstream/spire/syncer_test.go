package spire

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/attestor/selector"
	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/spire-api-sdk/proto/spire/api/types"
	"google.golang.org/protobuf/proto"
)

func TestEntryConversion(t *testing.T) {
	s := newSyncer(hclog.NewNullLogger(), td, spiffeid.RequireFromPath(td, "/spire/server"), time.Second, nil, nil)
	sid := func(path string) *types.SPIFFEID { return &types.SPIFFEID{TrustDomain: "example.org", Path: path} }
	full := &types.Entry{
		Id: "e1", SpiffeId: sid("/web"), ParentId: sid("/node"),
		Selectors:   []*types.Selector{{Type: "unix", Value: "uid:1000"}, {Type: "k8s", Value: "ns:default"}, {Type: "unix", Value: "uid:1000"}},
		X509SvidTtl: 600, JwtSvidTtl: 60, Hint: "db", DnsNames: []string{"web.example.org"},
		FederatesWith: []string{"spiffe://b.org", "a.org", "b.org"}, RevisionNumber: 3, CreatedAt: 1700000000,
	}
	se := s.convertEntry(full)
	e := se.entry
	if e == nil {
		t.Fatal("the entry was not converted")
	}
	want := []selector.Selector{{Type: "k8s", Value: "ns:default"}, {Type: "unix", Value: "uid:1000"}}
	if fmt.Sprint(e.Selectors) != fmt.Sprint(want) {
		t.Fatalf("selectors %v, want %v", e.Selectors, want)
	}
	if e.SPIFFEID.String() != "spiffe://example.org/web" || e.X509SVIDTTL != 10*time.Minute || e.JWTSVIDTTL != time.Minute ||
		e.Hint != "db" || e.DNSNames[0] != "web.example.org" || e.CreatedAt != 1700000000 || e.RevisionNumber != 3 {
		t.Fatalf("converted %+v", e)
	}
	if fmt.Sprint(e.FederatesWith) != "[a.org b.org]" {
		t.Fatalf("federates with %v", e.FederatesWith)
	}
	for name, bad := range map[string]*types.Entry{
		"store_svid":       {Id: "s", SpiffeId: sid("/w"), ParentId: sid("/node"), StoreSvid: true, Selectors: full.Selectors},
		"node alias":       {Id: "a", SpiffeId: sid("/node"), ParentId: sid("/spire/server"), Selectors: []*types.Selector{{Type: "join_token", Value: "t"}}},
		"token alias":      {Id: "t", SpiffeId: sid("/node"), ParentId: sid("/spire/agent/join_token/t"), Selectors: []*types.Selector{{Type: "spiffe_id", Value: "spiffe://example.org/spire/agent/join_token/t"}}},
		"other trust":      {Id: "o", SpiffeId: &types.SPIFFEID{TrustDomain: "other.org", Path: "/w"}, ParentId: sid("/node"), Selectors: full.Selectors},
		"empty selector":   {Id: "x", SpiffeId: sid("/w"), ParentId: sid("/node"), Selectors: []*types.Selector{{Type: "unix"}}},
		"bad federation":   {Id: "f", SpiffeId: sid("/w"), ParentId: sid("/node"), Selectors: full.Selectors, FederatesWith: []string{"Bad Domain"}},
		"missing SPIFFEID": {Id: "m", ParentId: sid("/node"), Selectors: full.Selectors},
	} {
		if se := s.convertEntry(bad); se.entry != nil || se.revision != bad.RevisionNumber {
			t.Errorf("%s: served %+v", name, se.entry)
		}
	}
	// Same revision: kept as is. New revision, or recreated: replaced.
	s.putEntry(full)
	kept := s.view.entries["e1"].entry
	s.view.entriesDirty = false
	s.putEntry(full)
	if s.view.entries["e1"].entry != kept || s.view.entriesDirty {
		t.Fatal("an unchanged entry was replaced")
	}
	recreated := proto.Clone(full).(*types.Entry)
	recreated.CreatedAt++
	s.putEntry(recreated)
	if s.view.entries["e1"].entry == kept || !s.view.entriesDirty {
		t.Fatal("a recreated entry was not replaced")
	}
	s.dropEntriesExcept(map[string]bool{})
	if len(s.view.entries) != 0 {
		t.Fatal("entries not seen were kept")
	}
}

func TestBundleConversion(t *testing.T) {
	ca := testkit.NewTrustDomainCA(t, td).Cert
	jwtKey := testkit.NewKey(t)
	pub, err := x509.MarshalPKIXPublicKey(jwtKey.Public())
	if err != nil {
		t.Fatal(err)
	}
	b, err := bundleFromProto(&types.Bundle{
		TrustDomain:     "example.org",
		X509Authorities: []*types.X509Certificate{{Asn1: ca.Raw, Tainted: true}},
		JwtAuthorities:  []*types.JWTKey{{PublicKey: pub, KeyId: "k1"}},
		RefreshHint:     30, SequenceNumber: 7,
	})
	if err != nil {
		t.Fatal(err)
	}
	if b.TrustDomain() != td || len(b.X509Authorities()) != 1 || len(b.JWTAuthorities()) != 1 {
		t.Fatalf("converted %v", b)
	}
	if hint, _ := b.RefreshHint(); hint != 30*time.Second {
		t.Fatalf("refresh hint %s", hint)
	}
	if seq, _ := b.SequenceNumber(); seq != 7 {
		t.Fatalf("sequence %d", seq)
	}
	if _, err := bundleFromProto(&types.Bundle{TrustDomain: "example.org", JwtAuthorities: []*types.JWTKey{{PublicKey: pub}}}); err == nil {
		t.Fatal("a JWT authority without a key ID was accepted")
	}
	if _, err := bundleFromProto(&types.Bundle{TrustDomain: "example.org", X509Authorities: []*types.X509Certificate{{Asn1: []byte("junk")}}}); err == nil {
		t.Fatal("a junk X.509 authority was accepted")
	}
}

// TestResyncGivesUpWithItsCaller: a caller waiting for a sync on demand
// while another sync holds the lock (one that may run for rpcTimeout when
// the server is unreachable) leaves when its context ends.
func TestResyncGivesUpWithItsCaller(t *testing.T) {
	id := &agentIdentity{ready: make(chan struct{})}
	close(id.ready)
	s := newSyncer(hclog.NewNullLogger(), td, spiffeid.RequireFromPath(td, "/spire/server"), time.Second, nil, id)
	s.lock.Acquire(context.Background(), 1) // a periodic sync in progress
	defer s.lock.Release(1)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	done := make(chan error, 1)
	go func() {
		_, err := s.Resync(ctx)
		done <- err
	}()
	err := testkit.Receive(t, done, 10*time.Second, "Resync to leave the sync lock when its caller's context ended")
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Resync = %v, want the caller's deadline", err)
	}
}

// The spacing of syncs on demand: short for the first two of a run that
// finds nothing new, longer after; a sync that brings entries, or a quiet
// sync_interval, starts over. The budget is one token bucket.
func TestResyncPolicy(t *testing.T) {
	const interval = time.Second
	p := newResyncPolicy(interval)
	if p.firstSpacing != interval/20 || p.spacing != interval/5 || p.budget.Burst() != 10 {
		t.Fatalf("policy %+v, want spacings of a twentieth and a fifth of sync_interval and a budget of ten", p)
	}
	now := time.Now()
	for i, want := range []time.Duration{p.firstSpacing, p.firstSpacing, p.spacing, p.spacing} {
		if got := p.minGap(now, interval); got != want {
			t.Fatalf("sync on demand %d: gap %s, want %s", i+1, got, want)
		}
		if !p.begin(now, interval) {
			t.Fatalf("sync on demand %d refused within the budget", i+1)
		}
		p.end(false)
	}
	p.end(true)
	if got := p.minGap(now, interval); got != p.firstSpacing {
		t.Fatalf("after a sync that brought entries: gap %s, want %s", got, p.firstSpacing)
	}
	p.streak = 5
	if got := p.minGap(now.Add(2*interval), interval); got != p.firstSpacing {
		t.Fatalf("after a quiet sync_interval: gap %s, want %s", got, p.firstSpacing)
	}
	for p.begin(now, interval) {
	}
	if p.budget.Tokens() >= 1 {
		t.Fatal("begin refused with tokens left")
	}
}
