package telemetry

import (
	"context"

	"google.golang.org/grpc"
	"google.golang.org/grpc/stats"
	"google.golang.org/grpc/status"
)

// What the SPIRE Server upstream records: its calls and connections
// through one dial option, and its failovers through FailedOver.

// UpstreamDialOption is the dial option that records every call to the
// SPIRE Server by method and code with its latency, and the connections
// open to each server address; it does nothing on nil Metrics.
func (m *Metrics) UpstreamDialOption() grpc.DialOption {
	if m == nil {
		return grpc.EmptyDialOption{}
	}
	return grpc.WithStatsHandler((*upstreamStats)(m))
}

// FailedOver records a move to another SPIRE Server address after a
// failure (refused, a broken stream, Unavailable).
func (m *Metrics) FailedOver() {
	if m != nil {
		m.upstreamFailovers.Inc()
	}
}

// upstreamStats is a gRPC client stats handler. The upstream's calls are
// few (a sync every few seconds), so it may allocate.
type upstreamStats Metrics

type methodKey struct{}

func (u *upstreamStats) TagRPC(ctx context.Context, info *stats.RPCTagInfo) context.Context {
	return context.WithValue(ctx, methodKey{}, info.FullMethodName)
}

func (u *upstreamStats) HandleRPC(ctx context.Context, s stats.RPCStats) {
	end, ok := s.(*stats.End)
	if !ok {
		return
	}
	full, _ := ctx.Value(methodKey{}).(string)
	service, method := splitMethod(full)
	u.upstreamDuration.WithLabelValues(service, method).Observe(end.EndTime.Sub(end.BeginTime).Seconds())
	u.upstreamHandled.WithLabelValues(service, method, status.Code(end.Error).String()).Inc()
}

type connAddrKey struct{}

func (u *upstreamStats) TagConn(ctx context.Context, info *stats.ConnTagInfo) context.Context {
	if info.RemoteAddr == nil {
		return ctx
	}
	return context.WithValue(ctx, connAddrKey{}, info.RemoteAddr.String())
}

func (u *upstreamStats) HandleConn(ctx context.Context, s stats.ConnStats) {
	addr, ok := ctx.Value(connAddrKey{}).(string)
	if !ok {
		return
	}
	u.serverMu.Lock()
	defer u.serverMu.Unlock()
	switch s.(type) {
	case *stats.ConnBegin:
		u.serverConns[addr]++
	case *stats.ConnEnd:
		u.serverConns[addr]--
	default:
		return
	}
	if n := u.serverConns[addr]; n > 0 {
		u.upstreamServer.WithLabelValues(addr).Set(float64(n))
		return
	}
	// A server no longer connected leaves the metrics.
	delete(u.serverConns, addr)
	u.upstreamServer.DeleteLabelValues(addr)
}
