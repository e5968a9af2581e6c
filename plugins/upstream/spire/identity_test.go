package spire

import (
	"crypto/x509"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/spire-api-sdk/proto/spire/api/types"
)

func TestRedactID(t *testing.T) {
	if got := redactID(spiffeid.RequireFromPath(td, "/spire/agent/join_token/secret-token")); strings.Contains(got, "secret") {
		t.Fatalf("redactID leaked the token: %s", got)
	}
	if got := redactID(spiffeid.RequireFromPath(td, "/spire/agent/x509pop/abc")); got != "spiffe://example.org/spire/agent/x509pop/abc" {
		t.Fatalf("redactID changed a non-token ID: %s", got)
	}
}

func TestRenewAtIsNearHalfLife(t *testing.T) {
	ca := testkit.NewTrustDomainCA(t, td)
	key := testkit.NewKey(t)
	leaf := newSVID(t, ca, key, time.Hour)
	life := leaf.NotAfter.Sub(leaf.NotBefore)
	for range 50 {
		at := renewAt(leaf).Sub(leaf.NotBefore)
		if at < life*45/100 || at > life*55/100 {
			t.Fatalf("renew at %s of a %s life, want 45%%-55%%", at, life)
		}
	}
}

// newTestIdentity is an agent identity holding an SVID, stored in a
// temporary directory, with a client that never dials.
func newTestIdentity(t *testing.T) *agentIdentity {
	t.Helper()
	dir := t.TempDir()
	ca := testkit.NewTrustDomainCA(t, td)
	creds := newCreds(t, ca)
	st := &store{statePath: filepath.Join(dir, stateFileName), keyDir: dir, td: td}
	id := newAgentIdentity(hclog.NewNullLogger(), td, &agent.ServerConfig{NodeAttestorName: "join_token"}, st)
	id.client = newTestClient(t, id.refused)
	if err := id.install(nil, creds); err != nil {
		t.Fatal(err)
	}
	id.mu.Lock()
	id.roots = []*x509.Certificate{ca.Cert}
	id.mu.Unlock()
	return id
}

// A server that asks for attestation wakes the rotation; one that banned
// the agent makes it forget its SVID, stored and held, and ends Run.
func TestRefusedByServer(t *testing.T) {
	id := newTestIdentity(t)
	id.refused(denied(types.PermissionDeniedDetails_AGENT_MUST_REATTEST))
	select {
	case <-id.reattestKick:
	default:
		t.Fatal("AGENT_MUST_REATTEST did not ask the rotation to attest again")
	}
	if id.current() == nil {
		t.Fatal("a request to attest again dropped the SVID")
	}
	id.refused(denied(types.PermissionDeniedDetails_AGENT_BANNED))
	select {
	case err := <-id.fatal:
		if !strings.Contains(err.Error(), "banned") {
			t.Fatalf("fatal error %v does not say the agent is banned", err)
		}
	default:
		t.Fatal("a banned agent did not stop")
	}
	if id.current() != nil {
		t.Fatal("a banned agent kept its SVID")
	}
	if c, _, _, err := id.store.load(); err != nil || c != nil {
		t.Fatalf("a banned agent kept its stored SVID: %v", err)
	}
}

// The server's new authorities are stored with the SVID; one that no
// longer holds the SVID's CA asks for a renewal.
func TestSetRoots(t *testing.T) {
	id := newTestIdentity(t)
	other := testkit.NewTrustDomainCA(t, td).Cert
	id.setRoots([]*x509.Certificate{other})
	select {
	case <-id.renewKick:
	default:
		t.Fatal("the SVID's CA left the bundle and no renewal was asked for")
	}
	_, roots, _, err := id.store.load()
	if err != nil || len(roots) != 1 || !roots[0].Equal(other) {
		t.Fatalf("the new authorities were not stored: %v", err)
	}
	b, err := id.GetX509BundleForTrustDomain(td)
	if err != nil || !b.HasX509Authority(other) {
		t.Fatalf("the server is not verified with the new authorities: %v", err)
	}
}

// A trust anchor made moments before the agent starts is newer than the
// agent SVID's NotBefore, which SPIRE backdates by 10 s: the SVID is still
// signed by it, and no renewal is asked for.
func TestSetRootsFreshCA(t *testing.T) {
	id := newTestIdentity(t)
	now := time.Now()
	ca := testkit.NewTrustDomainCA(t, td, testkit.WithValidity(now, now.Add(24*time.Hour)))
	creds := newCreds(t, ca)
	if err := id.install(id.current(), creds); err != nil {
		t.Fatal(err)
	}
	id.setRoots([]*x509.Certificate{ca.Cert})
	select {
	case <-id.renewKick:
		t.Fatal("the SVID's CA is in the bundle, yet a renewal was asked for")
	default:
	}
	// Another root still asks for one.
	id.setRoots([]*x509.Certificate{testkit.NewTrustDomainCA(t, td, testkit.WithValidity(now, now.Add(time.Hour))).Cert})
	select {
	case <-id.renewKick:
	default:
		t.Fatal("the SVID's CA left the bundle and no renewal was asked for")
	}
}
