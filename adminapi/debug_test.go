package adminapi

import (
	"context"
	"crypto/x509"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/attestor/selector"
	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/lanyard-dev/lanyard/internal/testkit/attestkit"
	"github.com/lanyard-dev/lanyard/internal/testkit/fakeagent"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	debugv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/agent/debug/v1"
	"google.golang.org/grpc/codes"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
)

var agentID = spiffeid.RequireFromPath(td, "/spire/agent/join_token/abc")

// selfSVID stands for the upstream's SelfIdentity: an agent SVID signed by
// the test upstream's CA, so that it verifies against the cache's bundle.
type selfSVID struct {
	svid     atomic.Pointer[x509svid.SVID]
	lastSync time.Time
}

func (s *selfSVID) GetX509SVID() (*x509svid.SVID, error) {
	if svid := s.svid.Load(); svid != nil {
		return svid, nil
	}
	return nil, errors.New("not attested yet")
}

func (s *selfSVID) LastSync() time.Time { return s.lastSync }

func TestDebugGetInfo(t *testing.T) {
	self := &selfSVID{lastSync: time.Unix(1_700_000_000, 0)}
	started := time.Now().Add(-90 * time.Second)
	var ca *testkit.CA
	env := newTestEnvWith(t, func(c *Config, up *fakeagent.Upstream) {
		c.Self, c.Started, ca = self, started, up.CA()
	}, []spiffeid.ID{delegateID}, attestkit.Entry(delegateID, 1, attestkit.MySelector()))
	client := debugv1.NewDebugClient(testkit.Dial(t, env.socket))
	ctx, cancel := context.WithTimeout(context.Background(), waitLimit)
	defer cancel()

	// Before the agent has an SVID: Unavailable, not Internal.
	_, err := client.GetInfo(ctx, &debugv1.GetInfoRequest{})
	wantCode(t, err, codes.Unavailable, "GetInfo before the agent has an SVID")

	leaf, key := ca.SVID(t, agentID.String(), time.Hour)
	self.svid.Store(&x509svid.SVID{ID: agentID, Certificates: []*x509.Certificate{leaf}, PrivateKey: key})
	// A workload's SVID in the cache, so that the count is not zero.
	if _, err := env.cache.X509Identities(ctx, []selector.Selector{attestkit.MySelector()}); err != nil {
		t.Fatal(err)
	}
	info, err := client.GetInfo(ctx, &debugv1.GetInfoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(info.SvidChain) != 2 {
		t.Fatalf("svid_chain has %d certificates, want the agent SVID and its root", len(info.SvidChain))
	}
	got := info.SvidChain[0]
	if got.Id.GetTrustDomain() != td.Name() || got.Id.GetPath() != agentID.Path() || got.ExpiresAt != leaf.NotAfter.Unix() || got.Subject != leaf.Subject.String() {
		t.Errorf("svid_chain[0] = %v, want the agent SVID %s", got, agentID)
	}
	if root := info.SvidChain[1]; root.ExpiresAt != ca.Cert.NotAfter.Unix() {
		t.Errorf("svid_chain[1] = %v, want the CA", root)
	}
	if info.Uptime < 90 || info.Uptime > 90+int32(waitLimit/time.Second) {
		t.Errorf("uptime = %d s, want about 90", info.Uptime)
	}
	if info.LastSyncSuccess != self.lastSync.Unix() {
		t.Errorf("last_sync_success = %d, want %d", info.LastSyncSuccess, self.lastSync.Unix())
	}
	if h := env.cache.Health(); info.CachedX509SvidsCount != int32(h.X509SVIDs) || h.X509SVIDs == 0 {
		t.Errorf("cached_x509_svids_count = %d, the cache holds %d", info.CachedX509SvidsCount, h.X509SVIDs)
	}

	// A chain that does not verify against the bundle is the agent's fault.
	other := testkit.NewTrustDomainCA(t, td)
	forged, fkey := other.SVID(t, agentID.String(), time.Hour)
	self.svid.Store(&x509svid.SVID{ID: agentID, Certificates: []*x509.Certificate{forged}, PrivateKey: fkey})
	if again, err := client.GetInfo(ctx, &debugv1.GetInfoRequest{}); err != nil || again.SvidChain[0].ExpiresAt != got.ExpiresAt {
		t.Errorf("within %s GetInfo answers from its last answer: %v, %v", debugCacheFor, again, err)
	}
	env.admin.debug.mu.Lock()
	env.admin.debug.now = func() time.Time { return time.Now().Add(debugCacheFor) }
	env.admin.debug.mu.Unlock()
	_, err = client.GetInfo(ctx, &debugv1.GetInfoRequest{})
	wantCode(t, err, codes.Internal, "GetInfo with an agent SVID the bundle does not verify")
}

// Operators explore the admin socket with grpcurl: reflection lists the
// admin services and nothing of the Workload API.
func TestAdminReflection(t *testing.T) {
	env := newTestEnv(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), waitLimit)
	defer cancel()
	stream, err := reflectionpb.NewServerReflectionClient(testkit.Dial(t, env.socket)).ServerReflectionInfo(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{}}); err != nil {
		t.Fatal(err)
	}
	resp, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	for _, s := range resp.GetListServicesResponse().GetService() {
		names[s.Name] = true
	}
	for _, want := range []string{"spire.agent.debug.v1.Debug", "spire.api.agent.delegatedidentity.v1.DelegatedIdentity"} {
		if !names[want] {
			t.Errorf("reflection lists %v, without %s", names, want)
		}
	}
	if names[workload.SpiffeWorkloadAPI_ServiceDesc.ServiceName] {
		t.Errorf("reflection lists the Workload API on the admin socket")
	}
}
