package workloadapi

import (
	"testing"

	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/internal/testkit"
	adminv1 "github.com/lanyard-dev/lanyard/proto/lanyard/admin/v1"
	debugv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/agent/debug/v1"
	delegatedv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/agent/delegatedidentity/v1"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// The Workload API socket, which any local user reaches, serves nothing of
// the admin API: a delegate's call there is Unimplemented, even for a
// caller with an identity.
func TestWorkloadSocketServesNoAdminAPI(t *testing.T) {
	e := newTestEnv(t, envOptions{entries: []*agent.Entry{newEntry("/delegate", 1, mySelector())}})
	c := delegatedv1.NewDelegatedIdentityClient(testkit.Dial(t, e.socket))
	_, err := c.FetchJWTSVIDs(callCtx(t), &delegatedv1.FetchJWTSVIDsRequest{Audience: []string{"a"}, Pid: 1})
	if status.Code(err) != codes.Unimplemented {
		t.Fatalf("FetchJWTSVIDs on the Workload API socket: %v, want Unimplemented", err)
	}
	s, err := c.SubscribeToX509Bundles(callCtx(t), &delegatedv1.SubscribeToX509BundlesRequest{})
	if err == nil {
		_, err = s.Recv()
	}
	if status.Code(err) != codes.Unimplemented {
		t.Fatalf("SubscribeToX509Bundles on the Workload API socket: %v, want Unimplemented", err)
	}
	conn := testkit.Dial(t, e.socket)
	if _, err := debugv1.NewDebugClient(conn).GetInfo(callCtx(t), &debugv1.GetInfoRequest{}); status.Code(err) != codes.Unimplemented {
		t.Fatalf("Debug GetInfo on the Workload API socket: %v, want Unimplemented", err)
	}
	if _, err := adminv1.NewStatusClient(conn).GetStatus(callCtx(t), &adminv1.GetStatusRequest{}); status.Code(err) != codes.Unimplemented {
		t.Fatalf("Status GetStatus on the Workload API socket: %v, want Unimplemented", err)
	}
}
