package brokerapi

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/attestor"
	"github.com/lanyard-dev/lanyard/attestor/selector"
	"github.com/lanyard-dev/lanyard/conf"
	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/lanyard-dev/lanyard/internal/testkit/attestkit"
	"github.com/lanyard-dev/lanyard/internal/testkit/fakeagent"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/exp/proto/spiffe/broker"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
)

var (
	td      = spiffeid.RequireTrustDomainFromString("example.org")
	tdOther = spiffeid.RequireTrustDomainFromString("other.org")
	agentID = spiffeid.RequireFromPath(td, "/spire/agent/test/node1")
	// localBroker may use PIDs on the Unix socket and pods anywhere.
	localBroker = spiffeid.RequireFromPath(td, "/broker")
	// podBroker may use pod references only.
	podBroker = spiffeid.RequireFromPath(td, "/pod-broker")
	// remoteBroker, of another trust domain, may use anything over TCP.
	remoteBroker = spiffeid.RequireFromPath(tdOther, "/remote-broker")
	stranger     = spiffeid.RequireFromPath(td, "/stranger")
	workloadID   = spiffeid.RequireFromPath(td, "/workload")
	podID        = spiffeid.RequireFromPath(td, "/pod")
)

const waitLimit = 10 * time.Second

var podSelector = selector.Selector{Type: "k8s", Value: "pod-uid:0c3f5a5e-6f0e-4f5b-9a0a-1b2c3d4e5f60"}

func brokersConf() []conf.AuthorizedBroker {
	return []conf.AuthorizedBroker{
		{ID: localBroker, AllowedReferenceTypes: []conf.AllowedReferenceType{{TypeURL: conf.PIDReferenceType}, {TypeURL: conf.KubernetesReferenceType, AllowOverTCP: true}}},
		{ID: podBroker, AllowedReferenceTypes: []conf.AllowedReferenceType{{TypeURL: conf.KubernetesReferenceType}}},
		{ID: remoteBroker, AllowedReferenceTypes: []conf.AllowedReferenceType{{TypeURL: conf.AnyReferenceType, AllowOverTCP: true}}},
	}
}

// pods is a PodAttestor over pods the test sets: the k8s attestor's
// contract, without a kubelet.
type pods struct {
	mu     sync.Mutex
	byID   map[podRef][]selector.Selector
	denied map[spiffeid.ID]bool // brokers the k8s policy refuses
}

func (p *pods) deny(broker spiffeid.ID) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.denied[broker] = true
}

func (p *pods) set(ref podRef, sels []selector.Selector) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if sels == nil {
		delete(p.byID, ref)
		return
	}
	p.byID[ref] = sels
}

func (p *pods) AttestPod(_ context.Context, broker spiffeid.ID, namespace, name, uid string) ([]selector.Selector, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if name == "" && uid == "" {
		return nil, fmt.Errorf("%w: neither name nor uid", attestor.ErrInvalidReference)
	}
	if p.denied[broker] {
		return nil, fmt.Errorf("%w: %s may not impersonate pods", attestor.ErrBrokerNotAuthorized, broker)
	}
	for ref, sels := range p.byID {
		if (name == "" || ref.namespace == namespace && ref.name == name) && (uid == "" || ref.uid == uid) {
			return sels, nil
		}
	}
	return nil, fmt.Errorf("%w: no such pod on this node", attestor.ErrWorkloadNotFound)
}

type testEnv struct {
	up       *fakeagent.Upstream
	cache    *agent.SVIDManager
	caOther  *testkit.CA
	bundles  *spiffebundle.Set
	endpoint *Endpoint
	socket   string
	tcp      string
	pods     *pods
	logs     *testkit.Buffer
	stop     func() // stops the endpoint; the test's end does too
}

type envOption func(*Config)

func withoutPods(c *Config) { c.PodAttestor = nil }

// newEnv serves the Broker API on a real Unix socket and a real loopback
// port, over a real cache and the real unix attestor, presenting an agent
// SVID of the local upstream's CA.
func newEnv(t *testing.T, entries []*agent.Entry, opts ...envOption) *testEnv {
	t.Helper()
	log, logs := testkit.AgentLogger(t)
	up, cache := attestkit.Cache(t, log, td)
	caOther := testkit.NewTrustDomainCA(t, tdOther, testkit.WithCommonName("other ca"))
	if entries != nil {
		cache.SetEntries(entries)
		cache.SetBundles(up.LocalBundle(t, td), []*spiffebundle.Bundle{caOther.Bundle(tdOther)})
	}
	env := &testEnv{up: up, cache: cache, caOther: caOther, pods: &pods{byID: map[podRef][]selector.Selector{}, denied: map[spiffeid.ID]bool{}}, logs: logs}
	env.bundles = spiffebundle.NewSet(up.LocalBundle(t, td), caOther.Bundle(tdOther))
	env.socket = filepath.Join(testkit.ShortDir(t, "brk-"), "broker", "broker.sock")
	cfg := Config{
		Log:         log.Named("broker"),
		Attestor:    attestkit.Unix(t, log, td),
		Identities:  cache,
		PodAttestor: env.pods,
		SVIDSource:  svidOf(t, up.CA(), agentID),
		Broker:      conf.Broker{SocketPath: env.socket, BindAddress: "127.0.0.1:0", Brokers: brokersConf()},
		Grace:       2 * time.Second,
	}
	if entries == nil {
		// The cache has no bundles yet to verify brokers with.
		cfg.BundleSource = env.bundles
	}
	for _, o := range opts {
		o(&cfg)
	}
	e, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	e.pidCheck, e.podCheck = 50*time.Millisecond, 50*time.Millisecond
	env.endpoint = e
	env.tcp = e.Addrs()[1].String()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- e.Run(ctx) }()
	env.stop = sync.OnceFunc(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	t.Cleanup(env.stop)
	return env
}

// svidOf mints an X509-SVID for id from ca.
func svidOf(t *testing.T, ca *testkit.CA, id spiffeid.ID) *x509svid.SVID {
	cert, key := ca.SVID(t, id.String(), time.Hour)
	return &x509svid.SVID{ID: id, Certificates: []*x509.Certificate{cert}, PrivateKey: key}
}

// client is a broker's connection: its own SVID, the agent verified by
// its SPIFFE ID, and the security header on every call unless noHeader.
type clientOpts struct {
	tcp      bool
	noHeader bool
	extra    []grpc.DialOption
}

func (e *testEnv) dial(t *testing.T, id spiffeid.ID, o clientOpts) *grpc.ClientConn {
	t.Helper()
	ca := e.up.CA()
	if id.TrustDomain() == tdOther {
		ca = e.caOther
	}
	tlsConfig := tlsconfig.MTLSClientConfig(svidOf(t, ca, id), e.bundles, tlsconfig.AuthorizeID(agentID))
	return e.dialTLS(t, tlsConfig, o)
}

func (e *testEnv) dialTLS(t *testing.T, tlsConfig *tls.Config, o clientOpts) *grpc.ClientConn {
	t.Helper()
	target := "unix://" + e.socket
	if o.tcp {
		target = "passthrough:///" + e.tcp
	}
	opts := append([]grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(tlsConfig))}, o.extra...)
	if !o.noHeader {
		opts = append(opts,
			grpc.WithUnaryInterceptor(func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
				return invoker(metadata.AppendToOutgoingContext(ctx, headerKey, "true"), method, req, reply, cc, opts...)
			}),
			grpc.WithStreamInterceptor(func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
				return streamer(metadata.AppendToOutgoingContext(ctx, headerKey, "true"), desc, cc, method, opts...)
			}))
	}
	conn, err := grpc.NewClient(target, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func (e *testEnv) client(t *testing.T, id spiffeid.ID, o clientOpts) broker.APIClient {
	return broker.NewAPIClient(e.dial(t, id, o))
}

func pidRef(t *testing.T, pid int32) *broker.WorkloadReference {
	return ref(t, &broker.WorkloadPIDReference{Pid: pid})
}

func ref(t *testing.T, m proto.Message) *broker.WorkloadReference {
	t.Helper()
	a, err := anypb.New(m)
	if err != nil {
		t.Fatal(err)
	}
	return &broker.WorkloadReference{Reference: a}
}

// goneProcess is the PID of a process that ran and was reaped.
func goneProcess(t *testing.T) int32 {
	pid, stop := testkit.StartSleeper(t)
	stop()
	return pid
}

// wantStatus checks err's code and, when reason is not "", the spec's
// ErrorInfo.
func wantStatus(t *testing.T, err error, code codes.Code, reason, what string) {
	t.Helper()
	st := status.Convert(err)
	if st.Code() != code {
		t.Fatalf("%s: got %v, want %v", what, err, code)
	}
	if reason == "" {
		return
	}
	for _, d := range st.Details() {
		if info, ok := d.(*errdetails.ErrorInfo); ok && info.Reason == reason && info.Domain == "spiffe.io" {
			return
		}
	}
	t.Fatalf("%s: %v has no ErrorInfo with reason %s", what, err, reason)
}

// recvUntilErr reads a stream until it ends, within the test's bound.
func recvUntilErr[T any](s interface{ Recv() (T, error) }) error {
	for {
		if _, err := s.Recv(); err != nil {
			return err
		}
	}
}
