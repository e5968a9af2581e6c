package brokerapi

import (
	"context"
	"crypto/x509"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/conf"
	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/lanyard-dev/lanyard/internal/testkit/attestkit"
	"github.com/spiffe/go-spiffe/v2/exp/proto/spiffe/broker"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/grpc/status"
)

// The Broker Endpoint spec's error table: InvalidArgument without the
// header, Unavailable while the agent cannot serve, Unauthenticated and
// PermissionDenied for callers that are not authorized brokers (refused
// at the handshake, as spire-agent does).
func TestSecurityHeader(t *testing.T) {
	env := newEnv(t, []*agent.Entry{attestkit.Entry(workloadID, 1, attestkit.MySelector())})
	pid, _ := testkit.StartSleeper(t)
	ctx := testkit.Context(t, waitLimit)
	for _, tcp := range []bool{false, true} {
		c := env.client(t, remoteBroker, clientOpts{tcp: tcp, noHeader: true})
		_, err := c.FetchJWTSVID(ctx, &broker.FetchJWTSVIDRequest{Reference: pidRef(t, pid), Audience: []string{"a"}})
		wantStatus(t, err, codes.InvalidArgument, "", "FetchJWTSVID without the header")
		s, err := c.SubscribeToX509SVID(ctx, &broker.SubscribeToX509SVIDRequest{Reference: pidRef(t, pid)})
		wantStatus(t, testkit.FirstRecv(s, err), codes.InvalidArgument, "", "SubscribeToX509SVID without the header")
	}
	// The value is case sensitive.
	c := broker.NewAPIClient(env.dial(t, localBroker, clientOpts{noHeader: true}))
	_, err := c.FetchJWTSVID(metadataContext(ctx, "True"), &broker.FetchJWTSVIDRequest{Reference: pidRef(t, pid), Audience: []string{"a"}})
	wantStatus(t, err, codes.InvalidArgument, "", "FetchJWTSVID with \"True\"")
}

func TestUnauthorizedBrokerRefusedAtHandshake(t *testing.T) {
	env := newEnv(t, []*agent.Entry{attestkit.Entry(workloadID, 1, attestkit.MySelector())})
	pid, _ := testkit.StartSleeper(t)
	ctx := testkit.Context(t, waitLimit)
	req := &broker.FetchJWTSVIDRequest{Reference: pidRef(t, pid), Audience: []string{"a"}}
	for _, tcp := range []bool{false, true} {
		_, err := env.client(t, stranger, clientOpts{tcp: tcp}).FetchJWTSVID(ctx, req)
		wantStatus(t, err, codes.Unavailable, "", "a broker not in brokers")
		// No client certificate at all.
		noCert := tlsconfig.TLSClientConfig(env.bundles, tlsconfig.AuthorizeID(agentID))
		_, err = broker.NewAPIClient(env.dialTLS(t, noCert, clientOpts{tcp: tcp})).FetchJWTSVID(ctx, req)
		wantStatus(t, err, codes.Unavailable, "", "a client without an SVID")
	}
	// A broker that checks the agent's ID refuses an agent with another:
	// the agent is authenticated too.
	tlsConfig := tlsconfig.MTLSClientConfig(svidOf(t, env.up.CA(), localBroker), env.bundles, tlsconfig.AuthorizeID(stranger))
	_, err := broker.NewAPIClient(env.dialTLS(t, tlsConfig, clientOpts{})).FetchJWTSVID(ctx, req)
	wantStatus(t, err, codes.Unavailable, "", "an agent of an unexpected ID")
	// A call with no broker on its connection is Unauthenticated.
	_, err = brokerOf(context.Background())
	wantStatus(t, err, codes.Unauthenticated, "", "no broker")
}

func TestUnavailableBeforeTheFirstSync(t *testing.T) {
	env := newEnv(t, nil) // no entries nor bundles yet
	pid, _ := testkit.StartSleeper(t)
	c := env.client(t, localBroker, clientOpts{})
	ctx := testkit.Context(t, waitLimit)
	_, err := c.FetchJWTSVID(ctx, &broker.FetchJWTSVIDRequest{Reference: pidRef(t, pid), Audience: []string{"a"}})
	wantStatus(t, err, codes.Unavailable, "", "FetchJWTSVID before the first sync")
	s, err := c.SubscribeToX509Bundles(ctx, &broker.SubscribeToX509BundlesRequest{Reference: pidRef(t, pid)})
	wantStatus(t, testkit.FirstRecv(s, err), codes.Unavailable, "", "SubscribeToX509Bundles before the first sync")
}

func TestStopEndsStreamsUnavailable(t *testing.T) {
	env := newEnv(t, []*agent.Entry{attestkit.Entry(workloadID, 1, attestkit.MySelector())})
	pid, _ := testkit.StartSleeper(t)
	s, err := env.client(t, localBroker, clientOpts{}).SubscribeToX509SVID(testkit.Context(t, waitLimit), &broker.SubscribeToX509SVIDRequest{Reference: pidRef(t, pid)})
	if err := testkit.FirstRecv(s, err); err != nil {
		t.Fatal(err)
	}
	env.stop()
	wantStatus(t, recvUntilErr(s), codes.Unavailable, "", "a stream when the agent stops")
}

func TestReflectionOnlyOverUnixSocket(t *testing.T) {
	env := newEnv(t, []*agent.Entry{attestkit.Entry(workloadID, 1, attestkit.MySelector())})
	ctx := testkit.Context(t, waitLimit)
	list := func(tcp bool) ([]string, error) {
		s, err := reflectionpb.NewServerReflectionClient(env.dial(t, localBroker, clientOpts{tcp: tcp})).ServerReflectionInfo(ctx)
		if err != nil {
			return nil, err
		}
		if err := s.Send(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{}}); err != nil {
			return nil, err
		}
		resp, err := s.Recv()
		if err != nil {
			return nil, err
		}
		var names []string
		for _, svc := range resp.GetListServicesResponse().GetService() {
			names = append(names, svc.Name)
		}
		return names, nil
	}
	names, err := list(false)
	if err != nil || !slices.Contains(names, "spiffe.broker.API") {
		t.Fatalf("reflection over the Unix socket: %v, %v", names, err)
	}
	_, err = list(true)
	wantStatus(t, err, codes.PermissionDenied, "", "reflection over TCP")
}

func TestSocketModes(t *testing.T) {
	env := newEnv(t, []*agent.Entry{attestkit.Entry(workloadID, 1, attestkit.MySelector())})
	for path, want := range map[string]os.FileMode{env.socket: 0o770, filepath.Dir(env.socket): 0o750} {
		st, err := os.Lstat(path)
		if err != nil {
			t.Fatal(err)
		}
		if got := st.Mode().Perm(); got != want {
			t.Errorf("%s: mode %o, want %o", path, got, want)
		}
	}
	// A second agent on the same socket fails to start, and says why.
	_, err := New(Config{Log: env.endpoint.cfg.Log, Attestor: env.endpoint.cfg.Attestor, Identities: env.cache,
		SVIDSource: env.endpoint.cfg.SVIDSource, BundleSource: env.bundles,
		Broker: conf.Broker{SocketPath: env.socket, Brokers: brokersConf()}})
	if err == nil || !strings.Contains(err.Error(), "experimental.broker.socket_path") {
		t.Fatalf("a second endpoint on the socket: %v", err)
	}
	// And on the same port.
	_, err = New(Config{Log: env.endpoint.cfg.Log, Attestor: env.endpoint.cfg.Attestor, Identities: env.cache,
		SVIDSource: env.endpoint.cfg.SVIDSource, BundleSource: env.bundles,
		Broker: conf.Broker{BindAddress: env.tcp, Brokers: brokersConf()}})
	if err == nil || !strings.Contains(err.Error(), "bind_address") {
		t.Fatalf("a second endpoint on the port: %v", err)
	}
}

func metadataContext(ctx context.Context, value string) context.Context {
	return metadata.AppendToOutgoingContext(ctx, headerKey, value)
}

// Brokers are verified with the cache's bundles at each handshake: a
// broker of a federated trust domain gets in while the agent federates
// with it, and not once that bundle is gone.
func TestBrokersVerifiedWithTheCachesBundles(t *testing.T) {
	env := newEnv(t, []*agent.Entry{attestkit.Entry(workloadID, 1, attestkit.MySelector())})
	pid, _ := testkit.StartSleeper(t)
	ctx := testkit.Context(t, waitLimit)
	req := &broker.FetchJWTSVIDRequest{Reference: pidRef(t, pid), Audience: []string{"a"}}
	if _, err := env.client(t, remoteBroker, clientOpts{tcp: true}).FetchJWTSVID(ctx, req); err != nil {
		t.Fatalf("a broker of a federated trust domain: %v", err)
	}
	env.cache.SetBundles(env.up.LocalBundle(t, td), nil)
	_, err := env.client(t, remoteBroker, clientOpts{tcp: true}).FetchJWTSVID(ctx, req)
	wantStatus(t, err, codes.Unavailable, "", "a broker of a trust domain no longer federated")
}

// A broker serves many workloads on one connection: more streams than the
// Workload API's 100 per connection all get their first message.
func TestManyStreamsOnOneConnection(t *testing.T) {
	env := newEnv(t, []*agent.Entry{attestkit.Entry(workloadID, 1, attestkit.MySelector())})
	pid, _ := testkit.StartSleeper(t)
	c := env.client(t, localBroker, clientOpts{})
	ctx := testkit.Context(t, waitLimit)
	for i := range 150 {
		s, err := c.SubscribeToX509SVID(ctx, &broker.SubscribeToX509SVIDRequest{Reference: pidRef(t, pid)})
		if err := testkit.FirstRecv(s, err); err != nil {
			t.Fatalf("stream %d: %v", i, err)
		}
	}
}

// A broker that stops reading its stream holds no send forever: past the
// send timeout the agent closes its connection (a TLS one here, not a
// peer-credential one as on the Workload API).
func TestBrokerThatStopsReadingIsDisconnected(t *testing.T) {
	env := newEnv(t, []*agent.Entry{attestkit.Entry(workloadID, 1, attestkit.MySelector())}, func(c *Config) { c.SendTimeout = 200 * time.Millisecond })
	pid, _ := testkit.StartSleeper(t)
	// Fixed windows: no growth for a client that reads nothing.
	c := env.client(t, localBroker, clientOpts{extra: []grpc.DialOption{grpc.WithInitialWindowSize(64 << 10), grpc.WithInitialConnWindowSize(64 << 10)}})
	s, err := c.SubscribeToX509Bundles(testkit.Context(t, waitLimit), &broker.SubscribeToX509BundlesRequest{Reference: pidRef(t, pid)})
	if err := testkit.FirstRecv(s, err); err != nil {
		t.Fatal(err)
	}
	// Bundles that grow, none read: together far more than the windows
	// and gRPC's send quota hold.
	roots := []*x509.Certificate{env.up.CA().Cert}
	for range 60 {
		roots = append(roots, testkit.NewTrustDomainCA(t, td).Cert)
		env.cache.SetBundles(env.up.LocalBundle(t, td, roots...), nil)
	}
	testkit.WaitFor(t, waitLimit, "the broker to be disconnected", func() bool {
		return strings.Contains(env.logs.String(), "Disconnecting a broker that stopped reading its stream")
	})
	// Its connection was closed under it: the stream ends Unavailable.
	if err := recvUntilErr(s); status.Code(err) != codes.Unavailable {
		t.Fatalf("the stream of a disconnected broker ended with %v, want Unavailable", err)
	}
}
