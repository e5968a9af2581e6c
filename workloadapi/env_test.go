package workloadapi

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/attestor"
	"github.com/lanyard-dev/lanyard/attestor/selector"
	"github.com/lanyard-dev/lanyard/conf"
	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/lanyard-dev/lanyard/internal/testkit/fakeagent"
	unixattestor "github.com/lanyard-dev/lanyard/plugins/workloadattestor/unix"
	"github.com/lanyard-dev/lanyard/supervisor"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	spiffewl "github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc/metadata"
)

var (
	tdExample = spiffeid.RequireTrustDomainFromString("example.org")
	tdOther   = spiffeid.RequireTrustDomainFromString("other.org")
	tdThird   = spiffeid.RequireTrustDomainFromString("third.org")
)

// waitLimit bounds every wait for something that must happen.
const waitLimit = 10 * time.Second

// quietFor is how long a stream is watched to show that nothing was sent.
// The server runs in this process, so a message it wrongly sends arrives in
// well under this.
const quietFor = 300 * time.Millisecond

// newTestCA is a CA of td; its name tells a test's CAs apart in failures.
func newTestCA(t testing.TB, td spiffeid.TrustDomain, name string) *testkit.CA {
	t.Helper()
	return testkit.NewTrustDomainCA(t, td, testkit.WithCommonName(name))
}

// federatedBundle is td's bundle with a new CA and JWT key "kid-<td>".
func federatedBundle(t *testing.T, td spiffeid.TrustDomain) *spiffebundle.Bundle {
	t.Helper()
	b := newTestCA(t, td, "ca of "+td.Name()).Bundle(td)
	if err := b.AddJWTAuthority("kid-"+td.Name(), testkit.NewKey(t).Public()); err != nil {
		t.Fatal(err)
	}
	return b
}

// mySelector is what the unix attestor reports for this test process, the
// caller of every call; otherSelector belongs to no process here.
func mySelector() selector.Selector {
	return selector.Selector{Type: "unix", Value: "uid:" + strconv.Itoa(os.Getuid())}
}

func otherSelector() selector.Selector {
	return selector.Selector{Type: "unix", Value: "uid:" + strconv.Itoa(os.Getuid()+4242)}
}

// newEntry returns an entry of example.org; entries are immutable once in
// the cache, so a change is a new entry with the same ID.
func newEntry(path string, createdAt int64, sel selector.Selector, federatesWith ...spiffeid.TrustDomain) *agent.Entry {
	return &agent.Entry{
		ID:            "entry" + strings.ReplaceAll(path, "/", "-"),
		SPIFFEID:      spiffeid.RequireFromPath(tdExample, path),
		Selectors:     []selector.Selector{sel},
		FederatesWith: federatesWith,
		CreatedAt:     createdAt,
	}
}

type envOptions struct {
	notReady             bool
	allowUnauthenticated bool
	sendTimeout          time.Duration
	entries              []*agent.Entry
	federated            []*spiffebundle.Bundle
	// noJWTKey leaves the upstream without a JWT key (and the bundle without
	// a JWT authority), as for the SDS tests, which sign no JWT-SVIDs.
	noJWTKey bool
	// upstream, when set, wraps the fake upstream (to add a Resyncer) or
	// sets its fields before the cache uses it.
	upstream func(*fakeagent.Upstream) agent.Upstream
	// attestor, when set, wraps the unix attestor (to slow it down).
	attestor func(attestor.WorkloadAttestor) attestor.WorkloadAttestor
	// attestorTimeout, when set, is the deadline of the attestor.
	attestorTimeout time.Duration
	// persistDir, when set, is where the cache is saved, by its persister
	// staged first, as lanyard run stages it.
	persistDir string
	// streams, when set, records the open streams.
	streams *Streams
}

// testEnv is a Workload API server on a real Unix socket, over a real cache
// and the real unix attestor.
type testEnv struct {
	up     *fakeagent.Upstream
	ca     *testkit.CA
	cache  *agent.SVIDManager
	srv    *Server
	socket string
	logs   *testkit.Buffer
	// stop stops the server and the services that feed its cache, in the
	// order lanyard run stops them on SIGTERM, and returns when all have.
	stop func()
}

func newTestEnv(t *testing.T, opt envOptions) *testEnv {
	t.Helper()
	log, logs := testkit.NewLogger(hclog.Debug)
	up := fakeagent.NewUpstream(t, tdExample)
	ca := newTestCA(t, tdExample, "ca 1")
	up.SetCA(ca)
	if opt.noJWTKey {
		up.SetJWTKey("", nil)
	}
	var upstream agent.Upstream = up
	if opt.upstream != nil {
		upstream = opt.upstream(up)
	}
	cache := agent.NewSVIDManager(log.Named("cache"), upstream)
	e := &testEnv{up: up, ca: ca, cache: cache, logs: logs}
	if !opt.notReady {
		cache.SetEntries(opt.entries)
		cache.SetBundles(up.LocalBundle(t, tdExample), opt.federated)
	}

	section, err := conf.NewSection("test.conf", "")
	if err != nil {
		t.Fatal(err)
	}
	wa, err := unixattestor.New(attestor.PluginConfig{Name: "unix", Data: section, Log: log.Named("unix"), TrustDomain: tdExample})
	if err != nil {
		t.Fatal(err)
	}
	if opt.attestor != nil {
		wa = opt.attestor(wa)
	}
	e.srv = NewServer(Config{
		Log:                           log.Named("workloadapi"),
		Attestor:                      attestor.NewMultiAttestor(log.Named("attestor"), opt.attestorTimeout, attestor.Plugin{Name: "unix", Attestor: wa}),
		Identities:                    cache,
		AllowUnauthenticatedVerifiers: opt.allowUnauthenticated,
		SendTimeout:                   opt.sendTimeout,
		Streams:                       opt.streams,
	})

	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("agent log:\n%s", logs.String())
		}
	})
	e.socket = filepath.Join(testkit.ShortDir(t, "wa-"), "api.sock")
	var first []supervisor.Service
	if opt.persistDir != "" {
		cache.PersistTo(opt.persistDir, tdExample)
		first = append(first, cache.Persister())
	}
	e.stop = serve(t, log, e.socket, e.srv, first, []supervisor.Service{cache.Rotator()})
	return e
}

// serve runs srv on socket after the stages of services that feed its
// cache, staged as `lanyard run` stages them, until the test ends or stop
// is called. Its health stays NOT_SERVING: the tests of the health status
// run their own endpoint of srv, which shares it.
func serve(tb testing.TB, log hclog.Logger, socket string, srv *Server, stages ...[]supervisor.Service) (stop func()) {
	tb.Helper()
	l, err := agent.Listen(socket, agent.DefaultMaxConnections(), log.Named("listener"))
	if err != nil {
		tb.Fatal(err)
	}
	sup := supervisor.New(log)
	for _, stage := range stages {
		if len(stage) > 0 {
			sup.Stage(stage...)
		}
	}
	sup.Stage(srv.Endpoint(l, nil, 2*time.Second))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = sup.Run(ctx)
	}()
	stop = sync.OnceFunc(func() {
		cancel()
		<-done
	})
	tb.Cleanup(stop)
	return stop
}

// client is a raw Workload API client on its own connection.
func (e *testEnv) client(t *testing.T) workload.SpiffeWorkloadAPIClient {
	t.Helper()
	return workload.NewSpiffeWorkloadAPIClient(testkit.Dial(t, e.socket))
}

// spiffeClient is go-spiffe's client.
func (e *testEnv) spiffeClient(t *testing.T) *spiffewl.Client {
	t.Helper()
	c, err := spiffewl.New(t.Context(), spiffewl.WithAddr("unix://"+e.socket))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// callCtx carries the security header and ends with the test.
func callCtx(t *testing.T) context.Context {
	return metadata.AppendToOutgoingContext(t.Context(), "workload.spiffe.io", "true")
}
