package workloadapi

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/attestor"
	"github.com/lanyard-dev/lanyard/attestor/selector"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// slowAttestor holds every attestation until released, ignoring ctx, as a
// plugin stuck on a hung kubelet or container engine would.
type slowAttestor struct {
	attestor.WorkloadAttestor
	release chan struct{}
}

func (s slowAttestor) Attest(ctx context.Context, p attestor.Process) ([]selector.Selector, error) {
	<-s.release
	return s.WorkloadAttestor.Attest(ctx, p)
}

// TestSlowAttestorIsUnavailable: an attestor that does not answer within
// its deadline is answered Unavailable at the deadline, logged with its
// name, and the connection stays usable once the attestor recovers.
func TestSlowAttestorIsUnavailable(t *testing.T) {
	release := make(chan struct{})
	const timeout = 200 * time.Millisecond
	e := newTestEnv(t, envOptions{
		entries:         []*agent.Entry{newEntry("/a", 1, mySelector())},
		attestor:        func(wa attestor.WorkloadAttestor) attestor.WorkloadAttestor { return slowAttestor{wa, release} },
		attestorTimeout: timeout,
	})
	c := e.client(t)
	start := time.Now()
	_, err := c.FetchJWTSVID(callCtx(t), &workload.JWTSVIDRequest{Audience: []string{"x"}})
	took := time.Since(start)
	if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "deadline") {
		t.Fatalf("FetchJWTSVID with a stuck attestor = %v, want Unavailable about the deadline", err)
	}
	if took < timeout || took > timeout+5*time.Second {
		t.Errorf("answered after %v, want about %v", took, timeout)
	}
	if logs := e.logs.String(); !strings.Contains(logs, "did not answer within its deadline") || !strings.Contains(logs, "attestor=unix") {
		t.Errorf("the deadline was not logged with the attestor's name:\n%s", logs)
	}
	close(release)
	if _, err := c.FetchJWTSVID(callCtx(t), &workload.JWTSVIDRequest{Audience: []string{"x"}}); err != nil {
		t.Fatalf("FetchJWTSVID once the attestor answers: %v", err)
	}
}
