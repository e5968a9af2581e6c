package telemetry

import (
	"context"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// ServerRPC records the calls of one gRPC server through its interceptors.
// Each method's series are resolved once, on first use, and kept, so that a
// call allocates nothing for its metrics (a stream allocates its wrapper,
// which times its first response).
type ServerRPC struct {
	m *Metrics
	// uidOf finds the caller's uid in a call's context (the peer
	// credentials); false when it has none.
	uidOf func(context.Context) (uint32, bool)
	// methods is written by Index before the server serves, then only
	// read.
	methods map[string]*rpcMethod
}

// ServerRPC returns the recorder of one server's calls; nil (recording
// nothing) on nil Metrics.
func (m *Metrics) ServerRPC(uidOf func(context.Context) (uint32, bool)) *ServerRPC {
	if m == nil {
		return nil
	}
	return &ServerRPC{m: m, uidOf: uidOf, methods: map[string]*rpcMethod{}}
}

// Index learns the methods srv serves; call it once its services are
// registered and before it serves. Calls of methods it did not learn are
// not recorded, so the method label takes only the server's own names.
func (s *ServerRPC) Index(srv *grpc.Server) {
	if s == nil {
		return
	}
	for svc, info := range srv.GetServiceInfo() {
		for _, mi := range info.Methods {
			s.methods["/"+svc+"/"+mi.Name] = &rpcMethod{m: s.m, service: svc, method: mi.Name}
		}
	}
}

// rpcMethod holds one method's series, each resolved at first use.
type rpcMethod struct {
	m               *Metrics
	service, method string
	handled         [numCodes]atomic.Pointer[prometheus.Counter]
	duration        atomic.Pointer[prometheus.Observer]
	firstResponse   atomic.Pointer[prometheus.Observer]
	streams         [numUIDClasses]atomic.Pointer[prometheus.Gauge]
}

// numCodes covers gRPC's codes, OK (0) to Unauthenticated (16).
const numCodes = int(codes.Unauthenticated) + 1

// load returns what p holds, resolving it with make the first time.
func load[T any](p *atomic.Pointer[T], make func() T) T {
	if v := p.Load(); v != nil {
		return *v
	}
	v := make()
	p.Store(&v)
	return v
}

func (r *rpcMethod) done(err error) {
	code := status.Code(err)
	if int(code) >= numCodes {
		code = codes.Unknown
	}
	load(&r.handled[code], func() prometheus.Counter {
		return r.m.rpcHandled.WithLabelValues(r.service, r.method, code.String())
	}).Inc()
}

// WrapUnary returns the unary interceptor that records the calls inner
// handles (inner runs inside it, so that calls it refuses count too); inner
// itself on nil s. One interceptor rather than a chain of two: gRPC
// allocates for every link of a chain on every call.
func (s *ServerRPC) WrapUnary(inner grpc.UnaryServerInterceptor) grpc.UnaryServerInterceptor {
	if s == nil {
		return inner
	}
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, next grpc.UnaryHandler) (any, error) {
		r := s.methods[info.FullMethod]
		if r == nil {
			return inner(ctx, req, info, next)
		}
		start := time.Now()
		resp, err := inner(ctx, req, info, next)
		load(&r.duration, func() prometheus.Observer {
			return r.m.rpcDuration.WithLabelValues(r.service, r.method)
		}).Observe(time.Since(start).Seconds())
		r.done(err)
		return resp, err
	}
}

// WrapStream is WrapUnary for streams: a stream counts as open until it
// ends, by the kind of user of its caller, its first response is timed,
// and its code counts at its end.
func (s *ServerRPC) WrapStream(inner grpc.StreamServerInterceptor) grpc.StreamServerInterceptor {
	if s == nil {
		return inner
	}
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, next grpc.StreamHandler) error {
		r := s.methods[info.FullMethod]
		if r == nil {
			return inner(srv, ss, info, next)
		}
		class := uidClassUnknown
		if uid, ok := s.uidOf(ss.Context()); ok {
			class = uidClassIndex(uid)
		}
		open := load(&r.streams[class], func() prometheus.Gauge {
			return r.m.openStreams.WithLabelValues(r.service, uidClassNames[class])
		})
		open.Inc()
		defer open.Dec()
		err := inner(srv, &timedStream{ServerStream: ss, r: r, start: time.Now()}, info, next)
		r.done(err)
		return err
	}
}

// timedStream times a stream's first response.
type timedStream struct {
	grpc.ServerStream
	r     *rpcMethod
	start time.Time
	sent  bool // gRPC forbids concurrent SendMsg calls
}

func (t *timedStream) SendMsg(msg any) error {
	if !t.sent {
		t.sent = true
		load(&t.r.firstResponse, func() prometheus.Observer {
			return t.r.m.rpcFirstResponse.WithLabelValues(t.r.service, t.r.method)
		}).Observe(time.Since(t.start).Seconds())
	}
	return t.ServerStream.SendMsg(msg)
}

// splitMethod splits a full method name, "/pkg.Service/Method".
func splitMethod(full string) (service, method string) {
	full = strings.TrimPrefix(full, "/")
	if i := strings.LastIndexByte(full, '/'); i >= 0 {
		return full[:i], full[i+1:]
	}
	return "unknown", full
}
