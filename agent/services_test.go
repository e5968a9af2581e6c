package agent

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// refusedUpstream's Run fails at once, as a node whose attestation the
// server refused.
type refusedUpstream struct {
	*testUpstream
	runs chan struct{}
}

func (u refusedUpstream) Run(context.Context, Sink) error {
	u.runs <- struct{}{}
	return fmt.Errorf("node attestation with k8s_psat failed: PermissionDenied (%w)", ErrNodeAttestationRefused)
}

// TestRefusedAttestationEndsAnAgentWithNothingToServe: a refused node
// attestation ends an agent that has nothing cached, with the reason; one
// with cached entries keeps serving them and retries.
func TestRefusedAttestationEndsAnAgentWithNothingToServe(t *testing.T) {
	newAgent := func() (*Agent, refusedUpstream) {
		up := refusedUpstream{testUpstream: newTestUpstream(t), runs: make(chan struct{}, 10)}
		return &Agent{log: hclog.NewNullLogger(), svids: NewSVIDManager(hclog.NewNullLogger(), up), upstream: up, upstreamName: "spire"}, up
	}

	a, _ := newAgent()
	err := a.runUpstream(context.Background())
	if !errors.Is(err, ErrNodeAttestationRefused) {
		t.Fatalf("runUpstream with nothing cached = %v, want the refusal", err)
	}

	a, up := newAgent()
	td := spiffeid.RequireTrustDomainFromString("example.org")
	// As a saved cache loads them: the agent is ready and serves.
	a.svids.SetEntries([]*Entry{{ID: "web", SPIFFEID: spiffeid.RequireFromPath(td, "/web")}})
	a.svids.SetBundles(up.bundle(), nil)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.runUpstream(ctx) }()
	<-up.runs
	select {
	case err := <-done:
		t.Fatalf("runUpstream with cached entries ended: %v", err)
	case <-up.runs: // retried after its backoff
	case <-time.After(10 * time.Second):
		t.Fatal("runUpstream with cached entries neither ended nor retried")
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("runUpstream after ctx ended = %v, want nil", err)
	}
}
