package spire

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	grpccreds "google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/resolver/manual"
)

// These tests run the client against real gRPC servers on two loopback
// addresses that one name resolves to (gRPC's manual resolver stands in
// for DNS, which test/ha covers with the real binary).

// fakeServer is a TLS gRPC server presenting the SPIRE Server's ID, on a
// fixed address that survives stop and start; it counts the connections
// it holds open.
type fakeServer struct {
	t    *testing.T
	addr string
	tls  *tls.Config

	mu   sync.Mutex
	srv  *grpc.Server
	open int
}

func newFakeServer(t *testing.T, ca *testkit.CA, ip string) *fakeServer {
	t.Helper()
	key := testkit.NewKey(t)
	now := time.Now()
	cert, err := ca.SignSVID(key.Public(), "spiffe://example.org/spire/server", now.Add(-time.Minute), now.Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", net.JoinHostPort(ip, "0"))
	if err != nil {
		testkit.Missing(t, "no loopback address %s: %v", ip, err)
	}
	s := &fakeServer{t: t, addr: l.Addr().String(), tls: &tls.Config{
		Certificates: []tls.Certificate{{Certificate: [][]byte{cert.Raw, ca.Cert.Raw}, PrivateKey: key}},
		ClientAuth:   tls.RequireAnyClientCert,
		MinVersion:   tls.VersionTLS12,
	}}
	s.serve(l)
	t.Cleanup(s.stop)
	return s
}

func (s *fakeServer) serve(l net.Listener) {
	srv := grpc.NewServer(grpc.Creds(grpccreds.NewTLS(s.tls)))
	healthpb.RegisterHealthServer(srv, health.NewServer())
	s.mu.Lock()
	s.srv = srv
	s.mu.Unlock()
	go func() { _ = srv.Serve(&countingListener{Listener: l, s: s}) }()
}

// start listens again on the same address.
func (s *fakeServer) start() {
	s.t.Helper()
	l, err := net.Listen("tcp", s.addr)
	if err != nil {
		s.t.Fatal(err)
	}
	s.serve(l)
}

// stop closes the listener and every connection, as a killed server does.
func (s *fakeServer) stop() {
	s.mu.Lock()
	srv := s.srv
	s.srv = nil
	s.mu.Unlock()
	if srv != nil {
		srv.Stop()
	}
}

func (s *fakeServer) conns() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.open
}

type countingListener struct {
	net.Listener
	s *fakeServer
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.s.mu.Lock()
	l.s.open++
	l.s.mu.Unlock()
	return &countedConn{Conn: c, s: l.s}, nil
}

type countedConn struct {
	net.Conn
	s    *fakeServer
	once sync.Once
}

func (c *countedConn) Close() error {
	c.once.Do(func() {
		c.s.mu.Lock()
		c.s.open--
		c.s.mu.Unlock()
	})
	return c.Conn.Close()
}

// twoServers starts servers on 127.0.0.2 and 127.0.0.3 and returns a
// client of a name resolving to both, its agent SVID from the same CA.
func twoServers(t *testing.T) (*serverClient, [2]*fakeServer, func() *serverClient) {
	t.Helper()
	ca := testkit.NewTrustDomainCA(t, td)
	servers := [2]*fakeServer{newFakeServer(t, ca, "127.0.0.2"), newFakeServer(t, ca, "127.0.0.3")}
	newClient := func() *serverClient {
		c, _ := resolvingClient(t, ca, servers[0].addr, servers[1].addr)
		return c
	}
	return newClient(), servers, newClient
}

// resolvingClient is a client of a name that resolves to addrs, with an
// agent SVID from ca; the resolver is returned to change what the name
// resolves to.
func resolvingClient(t *testing.T, ca *testkit.CA, addrs ...string) (*serverClient, *manual.Resolver) {
	t.Helper()
	r := manual.NewBuilderWithScheme("servers")
	r.InitialState(resolved(addrs...))
	c := &serverClient{
		log:         hclog.NewNullLogger(),
		addr:        "servers:///spire-server",
		serverID:    spiffeid.RequireFromPath(td, "/spire/server"),
		creds:       &agentIdentity{td: td, creds: newCreds(t, ca), roots: []*x509.Certificate{ca.Cert}},
		refused:     func(error) {},
		dialOptions: []grpc.DialOption{grpc.WithResolvers(r)},
	}
	t.Cleanup(c.retire)
	return c, r
}

func resolved(addrs ...string) resolver.State {
	var st resolver.State
	for _, a := range addrs {
		st.Addresses = append(st.Addresses, resolver.Address{Addr: a})
	}
	return st
}

// check calls the servers' health service and returns the address that
// answered.
func check(c *serverClient) (string, error) {
	var p peer.Peer
	err := c.call(context.Background(), func(ctx context.Context, cc *grpc.ClientConn) error {
		_, err := healthpb.NewHealthClient(cc).Check(ctx, &healthpb.HealthCheckRequest{}, grpc.Peer(&p))
		return err
	})
	if err != nil {
		return "", err
	}
	return p.Addr.String(), nil
}

func mustCheck(t *testing.T, c *serverClient) string {
	t.Helper()
	addr, err := check(c)
	if err != nil {
		t.Fatal(err)
	}
	return addr
}

// The agent holds one connection, to one server, whatever the name
// resolves to.
func TestOneServerConnection(t *testing.T) {
	c, servers, _ := twoServers(t)
	first := mustCheck(t, c)
	for range 5 {
		if got := mustCheck(t, c); got != first {
			t.Fatalf("calls went to %s and %s: want one server", first, got)
		}
	}
	// Happy eyeballs may have opened the other address too while the
	// first handshake ran; it closes once one is ready.
	testkit.WaitFor(t, 10*time.Second, "one connection in all", func() bool {
		return servers[0].conns()+servers[1].conns() == 1
	})
}

// Agents spread over the servers: each shuffles the addresses.
func TestAgentsSpreadOverServers(t *testing.T) {
	_, servers, newClient := twoServers(t)
	used := map[string]int{}
	for range 20 {
		used[mustCheck(t, newClient())]++
	}
	if used[servers[0].addr] == 0 || used[servers[1].addr] == 0 {
		t.Fatalf("20 agents used %v: want both servers (the chance that one gets none is 2 in a million)", used)
	}
}

// Losing the server costs no call: the next one, or the one that broke,
// goes to the other server at once.
func TestFailoverToTheOtherServer(t *testing.T) {
	c, servers, _ := twoServers(t)
	first := mustCheck(t, c)
	var dead, other *fakeServer
	for _, s := range servers {
		if s.addr == first {
			dead = s
		} else {
			other = s
		}
	}
	dead.stop()
	if got := mustCheck(t, c); got != other.addr {
		t.Fatalf("after %s stopped the call went to %s, want %s", first, got, other.addr)
	}
	if got := c.serverInUse(); got != other.addr {
		t.Fatalf("the server in use is %s, want %s", got, other.addr)
	}
	// And back, once the first returns and the second goes.
	dead.start()
	other.stop()
	if got := mustCheck(t, c); got != dead.addr {
		t.Fatalf("the call went to %s, want %s", got, dead.addr)
	}
}

// After every server was down, the first call after one returns reaches
// it: nothing waits out gRPC's reconnect backoff, which grows with each
// failed attempt while the servers are down.
func TestRecoveryAfterFullOutage(t *testing.T) {
	c, servers, _ := twoServers(t)
	mustCheck(t, c)
	servers[0].stop()
	servers[1].stop()
	for i := range 5 {
		if _, err := check(c); err == nil || !unreachable(err) {
			t.Fatalf("call %d with both servers down: %v, want Unavailable", i, err)
		}
	}
	servers[1].start()
	if got := mustCheck(t, c); got != servers[1].addr {
		t.Fatalf("the call went to %s, want %s", got, servers[1].addr)
	}
}

// A server replaced by one at another address is found: the call after the
// failure resolves the name again.
func TestReplacedServerIsFound(t *testing.T) {
	ca := testkit.NewTrustDomainCA(t, td)
	old, replacement := newFakeServer(t, ca, "127.0.0.2"), newFakeServer(t, ca, "127.0.0.3")
	c, r := resolvingClient(t, ca, old.addr)
	if got := mustCheck(t, c); got != old.addr {
		t.Fatalf("the call went to %s, want %s", got, old.addr)
	}
	// The name now names the replacement only (the DNS record changed).
	r.InitialState(resolved(replacement.addr))
	old.stop()
	if got := mustCheck(t, c); got != replacement.addr {
		t.Fatalf("after the server was replaced the call went to %s, want %s", got, replacement.addr)
	}
}
