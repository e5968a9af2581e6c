package brokerapi

import (
	"context"
	"errors"
	"time"

	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/workloadapi"
	"github.com/spiffe/go-spiffe/v2/exp/proto/spiffe/broker"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// service is the SPIFFE Broker API.
type service struct {
	broker.UnimplementedAPIServer
	e *Endpoint
}

func (s *service) SubscribeToX509SVID(req *broker.SubscribeToX509SVIDRequest, stream broker.API_SubscribeToX509SVIDServer) error {
	ctx := stream.Context()
	ids := s.e.cfg.Identities
	var last *agent.X509Snapshot
	awaited := false
	return s.e.follow(ctx, req.GetReference(), func(w *workload, sub *agent.Subscription) error {
		snap, err := ids.BrokerX509Identities(ctx, w.sels)
		// Only a new request waits for its entry, as a workload's own
		// fetch does; a stream whose entries went is told at once.
		if errors.Is(err, agent.ErrNoIdentity) && last == nil && !awaited {
			awaited = true
			if ids.AwaitIdentity(ctx, w.sels, spiffeid.ID{}) {
				snap, err = ids.BrokerX509Identities(ctx, w.sels)
			}
		}
		switch {
		case errors.Is(err, agent.ErrNoIdentity):
			// The spec: the broker drops what it got for this workload.
			return notEntitled(w, spiffeid.ID{})
		case err != nil && last == nil:
			return workloadapi.StatusOf(err)
		case err != nil:
			s.e.cfg.Log.Warn("Could not update a broker's X509-SVID stream", "workload", w.desc, "error", err)
			return nil
		case last != nil && snap.Same(last):
			return nil
		}
		if err := s.e.send(ctx, func() error { return stream.Send(x509SVIDResponse(snap)) }); err != nil {
			return err
		}
		last = snap
		sub.Watch(snap)
		return nil
	})
}

func x509SVIDResponse(snap *agent.X509Snapshot) *broker.SubscribeToX509SVIDResponse {
	resp := &broker.SubscribeToX509SVIDResponse{Svids: make([]*broker.X509SVID, len(snap.SVIDs))}
	for i, svid := range snap.SVIDs {
		resp.Svids[i] = &broker.X509SVID{
			SpiffeId: svid.ID.String(), X509Svid: svid.ChainDER, X509SvidKey: svid.KeyDER,
			Bundle: snap.Local.X509DER, Hint: snap.Hints[i],
		}
	}
	if len(snap.Federated) > 0 {
		resp.FederatedBundles = bundleMap(nil, snap.Federated, x509DER)
	}
	return resp
}

func (s *service) SubscribeToX509Bundles(req *broker.SubscribeToX509BundlesRequest, stream broker.API_SubscribeToX509BundlesServer) error {
	return s.streamBundles(stream.Context(), req.GetReference(), (*agent.BundleSnapshot).SameX509, func(snap *agent.BundleSnapshot) error {
		return stream.Send(&broker.SubscribeToX509BundlesResponse{Bundles: bundleMap(snap.Local, snap.Federated, x509DER)})
	})
}

func (s *service) SubscribeToJWTBundles(req *broker.SubscribeToJWTBundlesRequest, stream broker.API_SubscribeToJWTBundlesServer) error {
	return s.streamBundles(stream.Context(), req.GetReference(), (*agent.BundleSnapshot).SameJWT, func(snap *agent.BundleSnapshot) error {
		return stream.Send(&broker.SubscribeToJWTBundlesResponse{Bundles: bundleMap(snap.Local, snap.Federated, jwks)})
	})
}

// streamBundles sends every bundle the agent holds, local and federated,
// as spire-agent does, for as long as the referenced workload runs: the
// reference is resolved so that a broker gets nothing for a workload that
// is not there.
func (s *service) streamBundles(ctx context.Context, ref *broker.WorkloadReference, same func(a, b *agent.BundleSnapshot) bool, send func(*agent.BundleSnapshot) error) error {
	var last *agent.BundleSnapshot
	return s.e.follow(ctx, ref, func(w *workload, _ *agent.Subscription) error {
		snap, err := s.e.cfg.Identities.AllBundles(ctx)
		switch {
		case err != nil && last == nil:
			return workloadapi.StatusOf(err)
		case err != nil:
			s.e.cfg.Log.Warn("Could not update a broker's bundle stream", "workload", w.desc, "error", err)
			return nil
		case last != nil && same(last, snap):
			return nil
		}
		if err := s.e.send(ctx, func() error { return send(snap) }); err != nil {
			return err
		}
		last = snap
		return nil
	})
}

func x509DER(b *agent.Bundle) []byte { return b.X509DER }
func jwks(b *agent.Bundle) []byte    { return b.JWKS }

// bundleMap keys each bundle's encoding by its trust domain's ID.
func bundleMap(local *agent.Bundle, federated []*agent.Bundle, encoding func(*agent.Bundle) []byte) map[string][]byte {
	m := make(map[string][]byte, 1+len(federated))
	if local != nil {
		m[local.TrustDomain().IDString()] = encoding(local)
	}
	for _, b := range federated {
		m[b.TrustDomain().IDString()] = encoding(b)
	}
	return m
}

func (s *service) FetchJWTSVID(ctx context.Context, req *broker.FetchJWTSVIDRequest) (*broker.FetchJWTSVIDResponse, error) {
	if err := workloadapi.CheckAudience(req.GetAudience()); err != nil {
		return nil, err
	}
	var id spiffeid.ID
	if req.GetSpiffeId() != "" {
		var err error
		if id, err = spiffeid.FromString(req.GetSpiffeId()); err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "invalid requested SPIFFE ID %q: %v", req.GetSpiffeId(), err)
		}
	}
	w, err := s.e.resolve(ctx, req.GetReference())
	if err != nil {
		return nil, err
	}
	defer w.release()
	ids := s.e.cfg.Identities
	svids, err := ids.JWTSVIDs(ctx, w.sels, req.GetAudience(), id)
	if errors.Is(err, agent.ErrNoIdentity) && ids.AwaitIdentity(ctx, w.sels, id) {
		svids, err = ids.JWTSVIDs(ctx, w.sels, req.GetAudience(), id)
	}
	switch {
	case errors.Is(err, agent.ErrNoIdentity):
		return nil, notEntitled(w, id)
	case err != nil:
		return nil, workloadapi.StatusOf(err)
	}
	resp := &broker.FetchJWTSVIDResponse{Svids: make([]*broker.JWTSVID, len(svids))}
	for i, svid := range svids {
		resp.Svids[i] = &broker.JWTSVID{SpiffeId: svid.ID.String(), Svid: svid.Token, Hint: svid.Hint}
	}
	return resp, nil
}

// How often a stream checks that its workload still runs, so that the
// workload's end ends the stream (the spec's "in a timely manner"): a
// pinned process costs a syscall; a pod, a look at the k8s attestor's
// shared pod list, which is refreshed no faster.
const (
	pidCheckInterval = time.Second
	podCheckInterval = 5 * time.Second
)

// follow resolves ref and runs update now and again on every change of
// the cache, until the broker leaves (nil), the server stops
// (Unavailable), or the workload stops (NotFound).
func (e *Endpoint) follow(ctx context.Context, ref *broker.WorkloadReference, update func(*workload, *agent.Subscription) error) error {
	w, err := e.resolve(ctx, ref)
	if err != nil {
		return err
	}
	defer w.release()
	// Subscribed before the first update, so that no change is missed.
	sub := e.cfg.Identities.Subscribe()
	defer sub.Close()
	interval := e.podCheck
	if w.pid != nil {
		interval = e.pidCheck
	}
	ticker := time.NewTicker(interval)
	defer ticker.Stop()
	for {
		if err := update(w, sub); err != nil {
			return err
		}
		if done, err := e.waitChange(ctx, w, sub, ticker.C); done {
			return err
		}
	}
}

// waitChange waits for a change of the cache; it reports done, with the
// stream's end, when the broker left, the server stops, or the workload
// stopped.
func (e *Endpoint) waitChange(ctx context.Context, w *workload, sub *agent.Subscription, check <-chan time.Time) (done bool, err error) {
	for {
		select {
		case <-sub.C:
			return false, nil
		case <-check:
			if err := e.checkLive(ctx, w); err != nil {
				e.cfg.Log.Debug("Ending a broker's stream: its workload stopped", "workload", w.desc)
				return true, err
			}
		case <-ctx.Done():
			return true, nil
		case <-e.stopping:
			return true, errShuttingDown
		}
	}
}

// send sends one stream message within the send timeout; a broker that
// stops reading has its connection closed.
func (e *Endpoint) send(ctx context.Context, send func() error) error {
	b, err := brokerOf(ctx)
	if err != nil {
		return err
	}
	return workloadapi.SendOrClose(e.cfg.SendTimeout, func() {
		e.cfg.Log.Warn("Disconnecting a broker that stopped reading its stream", "broker", b.id.String(), "timeout", e.cfg.SendTimeout)
		b.conn.Close()
	}, send)
}
