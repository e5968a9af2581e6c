package adminapi

import (
	"context"
	"errors"
	"strconv"
	"strings"
	"time"

	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/attestor"
	"github.com/lanyard-dev/lanyard/attestor/selector"
	"github.com/lanyard-dev/lanyard/workloadapi"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	delegatedv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/agent/delegatedidentity/v1"
	"github.com/spiffe/spire-api-sdk/proto/spire/api/types"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Bounds on a request's selectors, which a stream keeps and matches on
// every change: in count, and in bytes (real selectors are under 300:
// a docker label, a k8s image digest).
const (
	maxSelectors      = 64
	maxSelectorType   = 64
	maxSelectorValue  = 1024
	maxSelectorsBytes = 8 << 10
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
	w, err := d.e.requestWorkload(ctx, caller, req.Selectors, req.Pid)
	if err != nil {
		return err
	}
	defer w.release()
	// `lanyard status` lists the stream under the delegate, for the workload.
	tracked := d.e.cfg.Status.Streams.Add(caller, "delegated", w.describe())
	defer d.e.cfg.Status.Streams.Remove(tracked)
	var last *agent.X509Snapshot
	sentOnce := false
	return d.e.follow(ctx, caller, callerSels, w.pid, func(sub *agent.Subscription) error {
		snap, err := d.e.cfg.Identities.DelegatedX509Identities(ctx, w.sels)
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
		if snap == nil {
			d.e.cfg.Status.Streams.Sent(tracked, nil, nil)
			return nil
		}
		sub.Watch(snap)
		d.e.cfg.Status.Streams.Sent(tracked, snap.SVIDs, snap.Hints)
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
	return d.e.follow(ctx, caller, callerSels, nil, func(*agent.Subscription) error {
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
	if err := workloadapi.CheckAudience(req.Audience); err != nil {
		return nil, err
	}
	_, caller, err := d.e.authorize(ctx)
	if err != nil {
		return nil, err
	}
	w, err := d.e.requestWorkload(ctx, caller, req.Selectors, req.Pid)
	if err != nil {
		return nil, err
	}
	defer w.release()
	svids, err := d.e.cfg.Identities.DelegatedJWTSVIDs(ctx, w.sels, req.Audience)
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

// target is what a delegate asks for: the selectors of the workloads it
// serves (trusted as attested, as spire-agent trusts them), or a process
// by PID, attested here and pinned for the life of the request.
type target struct {
	sels []selector.Selector
	pid  *attestor.Caller // nil for selectors
}

// describe names the workload for `lanyard status`: its PID, or its
// selectors (cut short: a request may carry 8 KiB of them).
func (w target) describe() string {
	if w.pid != nil {
		return "pid " + strconv.Itoa(int(w.pid.PID))
	}
	var b strings.Builder
	for i, s := range w.sels {
		if i > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(s.String())
		if b.Len() > 200 {
			return strings.ToValidUTF8(b.String()[:200], "") + "…"
		}
	}
	return b.String()
}

// release stops tracking the process of a request by PID.
func (w target) release() {
	if w.pid != nil {
		w.pid.Release()
	}
}

// requestWorkload checks a request's selectors or PID, never both, and
// attests a PID.
func (e *Endpoint) requestWorkload(ctx context.Context, caller *attestor.Caller, sels []*types.Selector, pid int32) (target, error) {
	switch {
	case (len(sels) == 0) == (pid == 0):
		return target{}, status.Error(codes.InvalidArgument, "must provide either selectors or non-zero PID, but not both")
	case pid < 0:
		return target{}, status.Errorf(codes.InvalidArgument, "pid %d is negative", pid)
	case pid != 0:
		if err := samePIDNamespace(caller); err != nil {
			return target{}, err
		}
		return e.attestPID(ctx, pid)
	case len(sels) > maxSelectors:
		return target{}, status.Errorf(codes.InvalidArgument, "too many selectors: %d, the limit is %d", len(sels), maxSelectors)
	}
	out := make([]selector.Selector, 0, len(sels))
	total := 0
	for i, s := range sels {
		typ, value := s.GetType(), s.GetValue()
		total += len(typ) + len(value)
		switch {
		case len(typ) > maxSelectorType || len(value) > maxSelectorValue:
			return target{}, status.Errorf(codes.InvalidArgument, "selector %d is too long: types are limited to %d bytes and values to %d", i, maxSelectorType, maxSelectorValue)
		case total > maxSelectorsBytes:
			return target{}, status.Errorf(codes.InvalidArgument, "the selectors are too long: %d bytes at most in all", maxSelectorsBytes)
		case typ == "" || value == "" || strings.Contains(typ, ":"):
			return target{}, status.Errorf(codes.InvalidArgument, "could not parse provided selectors: selector %d (%q, %q) needs a type without \":\" and a value", i, typ, value)
		}
		// Copies: the request's buffer is not kept for the stream's life.
		out = append(out, selector.Selector{Type: strings.Clone(typ), Value: strings.Clone(value)})
	}
	return target{sels: selector.Sort(out)}, nil
}

// samePIDNamespace refuses a PID from a delegate in a PID namespace below
// the agent's (a pod without hostPID): its PID numbers another process
// here, whose identity it would get. spire-agent does not check.
func samePIDNamespace(caller *attestor.Caller) error {
	depth, err := caller.PIDNamespaceDepth()
	switch {
	case attestor.IsRefusal(err):
		return status.Errorf(codes.Unauthenticated, "the calling process exited or changed while its PID namespace was read: %v", err)
	case err != nil:
		return status.Errorf(codes.Unavailable, "could not read the caller's PID namespaces, retry: %v", err)
	}
	if depth > 0 {
		return status.Error(codes.FailedPrecondition, "the caller runs in a PID namespace of its own, and PIDs are read in the agent's: run the delegate in the host's PID namespace (hostPID), or name the workload by selectors")
	}
	return nil
}

// attestPID attests the process pid with the workload attestors, pinned
// for the life of the request (workloadapi.AttestPID).
func (e *Endpoint) attestPID(ctx context.Context, pid int32) (target, error) {
	sels, c, err := workloadapi.AttestPID(ctx, e.cfg.Attestor, e.cfg.Log, pid)
	if err != nil {
		return target{}, err
	}
	return target{sels: sels, pid: c}, nil
}

func idProto(id spiffeid.ID) *types.SPIFFEID {
	return &types.SPIFFEID{TrustDomain: id.TrustDomain().Name(), Path: id.Path()}
}

// pidCheckInterval is how often a stream for a PID checks that the process
// is still there, so that its end ends the stream.
const pidCheckInterval = time.Second

// follow runs update now and again on every change of the cache, checking
// before each later update that the caller is still a delegate (its entry
// or authorized_delegates may have changed), until the client leaves or the
// server stops. A stream for a process (pid not nil) ends with NotFound
// when the process exits.
func (e *Endpoint) follow(ctx context.Context, caller *attestor.Caller, callerSels []selector.Selector, pid *attestor.Caller, update func(*agent.Subscription) error) error {
	sub := e.cfg.Identities.Subscribe()
	defer sub.Close()
	var pidCheck <-chan time.Time
	if pid != nil {
		ticker := time.NewTicker(pidCheckInterval)
		defer ticker.Stop()
		pidCheck = ticker.C
	}
	for first := true; ; first = false {
		if !first {
			if err := e.checkDelegate(ctx, caller, callerSels); err != nil {
				return err
			}
		}
		if err := update(sub); err != nil {
			return err
		}
		if done, err := e.waitChange(ctx, sub, pid, pidCheck); done {
			return err
		}
	}
}

// waitChange waits for a change of the cache; it reports done (with the
// stream's end) when the client left, the server stops, or the process of
// the request exited.
func (e *Endpoint) waitChange(ctx context.Context, sub *agent.Subscription, pid *attestor.Caller, pidCheck <-chan time.Time) (done bool, err error) {
	for {
		select {
		case <-sub.C:
			return false, nil
		case <-pidCheck:
			if err := pid.Verify(); err != nil {
				return true, workloadapi.PIDStatus(e.cfg.Log, pid.PID, err)
			}
		case <-ctx.Done():
			return true, nil
		case <-e.stopping:
			return true, errShuttingDown
		}
	}
}
