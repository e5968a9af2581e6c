package adminapi

import (
	"context"

	adminv1 "github.com/lanyard-dev/lanyard/proto/lanyard/admin/v1"
	"github.com/lanyard-dev/lanyard/workloadapi"
)

// StatusInfo is what `lanyard status` shows of the agent beyond its cache.
type StatusInfo struct {
	Version string
	// Upstream names the upstream and the server in use ("" for local).
	Upstream func() (name, server string)
	// Streams records the Workload API's open streams; nil lists none.
	Streams *workloadapi.Streams
}

// status serves Lanyard's own Status API: who the agent is, where it gets
// SVIDs, and which workloads hold which identities until when. It answers
// any caller that reaches the admin socket, as the Debug API does: only
// the agent's user and group can, and nothing in it is secret.
type statusService struct {
	adminv1.UnimplementedStatusServer
	e *Endpoint
}

func (s *statusService) GetStatus(ctx context.Context, _ *adminv1.GetStatusRequest) (*adminv1.GetStatusResponse, error) {
	cfg := &s.e.cfg
	h := cfg.Identities.Health()
	a := &adminv1.Agent{
		Version:         cfg.Status.Version,
		TrustDomain:     cfg.TrustDomain.Name(),
		StartedAt:       cfg.Started.Unix(),
		Ready:           h.Ready,
		Degraded:        h.Reason(),
		Entries:         clampInt32(int64(h.Entries)),
		CachedX509Svids: clampInt32(int64(h.X509SVIDs)),
		CachedJwtSvids:  clampInt32(int64(h.JWTSVIDs)),
	}
	if !h.FirstExpiry.IsZero() {
		a.FirstExpiry = h.FirstExpiry.Unix()
	}
	if cfg.Status.Upstream != nil {
		a.Upstream, a.Server = cfg.Status.Upstream()
	}
	if cfg.Self != nil {
		if svid, err := cfg.Self.GetX509SVID(); err == nil && len(svid.Certificates) > 0 {
			a.SpiffeId, a.SvidExpiresAt = svid.ID.String(), svid.Certificates[0].NotAfter.Unix()
		}
		if last := cfg.Self.LastSync(); !last.IsZero() {
			a.LastSync = last.Unix()
		}
	}
	resp := &adminv1.GetStatusResponse{Agent: a}
	if cfg.Status.Streams == nil {
		return resp, nil
	}
	for _, o := range cfg.Status.Streams.List() {
		w := &adminv1.Workload{Pid: o.PID, Uid: o.UID, Gid: o.GID, Api: o.API, ConnectedAt: o.Since.Unix(), OnBehalfOf: o.For}
		for i, svid := range o.SVIDs {
			id := &adminv1.Identity{SpiffeId: svid.ID.String(), ExpiresAt: svid.NotAfter.Unix()}
			if i < len(o.Hints) {
				id.Hint = o.Hints[i]
			}
			w.Identities = append(w.Identities, id)
		}
		resp.Workloads = append(resp.Workloads, w)
	}
	return resp, nil
}
