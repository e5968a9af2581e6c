package telemetry

import (
	"context"
	"io"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
)

// What the SPIRE Server upstream records: its calls through the dial
// options, and which server it uses through Upstream.

// UpstreamDialOptions are the dial options that record every call to the
// SPIRE Server by method and code, with the latency of unary calls; none
// on nil Metrics.
func (m *Metrics) UpstreamDialOptions() []grpc.DialOption {
	if m == nil {
		return nil
	}
	return []grpc.DialOption{
		grpc.WithChainUnaryInterceptor(m.upstreamUnary),
		grpc.WithChainStreamInterceptor(m.upstreamStream),
	}
}

func (m *Metrics) upstreamUnary(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	start := time.Now()
	err := invoker(ctx, method, req, reply, cc, opts...)
	service, name := splitMethod(method)
	m.upstreamDuration.WithLabelValues(service, name).Observe(time.Since(start).Seconds())
	m.upstreamDone(service, name, err)
	return err
}

func (m *Metrics) upstreamDone(service, method string, err error) {
	m.upstreamHandled.WithLabelValues(service, method, status.Code(err).String()).Inc()
}

func (m *Metrics) upstreamStream(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	service, name := splitMethod(method)
	cs, err := streamer(ctx, desc, cc, method, opts...)
	if err != nil {
		m.upstreamDone(service, name, err)
		return nil, err
	}
	return &endedStream{ClientStream: cs, m: m, service: service, method: name}, nil
}

// endedStream counts a client stream when its receive ends: io.EOF is OK.
// A stream its caller abandons without reading to the end is not counted.
type endedStream struct {
	grpc.ClientStream
	m               *Metrics
	service, method string
	ended           atomic.Bool
}

func (s *endedStream) RecvMsg(msg any) error {
	err := s.ClientStream.RecvMsg(msg)
	if err != nil && s.ended.CompareAndSwap(false, true) {
		code := err
		if err == io.EOF {
			code = nil
		}
		s.m.upstreamDone(s.service, s.method, code)
	}
	return err
}

// Upstream records which SPIRE Server the agent uses: the spire upstream
// calls it as it connects and fails over. Safe on nil Metrics.
type Upstream interface {
	// Connected records addr ("host:port" as dialed) as the server in
	// use; "" when none is.
	Connected(addr string)
	// FailedOver records a move to another server after a failure.
	FailedOver()
}

// Upstream returns the recorder of the server in use.
func (m *Metrics) Upstream() Upstream { return (*upstreamRecorder)(m) }

type upstreamRecorder Metrics

func (u *upstreamRecorder) Connected(addr string) {
	if u == nil {
		return
	}
	u.serverMu.Lock()
	defer u.serverMu.Unlock()
	u.upstreamServer.Reset()
	if addr != "" {
		u.upstreamServer.WithLabelValues(addr).Set(1)
	}
}

func (u *upstreamRecorder) FailedOver() {
	if u != nil {
		u.upstreamFailovers.Inc()
	}
}
