package workloadapi

import (
	"context"

	"github.com/lanyard-dev/lanyard/attestor"
	"github.com/lanyard-dev/lanyard/telemetry"
	"google.golang.org/grpc"
)

// CallerUID is the uid of a call's peer, for the metrics' uid classes.
func CallerUID(ctx context.Context) (uint32, bool) {
	c, ok := attestor.CallerFromContext(ctx)
	if !ok {
		return 0, false
	}
	return c.UID, true
}

// UnaryMetrics is the interceptor that records rpc's unary calls, first in
// a chain so that calls refused by the others count too; none for nil rpc
// (no metrics), so that the call path then pays nothing.
func UnaryMetrics(rpc *telemetry.ServerRPC) []grpc.UnaryServerInterceptor {
	if rpc == nil {
		return nil
	}
	return []grpc.UnaryServerInterceptor{rpc.Unary}
}

// StreamMetrics is UnaryMetrics' counterpart for streams.
func StreamMetrics(rpc *telemetry.ServerRPC) []grpc.StreamServerInterceptor {
	if rpc == nil {
		return nil
	}
	return []grpc.StreamServerInterceptor{rpc.Stream}
}
