package workloadapi

import (
	"context"
	"errors"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/attestor"
	"github.com/lanyard-dev/lanyard/attestor/selector"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// AttestPID attests the process pid that a delegate (admin API) or a
// broker (Broker API) names, pinned by a pidfd so that a PID reused
// meanwhile is refused rather than attested (spire-agent leaves that guard
// to its callers). The returned Caller stays pinned: Verify it to learn
// that the process exited, and Release it when done. A process gone (or
// never there) is NotFound, as the SPIFFE Broker API answers for a PID
// reference.
func AttestPID(ctx context.Context, a Attestor, log hclog.Logger, pid int32) ([]selector.Selector, *attestor.Caller, error) {
	c, err := attestor.TrackPID(pid)
	if err != nil {
		return nil, nil, PIDStatus(log, pid, err)
	}
	sels, err := a.Attest(ctx, c.Process())
	if verr := c.Verify(); verr != nil {
		err = verr
	}
	if err != nil {
		c.Release()
		if errors.Is(err, attestor.ErrAttestorTimeout) {
			return nil, nil, status.Errorf(codes.Unavailable, "could not attest pid %d, retry: %v", pid, err)
		}
		return nil, nil, PIDStatus(log, pid, err)
	}
	return sels, c, nil
}

// PIDStatus is the status of a process named by PID that could not be
// attested or verified: one gone (or never there) or changed is NotFound.
// The attestor's words are about a caller, not about a process named by
// another, so the detail goes to the debug log.
func PIDStatus(log hclog.Logger, pid int32, err error) error {
	log.Debug("A process named by PID could not be attested", "pid", pid, "error", err)
	switch {
	case errors.Is(err, attestor.ErrCallerChanged):
		return status.Errorf(codes.NotFound, "pid %d changed while it was attested (it executed another program, or its PID was reused)", pid)
	case attestor.IsRefusal(err):
		return status.Errorf(codes.NotFound, "pid %d is not running: it exited (or never existed), or its PID was reused", pid)
	}
	return status.Errorf(codes.Unavailable, "could not attest pid %d: %v", pid, err)
}

// CheckAudience checks a JWT-SVID request's audience as the Workload API
// does: at least one, none empty, and bounded in count and bytes.
func CheckAudience(audience []string) error {
	if len(audience) == 0 {
		return status.Error(codes.InvalidArgument, "audience must be specified")
	}
	if len(audience) > maxAudiences {
		return status.Errorf(codes.InvalidArgument, "too many audiences: %d, the limit is %d", len(audience), maxAudiences)
	}
	// An audience may hold any character, control ones included, as in
	// spire-agent and SPIRE Server, which refuse only an empty list: RFC
	// 7519 makes aud a StringOrURI, any JSON string, and a caller only
	// chooses whom its own token is for. What an audience cannot do is
	// reach a token signed for another list: the cache keys lists
	// unambiguously and checks each token's aud claim (agent.SVIDManager.JWTSVIDs).
	total := 0
	for _, aud := range audience {
		if aud == "" {
			return status.Error(codes.InvalidArgument, "audience must not contain an empty string")
		}
		total += len(aud)
	}
	if total > maxAudienceBytes {
		return status.Errorf(codes.InvalidArgument, "audiences are %d bytes long together, the limit is %d", total, maxAudienceBytes)
	}
	return nil
}

// StatusOf is the status the Workload API answers for a cache error (see
// statusOf), for the other APIs that serve the same cache.
func StatusOf(err error) error { return statusOf(err) }
