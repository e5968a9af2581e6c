package adminapi

import (
	"context"
	"crypto/x509"
	"errors"
	"io"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/attestor/selector"
	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/lanyard-dev/lanyard/internal/testkit/attestkit"
	"github.com/lanyard-dev/lanyard/internal/testkit/fakeagent"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	delegatedv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/agent/delegatedidentity/v1"
	"github.com/spiffe/spire-api-sdk/proto/spire/api/types"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

var (
	td         = spiffeid.RequireTrustDomainFromString("example.org")
	tdFed      = spiffeid.RequireTrustDomainFromString("other.org")
	delegateID = spiffeid.RequireFromPath(td, "/delegate")
	workloadID = spiffeid.RequireFromPath(td, "/workload")
)

const waitLimit = 10 * time.Second

// podSelector stands for the workload a delegate serves; no process here
// has it, so only a delegate can get its identity.
var podSelector = selector.Selector{Type: "k8s", Value: "pod-uid:1234"}

type testEnv struct {
	admin  *Endpoint
	up     *fakeagent.Upstream
	cache  *agent.SVIDManager
	socket string
}

// newTestEnv serves the admin API on a real socket over a real cache and
// the real unix attestor; delegates are authorized_delegates.
func newTestEnv(t *testing.T, delegates []spiffeid.ID, entries ...*agent.Entry) *testEnv {
	t.Helper()
	return newTestEnvWith(t, nil, delegates, entries...)
}

// newTestEnvWith is newTestEnv with tune applied to the Config, if not nil,
// and to the fake upstream it made.
func newTestEnvWith(t *testing.T, tune func(*Config, *fakeagent.Upstream), delegates []spiffeid.ID, entries ...*agent.Entry) *testEnv {
	t.Helper()
	log, _ := testkit.AgentLogger(t)
	up, cache := attestkit.Cache(t, log, td)
	cache.SetEntries(entries)
	fed := testkit.NewTrustDomainCA(t, tdFed, testkit.WithCommonName("other ca")).Bundle(tdFed)
	cache.SetBundles(up.LocalBundle(t, td), []*spiffebundle.Bundle{fed})

	socket := filepath.Join(testkit.ShortDir(t, "adm-"), "private", "admin.sock")
	cfg := Config{
		Log:        log.Named("admin"),
		Attestor:   attestkit.Unix(t, log, td),
		Identities: cache,
		Delegates:  delegates,
		Grace:      2 * time.Second,
	}
	if tune != nil {
		tune(&cfg, up)
	}
	e, err := New(cfg, socket)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- e.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	return &testEnv{admin: e, up: up, cache: cache, socket: socket}
}

func (e *testEnv) client(t *testing.T) delegatedv1.DelegatedIdentityClient {
	return delegatedv1.NewDelegatedIdentityClient(testkit.Dial(t, e.socket))
}

func podSelectors() []*types.Selector {
	return []*types.Selector{{Type: podSelector.Type, Value: podSelector.Value}}
}

func wantCode(t *testing.T, err error, code codes.Code, what string) {
	t.Helper()
	if status.Code(err) != code {
		t.Fatalf("%s: got %v, want %v", what, err, code)
	}
}

// recvX509 receives one update of a stream opened with ctx.
func recvX509(t *testing.T, s delegatedv1.DelegatedIdentity_SubscribeToX509SVIDsClient) *delegatedv1.SubscribeToX509SVIDsResponse {
	t.Helper()
	resp, err := s.Recv()
	if err != nil {
		t.Fatalf("Recv: %v", err)
	}
	return resp
}

func TestDelegateGetsWorkloadX509SVIDs(t *testing.T) {
	env := newTestEnv(t, []spiffeid.ID{delegateID},
		attestkit.Entry(delegateID, 1, attestkit.MySelector()),
		attestkit.Entry(workloadID, 2, podSelector, tdFed))
	stream, err := env.client(t).SubscribeToX509SVIDs(testkit.Context(t, waitLimit), &delegatedv1.SubscribeToX509SVIDsRequest{Selectors: podSelectors()})
	if err != nil {
		t.Fatal(err)
	}
	resp := recvX509(t, stream)
	if len(resp.X509Svids) != 1 {
		t.Fatalf("got %d SVIDs, want 1", len(resp.X509Svids))
	}
	got := resp.X509Svids[0]
	if id := "spiffe://" + got.X509Svid.Id.TrustDomain + got.X509Svid.Id.Path; id != workloadID.String() {
		t.Errorf("SVID for %s, want %s", id, workloadID)
	}
	svid, err := x509svid.ParseRaw(concat(got.X509Svid.CertChain), got.X509SvidKey)
	if err != nil {
		t.Fatalf("the SVID and key do not parse: %v", err)
	}
	if _, _, err := x509svid.Verify(svid.Certificates, env.up.LocalBundle(t, td)); err != nil {
		t.Errorf("the SVID does not verify against the bundle: %v", err)
	}
	if got.X509Svid.ExpiresAt != svid.Certificates[0].NotAfter.Unix() {
		t.Errorf("expires_at %d, want %d", got.X509Svid.ExpiresAt, svid.Certificates[0].NotAfter.Unix())
	}
	if len(resp.FederatesWith) != 1 || resp.FederatesWith[0] != tdFed.IDString() {
		t.Errorf("federates_with %v, want [%s]", resp.FederatesWith, tdFed.IDString())
	}

	// A new entry for the workload reaches the delegate's stream.
	second := spiffeid.RequireFromPath(td, "/workload-2")
	env.cache.SetEntries([]*agent.Entry{attestkit.Entry(delegateID, 1, attestkit.MySelector()), attestkit.Entry(workloadID, 2, podSelector, tdFed), attestkit.Entry(second, 3, podSelector)})
	if resp := recvX509(t, stream); len(resp.X509Svids) != 2 {
		t.Fatalf("after a second entry: %d SVIDs, want 2", len(resp.X509Svids))
	}

	// Dropping the delegate's entry ends the stream: it is re-checked on
	// every update.
	env.cache.SetEntries([]*agent.Entry{attestkit.Entry(workloadID, 2, podSelector)})
	for {
		_, err := stream.Recv()
		if err != nil {
			wantCode(t, err, codes.PermissionDenied, "stream after the delegate's entry went")
			break
		}
	}
}

func concat(chain [][]byte) []byte {
	var out []byte
	for _, c := range chain {
		out = append(out, c...)
	}
	return out
}

func TestWorkloadWithNoEntryGetsEmptyUpdate(t *testing.T) {
	env := newTestEnv(t, []spiffeid.ID{delegateID}, attestkit.Entry(delegateID, 1, attestkit.MySelector()))
	stream, err := env.client(t).SubscribeToX509SVIDs(testkit.Context(t, waitLimit), &delegatedv1.SubscribeToX509SVIDsRequest{Selectors: podSelectors()})
	if err != nil {
		t.Fatal(err)
	}
	if resp := recvX509(t, stream); len(resp.X509Svids) != 0 {
		t.Fatalf("got %d SVIDs for a workload with no entry", len(resp.X509Svids))
	}
	env.cache.SetEntries([]*agent.Entry{attestkit.Entry(delegateID, 1, attestkit.MySelector()), attestkit.Entry(workloadID, 2, podSelector)})
	if resp := recvX509(t, stream); len(resp.X509Svids) != 1 {
		t.Fatalf("after its entry came: %d SVIDs, want 1", len(resp.X509Svids))
	}
}

func TestNonDelegatesAreRefused(t *testing.T) {
	other := spiffeid.RequireFromPath(td, "/not-a-delegate")
	tests := []struct {
		name    string
		entries []*agent.Entry
	}{
		{"no entry", []*agent.Entry{attestkit.Entry(workloadID, 2, podSelector)}},
		{"entry not authorized", []*agent.Entry{attestkit.Entry(other, 1, attestkit.MySelector()), attestkit.Entry(workloadID, 2, podSelector)}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			env := newTestEnv(t, []spiffeid.ID{delegateID}, tt.entries...)
			c := env.client(t)
			ctx := testkit.Context(t, waitLimit)
			_, err := c.FetchJWTSVIDs(ctx, &delegatedv1.FetchJWTSVIDsRequest{Audience: []string{"a"}, Selectors: podSelectors()})
			wantCode(t, err, codes.PermissionDenied, "FetchJWTSVIDs")
			streams := map[string]func() error{
				"SubscribeToX509SVIDs": func() error {
					s, err := c.SubscribeToX509SVIDs(ctx, &delegatedv1.SubscribeToX509SVIDsRequest{Selectors: podSelectors()})
					return testkit.FirstRecv(s, err)
				},
				"SubscribeToX509Bundles": func() error {
					s, err := c.SubscribeToX509Bundles(ctx, &delegatedv1.SubscribeToX509BundlesRequest{})
					return testkit.FirstRecv(s, err)
				},
				"SubscribeToJWTBundles": func() error {
					s, err := c.SubscribeToJWTBundles(ctx, &delegatedv1.SubscribeToJWTBundlesRequest{})
					return testkit.FirstRecv(s, err)
				},
			}
			for name, call := range streams {
				wantCode(t, call(), codes.PermissionDenied, name)
			}
		})
	}
}

func TestMalformedRequests(t *testing.T) {
	env := newTestEnv(t, []spiffeid.ID{delegateID}, attestkit.Entry(delegateID, 1, attestkit.MySelector()), attestkit.Entry(workloadID, 2, podSelector))
	c := env.client(t)
	ctx := testkit.Context(t, waitLimit)
	x509 := map[string]*delegatedv1.SubscribeToX509SVIDsRequest{
		"neither":             {},
		"both":                {Selectors: podSelectors(), Pid: 1},
		"selector with colon": {Selectors: []*types.Selector{{Type: "k8s:ns", Value: "x"}}},
		"empty value":         {Selectors: []*types.Selector{{Type: "k8s"}}},
		"long value":          {Selectors: []*types.Selector{{Type: "k8s", Value: strings.Repeat("v", 2<<10)}}},
		"long type":           {Selectors: []*types.Selector{{Type: strings.Repeat("t", 65), Value: "v"}}},
		"long in all":         {Selectors: slices.Repeat([]*types.Selector{{Type: "k8s", Value: strings.Repeat("v", 1000)}}, 9)},
		"too many":            {Selectors: slices.Repeat(podSelectors(), 65)},
		"negative pid":        {Pid: -1},
	}
	for name, req := range x509 {
		s, err := c.SubscribeToX509SVIDs(ctx, req)
		wantCode(t, testkit.FirstRecv(s, err), codes.InvalidArgument, "SubscribeToX509SVIDs "+name)
	}
	jwt := map[string]*delegatedv1.FetchJWTSVIDsRequest{
		"no audience":    {Selectors: podSelectors()},
		"empty audience": {Audience: []string{""}, Selectors: podSelectors()},
		"neither":        {Audience: []string{"a"}},
		"both":           {Audience: []string{"a"}, Selectors: podSelectors(), Pid: 1},
		"too many":       {Audience: slices.Repeat([]string{"a"}, 33), Selectors: podSelectors()},
		"long audience":  {Audience: []string{strings.Repeat("a", 5<<10)}, Selectors: podSelectors()},
	}
	for name, req := range jwt {
		_, err := c.FetchJWTSVIDs(ctx, req)
		wantCode(t, err, codes.InvalidArgument, "FetchJWTSVIDs "+name)
	}
}

func TestFetchJWTSVIDs(t *testing.T) {
	env := newTestEnv(t, []spiffeid.ID{delegateID}, attestkit.Entry(delegateID, 1, attestkit.MySelector()), attestkit.Entry(workloadID, 2, podSelector))
	resp, err := env.client(t).FetchJWTSVIDs(testkit.Context(t, waitLimit), &delegatedv1.FetchJWTSVIDsRequest{Audience: []string{"spire-test"}, Selectors: podSelectors()})
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Svids) != 1 || resp.Svids[0].Token == "" || resp.Svids[0].Id.Path != workloadID.Path() || resp.Svids[0].ExpiresAt <= resp.Svids[0].IssuedAt {
		t.Fatalf("FetchJWTSVIDs = %v", resp.Svids)
	}
	_, err = env.client(t).FetchJWTSVIDs(testkit.Context(t, waitLimit), &delegatedv1.FetchJWTSVIDsRequest{Audience: []string{"a"}, Selectors: []*types.Selector{{Type: "k8s", Value: "pod-uid:none"}}})
	wantCode(t, err, codes.PermissionDenied, "FetchJWTSVIDs for selectors no entry has")
}

func TestBundleStreams(t *testing.T) {
	env := newTestEnv(t, []spiffeid.ID{delegateID}, attestkit.Entry(delegateID, 1, attestkit.MySelector()))
	c := env.client(t)
	ctx := testkit.Context(t, waitLimit)
	xs, err := c.SubscribeToX509Bundles(ctx, &delegatedv1.SubscribeToX509BundlesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	xr, err := xs.Recv()
	if err != nil {
		t.Fatal(err)
	}
	// Every bundle, the federated one too, though no entry federates.
	if len(xr.CaCertificates) != 2 || xr.CaCertificates[tdFed.IDString()] == nil {
		t.Fatalf("X.509 bundles for %v, want example.org and other.org", keys(xr.CaCertificates))
	}
	roots, err := x509.ParseCertificates(xr.CaCertificates[td.IDString()])
	if err != nil || len(roots) == 0 || !roots[0].Equal(env.up.CA().Cert) {
		t.Errorf("local X.509 bundle: %d roots, %v", len(roots), err)
	}
	js, err := c.SubscribeToJWTBundles(ctx, &delegatedv1.SubscribeToJWTBundlesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	jr, err := js.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if len(jr.Bundles) != 2 {
		t.Fatalf("JWT bundles for %v, want 2", keys(jr.Bundles))
	}
	if _, err := spiffebundle.Parse(td, jr.Bundles[td.IDString()]); err != nil {
		t.Errorf("local JWKS: %v", err)
	}

	// A new CA reaches the X.509 bundle stream.
	ca2 := testkit.NewTrustDomainCA(t, td, testkit.WithCommonName("ca 2"))
	env.cache.SetBundles(env.up.LocalBundle(t, td, env.up.CA().Cert, ca2.Cert), nil)
	xr, err = xs.Recv()
	if err != nil {
		t.Fatal(err)
	}
	roots, _ = x509.ParseCertificates(xr.CaCertificates[td.IDString()])
	if len(roots) != 2 {
		t.Errorf("after a CA was added: %d roots, want 2", len(roots))
	}
}

func keys[V any](m map[string]V) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

func TestAdminSocketServesNoWorkloadAPI(t *testing.T) {
	env := newTestEnv(t, []spiffeid.ID{delegateID}, attestkit.Entry(delegateID, 1, attestkit.MySelector()))
	c := workload.NewSpiffeWorkloadAPIClient(testkit.Dial(t, env.socket))
	ctx := metadata.AppendToOutgoingContext(testkit.Context(t, waitLimit), "workload.spiffe.io", "true")
	s, err := c.FetchX509SVID(ctx, &workload.X509SVIDRequest{})
	if err == nil {
		_, err = s.Recv()
	}
	if errors.Is(err, io.EOF) || status.Code(err) != codes.Unimplemented {
		t.Fatalf("FetchX509SVID on the admin socket: %v, want Unimplemented", err)
	}
}

func TestDelegateByPID(t *testing.T) {
	// The child has the test's uid, and so the delegate's selector too.
	env := newTestEnv(t, []spiffeid.ID{delegateID}, attestkit.Entry(delegateID, 1, attestkit.MySelector()))
	pid, stop := testkit.StartSleeper(t)
	c := env.client(t)
	ctx := testkit.Context(t, waitLimit)

	jwt, err := c.FetchJWTSVIDs(ctx, &delegatedv1.FetchJWTSVIDsRequest{Audience: []string{"a"}, Pid: pid})
	if err != nil || len(jwt.Svids) != 1 || jwt.Svids[0].Id.Path != delegateID.Path() {
		t.Fatalf("FetchJWTSVIDs by pid: %v, %v", jwt, err)
	}
	stream, err := c.SubscribeToX509SVIDs(ctx, &delegatedv1.SubscribeToX509SVIDsRequest{Pid: pid})
	if err != nil {
		t.Fatal(err)
	}
	if resp := recvX509(t, stream); len(resp.X509Svids) != 1 || resp.X509Svids[0].X509Svid.Id.Path != delegateID.Path() {
		t.Fatalf("SubscribeToX509SVIDs by pid: %v", resp.X509Svids)
	}
	// The process's end ends its subscription.
	stop()
	_, err = stream.Recv()
	wantCode(t, err, codes.NotFound, "the stream of a process that exited")

	_, err = c.FetchJWTSVIDs(ctx, &delegatedv1.FetchJWTSVIDsRequest{Audience: []string{"a"}, Pid: pid})
	wantCode(t, err, codes.NotFound, "FetchJWTSVIDs for a process that exited")
	s, err := c.SubscribeToX509SVIDs(ctx, &delegatedv1.SubscribeToX509SVIDsRequest{Pid: pid})
	wantCode(t, testkit.FirstRecv(s, err), codes.NotFound, "SubscribeToX509SVIDs for a process that exited")
}
