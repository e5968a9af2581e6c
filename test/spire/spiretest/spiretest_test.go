package spiretest

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// TestAgentIssuesSVID proves the harness end to end: server, join token, a
// real spire-agent, an entry for this process's uid, and an X509-SVID from
// the agent's Workload API that chains to the server's bundle.
func TestAgentIssuesSVID(t *testing.T) {
	s := StartServer(t, WithX509SVIDTTL(10*time.Minute))
	nodeID := "spiffe://example.org/node"
	workloadID := "spiffe://example.org/workload"

	sock := s.StartAgent(t, s.JoinToken(t, nodeID), WithSyncInterval(time.Second))
	s.CreateEntry(t, nodeID, workloadID, fmt.Sprintf("unix:uid:%d", os.Getuid()))

	// Entries reach spire-agent on its next sync, typically within seconds.
	deadline := time.Now().Add(60 * time.Second)
	var svid *x509svid.SVID
	var lastErr error
	for time.Now().Before(deadline) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		svid, lastErr = workloadapi.FetchX509SVID(ctx, workloadapi.WithAddr("unix://"+sock))
		cancel()
		if lastErr == nil {
			break
		}
		time.Sleep(250 * time.Millisecond)
	}
	if lastErr != nil {
		t.Fatalf("no X509-SVID from spire-agent within 60s: %v", lastErr)
	}
	if got := svid.ID.String(); got != workloadID {
		t.Fatalf("SVID ID = %q, want %q", got, workloadID)
	}

	td := spiffeid.RequireTrustDomainFromString(s.TrustDomain)
	roots := s.BundleCerts(t)
	if _, _, err := x509svid.Verify(svid.Certificates, x509bundle.FromX509Authorities(td, roots)); err != nil {
		t.Fatalf("SVID does not verify against spire-server's bundle: %v", err)
	}
	if ttl := time.Until(svid.Certificates[0].NotAfter); ttl > 10*time.Minute+time.Minute {
		t.Fatalf("SVID lives %s, want at most the configured 10m", ttl)
	}
}

// TestServerLifecycle covers entry CRUD, authority rotation and restarting
// the same server.
func TestServerLifecycle(t *testing.T) {
	s := StartServer(t, WithTrustDomain("lifecycle.test"), WithCATTL(2*time.Hour))

	if n := len(s.BundleCerts(t)); n != 1 {
		t.Fatalf("fresh bundle has %d X.509 authorities, want 1", n)
	}
	x509ID := s.PrepareX509Authority(t)
	if n := len(s.BundleCerts(t)); n != 2 {
		t.Fatalf("bundle has %d X.509 authorities after prepare, want 2", n)
	}
	s.ActivateX509Authority(t, x509ID)
	if out := s.CLI(t, "localauthority", "x509", "show"); !strings.Contains(out, x509ID) {
		t.Fatalf("activated X.509 authority %s missing from localauthority x509 show:\n%s", x509ID, out)
	}

	jwtID := s.PrepareJWTAuthority(t)
	s.ActivateJWTAuthority(t, jwtID)
	if out := s.CLI(t, "localauthority", "jwt", "show"); !strings.Contains(out, jwtID) {
		t.Fatalf("activated JWT authority %s missing from localauthority jwt show:\n%s", jwtID, out)
	}

	id := s.CreateEntry(t, "spiffe://lifecycle.test/node", "spiffe://lifecycle.test/w", "unix:uid:12345")

	s.Stop()
	ctx, cancel := context.WithTimeout(context.Background(), cliTimeout)
	_, err := s.run(ctx, "healthcheck")
	cancel()
	if err == nil {
		t.Fatalf("spire-server healthcheck succeeded while the server was stopped")
	}
	s.Start()

	// The restarted server keeps its datastore.
	if out := s.CLI(t, "entry", "show", "-entryID", id); !strings.Contains(out, id) {
		t.Fatalf("entry %s missing after restart:\n%s", id, out)
	}
	s.DeleteEntry(t, id)
	var count struct {
		Count int `json:"count"`
	}
	decodeJSON(t, s.CLI(t, "entry", "count", "-output", "json"), &count)
	if count.Count != 0 {
		t.Fatalf("%d entries left after deleting the only one", count.Count)
	}
}
