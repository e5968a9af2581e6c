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

// The series of a method, each resolved the first time it is used. No
// closures: one passed on every call would be allocated on every call.
// Two calls racing to resolve one store the same child of the vector.

func (r *rpcMethod) done(err error) {
	code := status.Code(err)
	if int(code) >= numCodes {
		code = codes.Unknown
	}
	if c := r.handled[code].Load(); c != nil {
		(*c).Inc()
		return
	}
	c := prometheus.Counter(r.m.rpcHandled.WithLabelValues(r.service, r.method, code.String()))
	r.handled[code].Store(&c)
	c.Inc()
}

// observe observes the time since since in the series *p holds,
// resolving it from vec the first time.
func (r *rpcMethod) observe(p *atomic.Pointer[prometheus.Observer], vec *prometheus.HistogramVec, since time.Time) {
	o := p.Load()
	if o == nil {
		v := vec.WithLabelValues(r.service, r.method)
		o = &v
		p.Store(o)
	}
	(*o).Observe(time.Since(since).Seconds())
}

func (r *rpcMethod) openStreams(class int) prometheus.Gauge {
	if g := r.streams[class].Load(); g != nil {
		return *g
	}
	g := r.m.openStreams.WithLabelValues(r.service, uidClassNames[class])
	r.streams[class].Store(&g)
	return g
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
		r.observe(&r.duration, r.m.rpcDuration, start)
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
		open := r.openStreams(class)
		open.Inc()
		defer open.Dec()
		// One allocation a stream. Not pooled: a handler may leave a
		// goroutine that still calls the stream's RecvMsg after it returns
		// (SDS's reader), which a reused wrapper would hand another
		// stream's messages.
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
		t.r.observe(&t.r.firstResponse, t.r.m.rpcFirstResponse, t.start)
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

// ServerOptions are the interceptors for a server with none of its own
// (the admin socket's); none on nil s.
func (s *ServerRPC) ServerOptions() []grpc.ServerOption {
	if s == nil {
		return nil
	}
	return []grpc.ServerOption{
		grpc.UnaryInterceptor(s.WrapUnary(func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, next grpc.UnaryHandler) (any, error) {
			return next(ctx, req)
		})),
		grpc.StreamInterceptor(s.WrapStream(func(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, next grpc.StreamHandler) error {
			return next(srv, ss)
		})),
	}
}
