package workloadapi

import (
	"context"
	"errors"

	"github.com/lanyard-dev/lanyard/agent"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// statusOf turns a cache error into the status the spec asks for, with a
// message that says what went wrong and what the caller can do. Only a
// missing identity is PermissionDenied; everything else may pass and is
// Unavailable, which clients retry (go-spiffe ends a watch on Canceled or
// InvalidArgument, so a passing failure must not be either).
func statusOf(err error) error {
	upstream, fromUpstream := status.FromError(err)
	switch {
	case errors.Is(err, agent.ErrNoIdentity):
		return status.Error(codes.PermissionDenied, "no identity issued: no registration entry matches this workload's selectors; register one for it")
	case errors.Is(err, agent.ErrNotReady):
		return status.Error(codes.Unavailable, agent.ErrNotReady.Error()+": it is starting or cannot reach its upstream; retry shortly (lanyard healthcheck says when it is ready)")
	case errors.Is(err, context.Canceled):
		return status.Error(codes.Unavailable, "the call ended before its SVIDs were signed: the caller went away or the agent is stopping; retry")
	case errors.Is(err, context.DeadlineExceeded), fromUpstream && upstream.Code() == codes.DeadlineExceeded:
		return status.Errorf(codes.Unavailable, "the upstream did not sign in time (%v); retry, and if it persists see the agent's log for the upstream's health", err)
	case fromUpstream && (upstream.Code() == codes.Unavailable || upstream.Code() == codes.ResourceExhausted):
		return status.Errorf(codes.Unavailable, "the upstream cannot be reached to sign (%v); the agent keeps trying: retry", err)
	case fromUpstream:
		return status.Errorf(codes.Unavailable, "the upstream refused to sign (%v); check this workload's registration entry and the upstream's log", err)
	default:
		return status.Errorf(codes.Unavailable, "could not sign an SVID (%v); retry, and if it persists see the agent's log", err)
	}
}
