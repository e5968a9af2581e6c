// Package workloadapi serves the SPIFFE Workload API over gRPC on a Unix
// socket, with gRPC health and reflection beside it. Every answer comes from
// the agent's cache; the caller is identified by its peer credentials.
package workloadapi

import (
	"context"
	"errors"
	"slices"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/attestor"
	"github.com/lanyard-dev/lanyard/attestor/selector"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
)

// Attestor turns a caller into selectors.
type Attestor interface {
	Attest(ctx context.Context, p attestor.Process) ([]selector.Selector, error)
}

// Identities answers for identities and bundles; *agent.SVIDManager is the
// real one.
type Identities interface {
	X509Identities(ctx context.Context, sels []selector.Selector) (*agent.X509Snapshot, error)
	Bundles(ctx context.Context, sels []selector.Selector, allowUnauthenticated bool) (*agent.BundleSnapshot, error)
	JWTSVIDs(ctx context.Context, sels []selector.Selector, audience []string, id spiffeid.ID) ([]*agent.JWTSVID, error)
	ValidateJWTSVID(ctx context.Context, sels []selector.Selector, token, audience string) (*jwtsvid.SVID, error)
	Subscribe() *agent.Subscription
	// AwaitIdentity holds a caller with no identity (for id, when not zero)
	// while the upstream looks for a just-created entry; it reports whether
	// one now matches.
	AwaitIdentity(ctx context.Context, sels []selector.Selector, id spiffeid.ID) bool
}

// Config configures the Workload API.
type Config struct {
	Log        hclog.Logger
	Attestor   Attestor
	Identities Identities
	// AllowUnauthenticatedVerifiers lets callers with no identity fetch
	// bundles, as spire-agent's allow_unauthenticated_verifiers does.
	AllowUnauthenticatedVerifiers bool
	// SendTimeout bounds one message on a stream: a client that does not
	// read for this long is disconnected rather than waited for.
	// Zero means DefaultSendTimeout.
	SendTimeout time.Duration
	// TrustDomain is the agent's own: claims of tokens from other trust
	// domains are reduced to the standard ones on validation.
	TrustDomain spiffeid.TrustDomain
	// SDS names Envoy's SDS resources; empty names take spire-agent's.
	SDS SDSConfig
	// Streams, when not nil, records the open X509-SVID and SDS streams
	// for `lanyard status`.
	Streams *Streams
}

// Limits on what a client may make the agent hold.
const (
	DefaultSendTimeout = 10 * time.Second
	// maxRecvMsgSize bounds a request. Workload API requests are small; the
	// largest is a JWT-SVID to validate.
	maxRecvMsgSize = 256 << 10
	// handshakeTimeout closes connections that never complete the HTTP/2
	// preface.
	handshakeTimeout = 10 * time.Second
	// maxConnectionIdle closes connections with no call for this long.
	maxConnectionIdle = 5 * time.Minute
	// readBufferSize and writeBufferSize are gRPC's per-connection buffers.
	// Requests are a few hundred bytes (a JWT to validate, ~1 KiB, is the
	// largest) and the read buffer is held for the connection's life: with
	// 1,000 open streams, 8 KiB read buffers were a third of the live heap.
	// Responses are a few KiB.
	readBufferSize  = 4 << 10
	writeBufferSize = 8 << 10
	// streamWorkers run calls on goroutines kept from call to call, whose
	// stacks have already grown to what a call needs; a new goroutine per
	// call spends a tenth of a fetch growing its stack. Streams held open
	// beyond the workers get goroutines of their own.
	streamWorkers = 16
	// maxStreamsPerConn bounds the streams one connection may hold open:
	// each costs a goroutine, a subscription, up to 64 KiB queued to send,
	// its headers (maxHeaderListSize) and what the client sent that the
	// call has not read: up to windowSize, or a request of up to
	// maxRecvMsgSize while it is read. A connection holds at most about
	// 33 MiB (100 × 336 KiB); the cap on connections bounds the rest.
	maxStreamsPerConn = 100
	// maxHeaderListSize bounds the headers of one call (HTTP/2
	// SETTINGS_MAX_HEADER_LIST_SIZE: names and values plus 32 bytes a
	// field), which gRPC keeps for the life of the stream. Real clients
	// send a few hundred bytes: go-spiffe and grpc-go about 400 (the
	// pseudo-headers, content-type, te, user-agent, grpc-timeout and
	// workload.spiffe.io), Envoy's SDS client under 2 KiB with its
	// x-envoy-* and tracing headers (traceparent, x-b3-*, x-request-id).
	// 8 KiB is the default of gRPC's C core and Java servers and grpc-go's
	// coming one, so a client that works with those works here; the
	// unbounded default (16 MiB) let two connections of Health/Watch
	// streams take the agent to 3 GB. A larger header list fails the call
	// (RST_STREAM), and continuing it closes the connection.
	maxHeaderListSize = 8 << 10
	// windowSize is the HTTP/2 flow-control window of a stream and of a
	// connection for what clients send: data sent and not yet read by a
	// call waits in memory. Set, it also turns off gRPC's bandwidth-delay
	// estimation, which grows both windows up to 16 MiB for a client that
	// sends fast; requests are small (a larger one is let in as it is
	// read, up to maxRecvMsgSize), and responses are governed by the
	// client's windows, so fetches are as fast (fetch_bench_test.go).
	// 64 KiB is gRPC's minimum.
	//
	// The HPACK dynamic tables need no limit: gRPC decodes with a fixed
	// 4 KiB table and keeps its encoder's at 4 KiB whatever a client's
	// SETTINGS_HEADER_TABLE_SIZE says, and frames are at most 16 KiB.
	windowSize = 64 << 10
	// maxAudiences and maxAudienceBytes bound a JWT-SVID request, whose
	// tokens are cached per audience.
	maxAudiences     = 32
	maxAudienceBytes = 4096
)

type handler struct {
	workload.UnimplementedSpiffeWorkloadAPIServer
	cfg      Config
	stopping chan struct{} // closed on shutdown
	stopOnce sync.Once
}

// attest identifies the caller (see AttestCaller).
func (h *handler) attest(ctx context.Context) ([]selector.Selector, *attestor.Caller, error) {
	return AttestCaller(ctx, h.cfg.Attestor, h.cfg.Log)
}

// AttestCaller identifies the caller of a call on a connection accepted
// with attestor.Credentials; the admin API attests its callers with it too.
// A caller whose process is gone (it exited, or its PID was reused),
// changed (it executed a setuid program or another binary since it
// connected) or cannot be seen is refused with Unauthenticated, now and on
// every later call of the connection: nothing learned about its PID can be
// trusted. The connection is closed a moment later (refusedConnGrace), so
// that the status reaches the client rather than a broken connection, and
// the client then reconnects with the credentials it has at that connect.
// A check that failed for another reason (the agent out of file
// descriptors) is answered Unavailable and the connection closed the same
// way. An attestor that did not answer within its deadline is answered
// Unavailable too, and the connection kept. Other attestation failures
// leave the caller with no selectors (and a warning in log).
func AttestCaller(ctx context.Context, a Attestor, log hclog.Logger) ([]selector.Selector, *attestor.Caller, error) {
	caller, ok := attestor.CallerFromContext(ctx)
	if !ok {
		return nil, nil, status.Error(codes.Unauthenticated, "could not resolve caller information: the connection carries no peer credentials")
	}
	sels, err := a.Attest(ctx, caller.Process())
	verr := caller.Verify()
	if verr == nil && err != nil && attestor.IsRefusal(err) {
		verr = err
	}
	if verr != nil {
		refuse(log, caller, verr)
		if !attestor.IsRefusal(verr) {
			return nil, nil, status.Errorf(codes.Unavailable, "could not verify the caller, reconnect and retry: %v", verr)
		}
		return nil, nil, status.Errorf(codes.Unauthenticated, "could not verify the caller: %v", verr)
	}
	if err != nil {
		log.Warn("Workload attestation failed", "pid", caller.PID, "error", err)
		if errors.Is(err, attestor.ErrAttestorTimeout) {
			return nil, nil, status.Errorf(codes.Unavailable, "could not attest the caller, retry: %v", err)
		}
		return nil, caller, nil
	}
	return sels, caller, nil
}

func (h *handler) FetchX509SVID(_ *workload.X509SVIDRequest, stream grpc.ServerStreamingServer[workload.X509SVIDResponse]) error {
	return runStream(h, stream.Context(), streamOf[*agent.X509Snapshot]{
		what:  "an X509-SVID stream",
		fetch: h.cfg.Identities.X509Identities,
		same:  (*agent.X509Snapshot).Same,
		send: func(snap *agent.X509Snapshot) error {
			// Streams of the same entries share the snapshot, and so its
			// one encoding.
			return stream.SendMsg(&encodedMessage{data: snap.Encoded(encodeX509Response)})
		},
		sent: (*agent.Subscription).Watch,
		api:  "x509",
		svids: func(snap *agent.X509Snapshot) ([]*agent.X509SVID, []string) {
			return snap.SVIDs, snap.Hints
		},
	})
}

func (h *handler) FetchX509Bundles(_ *workload.X509BundlesRequest, stream grpc.ServerStreamingServer[workload.X509BundlesResponse]) error {
	return h.streamBundles(stream.Context(), (*agent.BundleSnapshot).SameX509, func(snap *agent.BundleSnapshot) error {
		resp := &workload.X509BundlesResponse{Bundles: make(map[string][]byte, 1+len(snap.Federated))}
		resp.Bundles[snap.Local.TrustDomain().IDString()] = snap.Local.X509DER
		for _, b := range snap.Federated {
			resp.Bundles[b.TrustDomain().IDString()] = b.X509DER
		}
		return stream.Send(resp)
	})
}

func (h *handler) FetchJWTBundles(_ *workload.JWTBundlesRequest, stream grpc.ServerStreamingServer[workload.JWTBundlesResponse]) error {
	return h.streamBundles(stream.Context(), (*agent.BundleSnapshot).SameJWT, func(snap *agent.BundleSnapshot) error {
		resp := &workload.JWTBundlesResponse{Bundles: make(map[string][]byte, 1+len(snap.Federated))}
		resp.Bundles[snap.Local.TrustDomain().IDString()] = snap.Local.JWKS
		for _, b := range snap.Federated {
			resp.Bundles[b.TrustDomain().IDString()] = b.JWKS
		}
		return stream.Send(resp)
	})
}

func (h *handler) FetchJWTSVID(ctx context.Context, req *workload.JWTSVIDRequest) (*workload.JWTSVIDResponse, error) {
	if err := CheckAudience(req.Audience); err != nil {
		return nil, err
	}
	var id spiffeid.ID
	if req.SpiffeId != "" {
		var err error
		if id, err = spiffeid.FromString(req.SpiffeId); err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "invalid requested SPIFFE ID %q: %v", req.SpiffeId, err)
		}
	}
	sels, _, err := h.attest(ctx)
	if err != nil {
		return nil, err
	}
	svids, err := h.cfg.Identities.JWTSVIDs(ctx, sels, req.Audience, id)
	if errors.Is(err, agent.ErrNoIdentity) && h.cfg.Identities.AwaitIdentity(ctx, sels, id) {
		svids, err = h.cfg.Identities.JWTSVIDs(ctx, sels, req.Audience, id)
	}
	if err != nil {
		return nil, statusOf(err)
	}
	resp := &workload.JWTSVIDResponse{Svids: make([]*workload.JWTSVID, len(svids))}
	for i, svid := range svids {
		resp.Svids[i] = &workload.JWTSVID{SpiffeId: svid.ID.String(), Svid: svid.Token, Hint: svid.Hint}
	}
	return resp, nil
}

func (h *handler) ValidateJWTSVID(ctx context.Context, req *workload.ValidateJWTSVIDRequest) (*workload.ValidateJWTSVIDResponse, error) {
	if req.Audience == "" {
		return nil, status.Error(codes.InvalidArgument, "audience must be specified")
	}
	if req.Svid == "" {
		return nil, status.Error(codes.InvalidArgument, "svid must be specified")
	}
	sels, _, err := h.attest(ctx)
	if err != nil {
		return nil, err
	}
	svid, err := h.cfg.Identities.ValidateJWTSVID(ctx, sels, req.Svid, req.Audience)
	if err != nil {
		if errors.Is(err, agent.ErrNotReady) {
			return nil, statusOf(err)
		}
		return nil, status.Errorf(codes.InvalidArgument, "invalid JWT-SVID: %v", err)
	}
	claims, err := structpb.NewStruct(h.returnedClaims(svid))
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "the JWT-SVID's claims cannot be represented: %v", err)
	}
	return &workload.ValidateJWTSVIDResponse{SpiffeId: svid.ID.String(), Claims: claims}, nil
}

// standardClaims are what a token from another trust domain keeps: its
// other claims were made by an issuer this agent does not answer for (as in
// spire-agent, which strips them unless allowed).
var standardClaims = []string{"sub", "aud", "exp", "iat", "nbf", "iss", "jti"}

// returnedClaims are the claims ValidateJWTSVID reports: all of them for
// the local trust domain, the standard ones for a federated one; aud is
// always a list, as in spire-agent.
func (h *handler) returnedClaims(svid *jwtsvid.SVID) map[string]any {
	claims := make(map[string]any, len(svid.Claims))
	foreign := h.cfg.TrustDomain != (spiffeid.TrustDomain{}) && svid.ID.TrustDomain() != h.cfg.TrustDomain
	for k, v := range svid.Claims {
		if foreign && !slices.Contains(standardClaims, k) {
			continue
		}
		claims[k] = v
	}
	if aud, ok := claims["aud"].(string); ok {
		claims["aud"] = []any{aud}
	}
	return claims
}
