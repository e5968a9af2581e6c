package workloadapi

import (
	"context"
	"errors"

	"github.com/lanyard-dev/lanyard/agent"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

func encodeX509Response(snap *agent.X509Snapshot) []byte { return encode(x509Response(snap)) }

func x509Response(snap *agent.X509Snapshot) *workload.X509SVIDResponse {
	resp := &workload.X509SVIDResponse{Svids: make([]*workload.X509SVID, len(snap.SVIDs))}
	for i, svid := range snap.SVIDs {
		resp.Svids[i] = &workload.X509SVID{
			SpiffeId:    svid.ID.String(),
			X509Svid:    svid.ChainDER,
			X509SvidKey: svid.KeyDER,
			Bundle:      snap.Local.X509DER,
			Hint:        snap.Hints[i],
		}
	}
	if len(snap.Federated) > 0 {
		resp.FederatedBundles = make(map[string][]byte, len(snap.Federated))
		for _, b := range snap.Federated {
			resp.FederatedBundles[b.TrustDomain().IDString()] = b.X509DER
		}
	}
	return resp
}

// streamBundles runs a bundle stream: the full set first, then on change.
func (h *handler) streamBundles(ctx context.Context, same func(a, b *agent.BundleSnapshot) bool, send func(*agent.BundleSnapshot) error) error {
	sels, caller, err := h.attest(ctx)
	if err != nil {
		return err
	}
	sub := h.cfg.Cache.Subscribe()
	defer sub.Close()
	var last *agent.BundleSnapshot
	awaited := false
	for {
		snap, err := h.cfg.Cache.Bundles(ctx, sels, h.cfg.AllowUnauthenticatedVerifiers)
		if errors.Is(err, agent.ErrNoIdentity) && last == nil && !awaited {
			awaited = true
			if h.cfg.Cache.AwaitIdentity(ctx, sels, spiffeid.ID{}) {
				continue
			}
		}
		switch {
		case errors.Is(err, agent.ErrNoIdentity) || (err != nil && last == nil):
			return statusOf(err)
		case err != nil:
			h.cfg.Log.Warn("Could not update a bundle stream", "error", err)
		case last == nil || !same(snap, last):
			if err := h.send(caller, func() error { return send(snap) }); err != nil {
				return err
			}
			last = snap
		}
		select {
		case <-sub.C:
		case <-ctx.Done():
			return nil
		case <-h.stopping:
			return errShuttingDown
		}
	}
}
