package adminapi

import (
	"context"
	"os"
	"testing"

	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/lanyard-dev/lanyard/internal/testkit/attestkit"
	"github.com/lanyard-dev/lanyard/internal/testkit/fakeagent"
	adminv1 "github.com/lanyard-dev/lanyard/proto/lanyard/admin/v1"
	"github.com/lanyard-dev/lanyard/workloadapi"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	delegatedv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/agent/delegatedidentity/v1"
)

// `lanyard status` lists a delegate's stream under the delegate, with the
// workload it serves and the identities it was sent; the row goes when
// the stream ends.
func TestStatusListsDelegatedStreams(t *testing.T) {
	streams := workloadapi.NewStreams()
	env := newTestEnvWith(t, func(c *Config, _ *fakeagent.Upstream) { c.Status.Streams = streams }, []spiffeid.ID{delegateID},
		attestkit.Entry(delegateID, 1, attestkit.MySelector()), attestkit.Entry(workloadID, 2, podSelector))
	ctx, cancel := context.WithCancel(testkit.Context(t, waitLimit))
	stream, err := env.client(t).SubscribeToX509SVIDs(ctx, &delegatedv1.SubscribeToX509SVIDsRequest{Selectors: podSelectors()})
	if err != nil {
		t.Fatal(err)
	}
	recvX509(t, stream)
	status := adminv1.NewStatusClient(testkit.Dial(t, env.socket))
	get := func() *adminv1.GetStatusResponse {
		t.Helper()
		resp, err := status.GetStatus(testkit.Context(t, waitLimit), &adminv1.GetStatusRequest{})
		if err != nil {
			t.Fatal(err)
		}
		return resp
	}
	var got *adminv1.GetStatusResponse
	testkit.WaitFor(t, waitLimit, "the delegated stream in the status", func() bool {
		got = get()
		return len(got.Workloads) == 1 && len(got.Workloads[0].Identities) == 1
	})
	w := got.Workloads[0]
	if w.Api != "delegated" || w.OnBehalfOf != podSelector.String() || w.Pid != int32(os.Getpid()) || w.Identities[0].SpiffeId != workloadID.String() {
		t.Errorf("the delegated stream is listed as %v; want the delegate (this process) holding %s for %s", w, workloadID, podSelector)
	}
	cancel()
	testkit.WaitFor(t, waitLimit, "the delegated stream to leave the status", func() bool { return len(get().Workloads) == 0 })
}
