package workloadapi

import (
	"context"
	"errors"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/attestor"
	"github.com/lanyard-dev/lanyard/attestor/selector"
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
	return runStream(h, ctx, streamOf[*agent.BundleSnapshot]{
		what: "a bundle stream",
		fetch: func(ctx context.Context, sels []selector.Selector) (*agent.BundleSnapshot, error) {
			return h.cfg.Identities.Bundles(ctx, sels, h.cfg.AllowUnauthenticatedVerifiers)
		},
		same: same,
		send: send,
	})
}

// streamOf is what sets the Workload API's streams apart.
type streamOf[S any] struct {
	what  string // in the log: "an X509-SVID stream"
	fetch func(ctx context.Context, sels []selector.Selector) (S, error)
	same  func(last, next S) bool // next would send what last did
	send  func(S) error
	sent  func(*agent.Subscription, S) // optional: told what was sent
	// api, when set, records the stream in Config.Streams as that API,
	// with the SVIDs svids says each message sent.
	api   string
	svids func(S) ([]*agent.X509SVID, []string)
	// describe says what a response holds, for the debug log; optional.
	describe func(S) []any
}

// runStream runs a stream: the caller's state first, then again on every
// change, until the client leaves or the server stops.
func runStream[S any](h *handler, ctx context.Context, s streamOf[S]) error {
	sels, caller, err := h.attest(ctx)
	if err != nil {
		return err
	}
	sub := h.cfg.Identities.Subscribe()
	defer sub.Close()
	var tracked uint64
	if s.api != "" {
		tracked = h.cfg.Streams.Add(caller, s.api, "")
		defer h.cfg.Streams.Remove(tracked)
	}
	var last S
	sentOnce, awaited := false, false
	for {
		snap, err := s.fetch(ctx, sels)
		// Only a new caller waits for its entry; a stream whose entries
		// were deleted is told at once.
		if errors.Is(err, agent.ErrNoIdentity) && !sentOnce && !awaited {
			awaited = true
			if h.cfg.Identities.AwaitIdentity(ctx, sels, spiffeid.ID{}) {
				continue
			}
		}
		switch {
		case errors.Is(err, agent.ErrNoIdentity) || (err != nil && !sentOnce):
			return h.denied(ctx, caller, sels, statusOf(err))
		case err != nil:
			// Keep what the client has; the next change tries again.
			h.cfg.Log.Warn("Could not update "+s.what, "error", err)
		case !sentOnce || !s.same(last, snap):
			if err := h.send(caller, func() error { return s.send(snap) }); err != nil {
				return err
			}
			if h.cfg.Log.IsDebug() {
				logSent(h.cfg.Log, caller, s, snap, sentOnce)
			}
			last, sentOnce = snap, true
			if s.sent != nil {
				s.sent(sub, snap)
			}
			if s.api != "" {
				svids, hints := s.svids(snap)
				h.cfg.Streams.Sent(tracked, svids, hints)
			}
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

// logSent logs a response sent on a stream at DEBUG: a workload's first
// SVIDs, and each rotation pushed to it.
func logSent[S any](log hclog.Logger, caller *attestor.Caller, s streamOf[S], snap S, pushed bool) {
	msg := "Sent the first response on " + s.what
	if pushed {
		msg = "Pushed a change on " + s.what
	}
	args := []any{"pid", caller.PID, "uid", caller.UID}
	if s.describe != nil {
		args = append(args, s.describe(snap)...)
	}
	log.Debug(msg, args...)
}

// describeX509 names the SVIDs of a response and when the first expires;
// never their keys.
func describeX509(snap *agent.X509Snapshot) []any {
	ids := make([]string, len(snap.SVIDs))
	var first time.Time
	for i, svid := range snap.SVIDs {
		ids[i] = svid.ID.String()
		if first.IsZero() || svid.NotAfter.Before(first) {
			first = svid.NotAfter
		}
	}
	return []any{"spiffe_ids", ids, "first_expiry", first}
}
