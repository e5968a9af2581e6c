package adminapi

import (
	"context"
	"math"
	"sync"
	"time"

	"github.com/lanyard-dev/lanyard/agent"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	debugv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/agent/debug/v1"
	"github.com/spiffe/spire-api-sdk/proto/spire/api/types"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// debugCacheFor is how long a GetInfo answer is reused, as spire-agent
// does: operators poll it, and each answer verifies the agent's chain.
const debugCacheFor = 5 * time.Second

// debug serves spire-agent's Debug API (spire.agent.debug.v1), which
// operators call with grpcurl: the agent's SVID chain, uptime, cache sizes
// and last good sync. Like spire-agent's, it needs no authorization beyond
// reaching the admin socket.
type debug struct {
	debugv1.UnimplementedDebugServer
	e   *Endpoint
	now func() time.Time

	mu       sync.Mutex
	answer   *debugv1.GetInfoResponse
	answered time.Time
}

func (d *debug) GetInfo(ctx context.Context, _ *debugv1.GetInfoRequest) (*debugv1.GetInfoResponse, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	now := d.now()
	if d.answer != nil && now.Sub(d.answered) < debugCacheFor {
		return d.answer, nil
	}
	chain, err := d.agentChain(ctx)
	if err != nil {
		return nil, err
	}
	h := d.e.cfg.Identities.Health()
	resp := &debugv1.GetInfoResponse{
		SvidChain:            chain,
		Uptime:               clampInt32(int64(now.Sub(d.e.cfg.Started).Seconds())),
		CachedX509SvidsCount: clampInt32(int64(h.X509SVIDs)),
		CachedJwtSvidsCount:  clampInt32(int64(h.JWTSVIDs)),
	}
	//lint:ignore SA1019 spire-agent still fills it, for clients older than its replacement
	resp.SvidsCount = resp.CachedX509SvidsCount
	if d.e.cfg.Self != nil {
		if last := d.e.cfg.Self.LastSync(); !last.IsZero() {
			resp.LastSyncSuccess = last.Unix()
		}
	}
	d.answer, d.answered = resp, now
	return resp, nil
}

// agentChain is the agent's SVID chain up to its root in the local bundle,
// as spire-agent reports it.
func (d *debug) agentChain(ctx context.Context) ([]*debugv1.GetInfoResponse_Cert, error) {
	self := d.e.cfg.Self
	if self == nil {
		return nil, nil
	}
	svid, err := self.GetX509SVID()
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "the agent has no SVID of its own yet: %v", err)
	}
	bundles, err := d.e.cfg.Identities.AllBundles(ctx)
	if err != nil {
		return nil, statusOf(err)
	}
	if bundles.Local == nil {
		return nil, statusOf(agent.ErrNotReady)
	}
	roots := x509bundle.FromX509Authorities(bundles.Local.TrustDomain(), bundles.Local.X509Authorities())
	_, chains, err := x509svid.Verify(svid.Certificates, roots)
	if err != nil {
		d.e.cfg.Log.Error("The agent's own SVID does not verify against the local bundle", "error", err)
		return nil, status.Errorf(codes.Internal, "the agent's SVID does not verify against its trust bundle: %v", err)
	}
	out := make([]*debugv1.GetInfoResponse_Cert, 0, len(chains[0]))
	for _, c := range chains[0] {
		cert := &debugv1.GetInfoResponse_Cert{ExpiresAt: c.NotAfter.Unix(), Subject: c.Subject.String()}
		if id, err := x509svid.IDFromCert(c); err == nil {
			cert.Id = &types.SPIFFEID{TrustDomain: id.TrustDomain().Name(), Path: id.Path()}
		}
		out = append(out, cert)
	}
	return out, nil
}

func clampInt32(n int64) int32 {
	return int32(max(math.MinInt32, min(n, math.MaxInt32)))
}
