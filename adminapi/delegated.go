package adminapi

import (
	"context"
	"errors"
	"strings"

	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/attestor"
	"github.com/lanyard-dev/lanyard/attestor/selector"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	delegatedv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/agent/delegatedidentity/v1"
	"github.com/spiffe/spire-api-sdk/proto/spire/api/types"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Bounds on a request, whose selectors are matched and whose audience keys
// the token cache.
const (
	maxSelectors = 64
	maxAudiences = 32
)

// delegated is the Delegated Identity API, as spire-agent serves it.
type delegated struct {
	delegatedv1.UnimplementedDelegatedIdentityServer
	e *Endpoint
}

func (d *delegated) SubscribeToX509SVIDs(req *delegatedv1.SubscribeToX509SVIDsRequest, stream delegatedv1.DelegatedIdentity_SubscribeToX509SVIDsServer) error {
	ctx := stream.Context()
	callerSels, caller, err := d.e.authorize(ctx)
	if err != nil {
		return err
	}
	sels, err := requestSelectors(req.Selectors, req.Pid)
	if err != nil {
		return err
	}
	var last *agent.X509Snapshot
	sentOnce := false
	return d.e.follow(ctx, caller, callerSels, func(sub *agent.Subscription) error {
		snap, err := d.e.cfg.Identities.X509Identities(ctx, sels)
		switch {
		case errors.Is(err, agent.ErrNoIdentity):
			// As spire-agent: workloads with no entry yet get an empty
			// update, and the stream waits for their entries.
			snap = nil
		case err != nil && !sentOnce:
			return statusOf(err)
		case err != nil:
			d.e.cfg.Log.Warn("Could not update a delegated X509-SVID stream", "error", err)
			return nil
		}
		if sentOnce && (snap == last || snap.Same(last)) {
			return nil
		}
		if err := d.e.send(caller, func() error { return stream.Send(x509SVIDsResponse(snap)) }); err != nil {
			return err
		}
		last, sentOnce = snap, true
		if snap != nil {
			sub.Watch(snap)
		}
		return nil
	})
}

func x509SVIDsResponse(snap *agent.X509Snapshot) *delegatedv1.SubscribeToX509SVIDsResponse {
	resp := &delegatedv1.SubscribeToX509SVIDsResponse{X509Svids: []*delegatedv1.X509SVIDWithKey{}}
	if snap == nil {
		return resp
	}
	for i, svid := range snap.SVIDs {
		chain := make([][]byte, len(svid.Chain))
		for j, c := range svid.Chain {
			chain[j] = c.Raw
		}
		resp.X509Svids = append(resp.X509Svids, &delegatedv1.X509SVIDWithKey{
			X509Svid: &types.X509SVID{
				Id:        idProto(svid.ID),
				CertChain: chain,
				ExpiresAt: svid.NotAfter.Unix(),
				Hint:      snap.Hints[i],
			},
			X509SvidKey: svid.KeyDER,
		})
	}
	// Federated is sorted by trust domain, as spire-agent sorts these.
	for _, b := range snap.Federated {
		resp.FederatesWith = append(resp.FederatesWith, b.TrustDomain().IDString())
	}
	return resp
}

func (d *delegated) SubscribeToX509Bundles(_ *delegatedv1.SubscribeToX509BundlesRequest, stream delegatedv1.DelegatedIdentity_SubscribeToX509BundlesServer) error {
	return d.streamBundles(stream.Context(), (*agent.BundleSnapshot).SameX509, func(snap *agent.BundleSnapshot) error {
		return stream.Send(&delegatedv1.SubscribeToX509BundlesResponse{CaCertificates: bundleMap(snap, func(b *agent.Bundle) []byte { return b.X509DER })})
	})
}

func (d *delegated) SubscribeToJWTBundles(_ *delegatedv1.SubscribeToJWTBundlesRequest, stream delegatedv1.DelegatedIdentity_SubscribeToJWTBundlesServer) error {
	return d.streamBundles(stream.Context(), (*agent.BundleSnapshot).SameJWT, func(snap *agent.BundleSnapshot) error {
		return stream.Send(&delegatedv1.SubscribeToJWTBundlesResponse{Bundles: bundleMap(snap, func(b *agent.Bundle) []byte { return b.JWKS })})
	})
}

// bundleMap keys every bundle's encoding by its trust domain's ID.
func bundleMap(snap *agent.BundleSnapshot, encoding func(*agent.Bundle) []byte) map[string][]byte {
	m := make(map[string][]byte, 1+len(snap.Federated))
	m[snap.Local.TrustDomain().IDString()] = encoding(snap.Local)
	for _, b := range snap.Federated {
		m[b.TrustDomain().IDString()] = encoding(b)
	}
	return m
}

// streamBundles sends every bundle the agent holds, local and federated
// (as spire-agent does here: a delegate serves many workloads), first at
// once and then on change.
func (d *delegated) streamBundles(ctx context.Context, same func(a, b *agent.BundleSnapshot) bool, send func(*agent.BundleSnapshot) error) error {
	callerSels, caller, err := d.e.authorize(ctx)
	if err != nil {
		return err
	}
	var last *agent.BundleSnapshot
	return d.e.follow(ctx, caller, callerSels, func(*agent.Subscription) error {
		snap, err := d.e.cfg.Identities.AllBundles(ctx)
		switch {
		case err != nil && last == nil:
			return statusOf(err)
		case err != nil:
			d.e.cfg.Log.Warn("Could not update a delegated bundle stream", "error", err)
			return nil
		case last != nil && same(last, snap):
			return nil
		}
		if err := d.e.send(caller, func() error { return send(snap) }); err != nil {
			return err
		}
		last = snap
		return nil
	})
}

func (d *delegated) FetchJWTSVIDs(ctx context.Context, req *delegatedv1.FetchJWTSVIDsRequest) (*delegatedv1.FetchJWTSVIDsResponse, error) {
	if err := checkAudience(req.Audience); err != nil {
		return nil, err
	}
	if _, _, err := d.e.authorize(ctx); err != nil {
		return nil, err
	}
	sels, err := requestSelectors(req.Selectors, req.Pid)
	if err != nil {
		return nil, err
	}
	svids, err := d.e.cfg.Identities.JWTSVIDs(ctx, sels, req.Audience, spiffeid.ID{})
	if errors.Is(err, agent.ErrNoIdentity) {
		return nil, status.Error(codes.PermissionDenied, "no identity issued: no registration entry matches the selectors")
	}
	if err != nil {
		return nil, statusOf(err)
	}
	resp := &delegatedv1.FetchJWTSVIDsResponse{Svids: make([]*types.JWTSVID, len(svids))}
	for i, svid := range svids {
		resp.Svids[i] = &types.JWTSVID{
			Token:     svid.Token,
			Id:        idProto(svid.ID),
			ExpiresAt: svid.ExpiresAt.Unix(),
			IssuedAt:  svid.IssuedAt.Unix(),
			Hint:      svid.Hint,
		}
	}
	return resp, nil
}

func checkAudience(audience []string) error {
	switch {
	case len(audience) == 0:
		return status.Error(codes.InvalidArgument, "audience must be specified")
	case len(audience) > maxAudiences:
		return status.Errorf(codes.InvalidArgument, "too many audiences: %d, the limit is %d", len(audience), maxAudiences)
	}
	for _, aud := range audience {
		if aud == "" {
			return status.Error(codes.InvalidArgument, "audience must not contain an empty string")
		}
	}
	return nil
}

// requestSelectors are the selectors of the workloads a delegate asks for:
// given as selectors (trusted as attested, as spire-agent trusts them), or
// by PID, never both.
func requestSelectors(sels []*types.Selector, pid int32) ([]selector.Selector, error) {
	switch {
	case (len(sels) == 0) == (pid == 0):
		return nil, status.Error(codes.InvalidArgument, "must provide either selectors or non-zero PID, but not both")
	case pid != 0:
		// TODO(issue 14): attest the PID, pinned by a pidfd.
		return nil, status.Error(codes.Unimplemented, "requests by PID are not served yet: give the workload's selectors")
	case len(sels) > maxSelectors:
		return nil, status.Errorf(codes.InvalidArgument, "too many selectors: %d, the limit is %d", len(sels), maxSelectors)
	}
	out := make([]selector.Selector, 0, len(sels))
	for i, s := range sels {
		if s.GetType() == "" || s.GetValue() == "" || strings.Contains(s.GetType(), ":") {
			return nil, status.Errorf(codes.InvalidArgument, "could not parse provided selectors: selector %d (%q, %q) needs a type without \":\" and a value", i, s.GetType(), s.GetValue())
		}
		out = append(out, selector.Selector{Type: s.GetType(), Value: s.GetValue()})
	}
	return selector.Sort(out), nil
}

func idProto(id spiffeid.ID) *types.SPIFFEID {
	return &types.SPIFFEID{TrustDomain: id.TrustDomain().Name(), Path: id.Path()}
}

// follow runs update now and again on every change of the cache, checking
// before each later update that the caller is still a delegate (its entry
// or authorized_delegates may have changed), until the client leaves or the
// server stops.
func (e *Endpoint) follow(ctx context.Context, caller *attestor.Caller, callerSels []selector.Selector, update func(*agent.Subscription) error) error {
	sub := e.cfg.Identities.Subscribe()
	defer sub.Close()
	for first := true; ; first = false {
		if !first {
			if err := e.checkDelegate(ctx, caller, callerSels); err != nil {
				return err
			}
		}
		if err := update(sub); err != nil {
			return err
		}
		select {
		case <-sub.C:
		case <-ctx.Done():
			return nil
		case <-e.stopping:
			return errShuttingDown
		}
	}
}
