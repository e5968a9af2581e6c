package workloadapi_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/attestor"
	"github.com/lanyard-dev/lanyard/attestor/selector"
	"github.com/lanyard-dev/lanyard/conf"
	unixattestor "github.com/lanyard-dev/lanyard/plugins/workloadattestor/unix"
	"github.com/lanyard-dev/lanyard/workloadapi"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	grpcstatus "google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
)

const (
	sdsWait  = 10 * time.Second       // bound on anything that must happen
	sdsQuiet = 300 * time.Millisecond // silence that shows nothing was sent
)

var (
	sdsTD      = spiffeid.RequireTrustDomainFromString("example.org")
	sdsOtherTD = spiffeid.RequireTrustDomainFromString("other.org")
	sdsThirdTD = spiffeid.RequireTrustDomainFromString("third.org")
)

type sdsCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

func newSDSCA(t *testing.T, td spiffeid.TrustDomain) *sdsCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tdURL, err := url.Parse(td.IDString())
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(time.Now().UnixNano()),
		Subject:               pkix.Name{CommonName: "CA of " + td.Name()},
		URIs:                  []*url.URL{tdURL},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &sdsCA{cert: cert, key: key}
}

func (ca *sdsCA) bundle(td spiffeid.TrustDomain) *spiffebundle.Bundle {
	return spiffebundle.FromX509Authorities(td, []*x509.Certificate{ca.cert})
}

// sdsUpstream signs X509-SVIDs with its current CA.
type sdsUpstream struct {
	mu     sync.Mutex
	ca     *sdsCA
	serial int64
}

// Resync reports false: the SDS test upstream's entries change only when the
// test sets them.
func (u *sdsUpstream) Resync(context.Context) (bool, error) { return false, nil }

func (u *sdsUpstream) Reconfigure(*conf.Section) error { return nil }

func (u *sdsUpstream) Run(ctx context.Context, _ agent.Sink) error {
	<-ctx.Done()
	return nil
}

func (u *sdsUpstream) MintX509SVIDs(_ context.Context, reqs []agent.X509Request) ([]agent.X509Result, error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	out := make([]agent.X509Result, len(reqs))
	for i, r := range reqs {
		ttl := cmpOr(r.Entry.X509SVIDTTL, time.Hour)
		id, err := url.Parse(r.Entry.SPIFFEID.String())
		if err != nil {
			return nil, err
		}
		u.serial++
		tmpl := &x509.Certificate{
			SerialNumber:          big.NewInt(u.serial),
			URIs:                  []*url.URL{id},
			NotBefore:             time.Now().Add(-time.Second),
			NotAfter:              time.Now().Add(ttl),
			KeyUsage:              x509.KeyUsageDigitalSignature,
			ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
			BasicConstraintsValid: true,
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, u.ca.cert, r.Key.Public(), u.ca.key)
		if err != nil {
			out[i].Err = err
			continue
		}
		leaf, err := x509.ParseCertificate(der)
		out[i] = agent.X509Result{Chain: []*x509.Certificate{leaf}, Err: err}
	}
	return out, nil
}

func (u *sdsUpstream) MintJWTSVID(context.Context, *agent.Entry, []string) (*agent.JWTSVID, error) {
	return nil, errors.New("the SDS tests sign no JWT-SVIDs")
}

func (u *sdsUpstream) setCA(ca *sdsCA) {
	u.mu.Lock()
	u.ca = ca
	u.mu.Unlock()
}

func cmpOr(d, def time.Duration) time.Duration {
	if d == 0 {
		return def
	}
	return d
}

// callerSelector is what the unix attestor reports for this test process.
func callerSelector() selector.Selector {
	return selector.Selector{Type: "unix", Value: "uid:" + strconv.Itoa(os.Getuid())}
}

func sdsEntry(path string, createdAt int64, sel selector.Selector, federates ...spiffeid.TrustDomain) *agent.Entry {
	return &agent.Entry{
		ID:            "entry" + strings.ReplaceAll(path, "/", "-"),
		SPIFFEID:      spiffeid.RequireFromPath(sdsTD, path),
		Selectors:     []selector.Selector{sel},
		FederatesWith: federates,
		CreatedAt:     createdAt,
	}
}

type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// sdsEnv is the agent's gRPC server on a real Unix socket, over a real
// cache and the real unix attestor.
type sdsEnv struct {
	up     *sdsUpstream
	ca     *sdsCA
	srv    *workloadapi.Server
	cache  *agent.SVIDManager
	client secretv3.SecretDiscoveryServiceClient
	logs   *lockedBuffer
}

func newSDSEnv(t *testing.T, entries []*agent.Entry, federated ...*spiffebundle.Bundle) *sdsEnv {
	t.Helper()
	logs := &lockedBuffer{}
	log := hclog.New(&hclog.LoggerOptions{Name: "test", Level: hclog.Debug, Output: logs})
	ca := newSDSCA(t, sdsTD)
	up := &sdsUpstream{ca: ca}
	cache := agent.NewSVIDManager(log.Named("cache"), up)
	cache.SetEntries(entries)
	cache.SetBundles(ca.bundle(sdsTD), federated)

	section, err := conf.NewSection("test.conf", "")
	if err != nil {
		t.Fatal(err)
	}
	wa, err := unixattestor.New(attestor.PluginConfig{Name: "unix", Data: section, Log: log.Named("unix"), TrustDomain: sdsTD})
	if err != nil {
		t.Fatal(err)
	}
	srv := workloadapi.NewServer(workloadapi.Config{
		Log:        log.Named("workloadapi"),
		Attestor:   attestor.NewMultiAttestor(log.Named("attestor"), attestor.DefaultTimeout, attestor.Plugin{Name: "unix", Attestor: wa}),
		Identities: cache,
	})
	// A short directory keeps the socket path under the 108-byte limit.
	dir, err := os.MkdirTemp("", "sds-")
	if err != nil {
		t.Fatal(err)
	}
	socket := filepath.Join(dir, "api.sock")
	l, err := agent.Listen(socket, 64, log.Named("listener"))
	if err != nil {
		os.RemoveAll(dir)
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		_ = cache.Rotator().Run(ctx)
	}()
	go func() {
		defer wg.Done()
		_ = srv.GRPC.Serve(l)
	}()
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		conn.Close()
		srv.Shutdown(2 * time.Second)
		cancel()
		wg.Wait()
		os.RemoveAll(dir)
		if t.Failed() {
			t.Logf("agent log:\n%s", logs.String())
		}
	})
	return &sdsEnv{up: up, ca: ca, srv: srv, cache: cache, client: secretv3.NewSecretDiscoveryServiceClient(conn), logs: logs}
}

const secretType = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"

// envoyNode is an Envoy of the given minor version (1.x).
func envoyNode(minor uint32, metadata map[string]any) *corev3.Node {
	node := &corev3.Node{
		Id:      "envoy-test",
		Cluster: "test",
		UserAgentVersionType: &corev3.Node_UserAgentBuildVersion{UserAgentBuildVersion: &corev3.BuildVersion{
			Version: &typev3.SemanticVersion{MajorNumber: 1, MinorNumber: minor},
		}},
	}
	if metadata != nil {
		md, err := structpb.NewStruct(metadata)
		if err != nil {
			panic(err)
		}
		node.Metadata = md
	}
	return node
}

// sdsStream is a StreamSecrets call read in the background.
type sdsStream struct {
	s  grpc.BidiStreamingClient[discoveryv3.DiscoveryRequest, discoveryv3.DiscoveryResponse]
	ch chan sdsRecv
}

type sdsRecv struct {
	resp *discoveryv3.DiscoveryResponse
	err  error
}

func (e *sdsEnv) stream(t *testing.T) *sdsStream {
	t.Helper()
	s, err := e.client.StreamSecrets(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	st := &sdsStream{s: s, ch: make(chan sdsRecv, 16)}
	done := t.Context().Done()
	go func() {
		for {
			resp, err := s.Recv()
			select {
			case st.ch <- sdsRecv{resp, err}:
			case <-done:
				return
			}
			if err != nil {
				return
			}
		}
	}()
	return st
}

func (st *sdsStream) send(t *testing.T, req *discoveryv3.DiscoveryRequest) {
	t.Helper()
	if req.TypeUrl == "" {
		req.TypeUrl = secretType
	}
	if err := st.s.Send(req); err != nil {
		t.Fatalf("sending an SDS request: %v", err)
	}
}

func (st *sdsStream) next(t *testing.T, what string) *discoveryv3.DiscoveryResponse {
	t.Helper()
	select {
	case r := <-st.ch:
		if r.err != nil {
			t.Fatalf("%s: the stream ended: %v", what, r.err)
		}
		return r.resp
	case <-time.After(sdsWait):
		t.Fatalf("%s: no response within %s", what, sdsWait)
	}
	return nil
}

func (st *sdsStream) quiet(t *testing.T, what string) {
	t.Helper()
	select {
	case r := <-st.ch:
		t.Fatalf("%s: want no response, got %v (error %v)", what, r.resp, r.err)
	case <-time.After(sdsQuiet):
	}
}

func (st *sdsStream) end(t *testing.T, code codes.Code, what string) error {
	t.Helper()
	select {
	case r := <-st.ch:
		if r.err == nil {
			t.Fatalf("%s: got a response, want the stream to end with %s", what, code)
		}
		if grpcstatus.Code(r.err) != code {
			t.Fatalf("%s: the stream ended with %v, want %s", what, r.err, code)
		}
		return r.err
	case <-time.After(sdsWait):
		t.Fatalf("%s: the stream did not end within %s", what, sdsWait)
	}
	return nil
}

// secrets unpacks a response's resources by name.
func secrets(t *testing.T, resp *discoveryv3.DiscoveryResponse) map[string]*tlsv3.Secret {
	t.Helper()
	if resp.TypeUrl != secretType {
		t.Fatalf("response type %q, want %q", resp.TypeUrl, secretType)
	}
	out := map[string]*tlsv3.Secret{}
	for _, a := range resp.Resources {
		if a.TypeUrl != secretType {
			t.Fatalf("resource type %q, want %q", a.TypeUrl, secretType)
		}
		s := &tlsv3.Secret{}
		if err := a.UnmarshalTo(s); err != nil {
			t.Fatal(err)
		}
		if _, dup := out[s.Name]; dup {
			t.Fatalf("secret %q sent twice", s.Name)
		}
		out[s.Name] = s
	}
	return out
}

func names(m map[string]*tlsv3.Secret) []string {
	out := make([]string, 0, len(m))
	for n := range m {
		out = append(out, n)
	}
	slices.Sort(out)
	return out
}

func parsePEMCerts(t *testing.T, data []byte) []*x509.Certificate {
	t.Helper()
	var certs []*x509.Certificate
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			t.Fatalf("PEM block %q, want CERTIFICATE", block.Type)
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		certs = append(certs, c)
	}
	if len(bytes.TrimSpace(data)) != 0 || len(certs) == 0 {
		t.Fatalf("want PEM certificates only, have %d certificates and %q left", len(certs), data)
	}
	return certs
}

// checkTLSCertificate checks the secret holds an SVID for id signed by ca,
// with its matching key, and returns the leaf.
func checkTLSCertificate(t *testing.T, s *tlsv3.Secret, id string, ca *sdsCA) *x509.Certificate {
	t.Helper()
	tc := s.GetTlsCertificate()
	if tc == nil {
		t.Fatalf("secret %q is not a TLS certificate: %v", s.Name, s)
	}
	chain := parsePEMCerts(t, tc.GetCertificateChain().GetInlineBytes())
	leaf := chain[0]
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != id {
		t.Fatalf("secret %q: leaf URIs %v, want %s", s.Name, leaf.URIs, id)
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca.cert)
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		t.Fatalf("secret %q: the leaf does not chain to the CA: %v", s.Name, err)
	}
	block, rest := pem.Decode(tc.GetPrivateKey().GetInlineBytes())
	if block == nil || block.Type != "PRIVATE KEY" || len(bytes.TrimSpace(rest)) != 0 {
		t.Fatalf("secret %q: the private key is not one PKCS#8 PEM block", s.Name)
	}
	key, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	ecKey, ok := key.(*ecdsa.PrivateKey)
	if !ok || !ecKey.PublicKey.Equal(leaf.PublicKey) {
		t.Fatalf("secret %q: the private key does not match the leaf", s.Name)
	}
	return leaf
}

// trustedCA returns the CAs of a plain validation context.
func trustedCA(t *testing.T, s *tlsv3.Secret) []*x509.Certificate {
	t.Helper()
	vc := s.GetValidationContext()
	if vc == nil || vc.CustomValidatorConfig != nil {
		t.Fatalf("secret %q is not a trusted-CA validation context: %v", s.Name, s)
	}
	return parsePEMCerts(t, vc.GetTrustedCa().GetInlineBytes())
}

// spiffeValidator returns the trust domains and CAs of a SPIFFE validator
// validation context, in order.
func spiffeValidator(t *testing.T, s *tlsv3.Secret) ([]string, [][]*x509.Certificate) {
	t.Helper()
	custom := s.GetValidationContext().GetCustomValidatorConfig()
	if custom == nil || custom.Name != "envoy.tls.cert_validator.spiffe" {
		t.Fatalf("secret %q has no SPIFFE validator: %v", s.Name, s)
	}
	cfg := &tlsv3.SPIFFECertValidatorConfig{}
	if err := custom.TypedConfig.UnmarshalTo(cfg); err != nil {
		t.Fatal(err)
	}
	var tds []string
	var cas [][]*x509.Certificate
	for _, td := range cfg.TrustDomains {
		tds = append(tds, td.Name)
		cas = append(cas, parsePEMCerts(t, td.GetTrustBundle().GetInlineBytes()))
	}
	return tds, cas
}

func sameCerts(got []*x509.Certificate, want ...*x509.Certificate) bool {
	return slices.EqualFunc(got, want, func(a, b *x509.Certificate) bool { return a.Equal(b) })
}

// Envoy's usual pair of secrets over one stream, then ACK, rotation and
// bundle change, each pushed as a new version; no security header is sent.
func TestSDSStreamDefaultAndRootCA(t *testing.T) {
	entry := sdsEntry("/svc", 1, callerSelector())
	entry.X509SVIDTTL = 3 * time.Second
	e := newSDSEnv(t, []*agent.Entry{entry})
	st := e.stream(t)
	st.send(t, &discoveryv3.DiscoveryRequest{Node: envoyNode(16, nil), ResourceNames: []string{"default", "ROOTCA"}})
	resp := st.next(t, "first response")
	if resp.VersionInfo != "1" || resp.Nonce == "" {
		t.Fatalf("version %q nonce %q, want version 1 and a nonce", resp.VersionInfo, resp.Nonce)
	}
	got := secrets(t, resp)
	if !slices.Equal(names(got), []string{"ROOTCA", "default"}) {
		t.Fatalf("secrets %v", names(got))
	}
	first := checkTLSCertificate(t, got["default"], entry.SPIFFEID.String(), e.ca)
	if cas := trustedCA(t, got["ROOTCA"]); !sameCerts(cas, e.ca.cert) {
		t.Fatalf("ROOTCA has %d CAs, not the trust domain's CA", len(cas))
	}

	// An ACK is answered with nothing.
	st.send(t, &discoveryv3.DiscoveryRequest{Node: envoyNode(16, nil), ResourceNames: []string{"ROOTCA", "default"}, VersionInfo: resp.VersionInfo, ResponseNonce: resp.Nonce})
	st.quiet(t, "after an ACK")

	// The SVID rotates at half its lifetime: a new version is pushed.
	last := resp
	var rotated *x509.Certificate
	for i := 0; rotated == nil; i++ {
		if i == 5 {
			t.Fatal("no rotated SVID in 5 responses")
		}
		resp = st.next(t, "rotation")
		if v, _ := strconv.Atoi(resp.VersionInfo); v <= mustAtoi(t, last.VersionInfo) || resp.Nonce == last.Nonce {
			t.Fatalf("version %q nonce %q after version %q nonce %q", resp.VersionInfo, resp.Nonce, last.VersionInfo, last.Nonce)
		}
		got = secrets(t, resp)
		if !slices.Equal(names(got), []string{"ROOTCA", "default"}) {
			t.Fatalf("secrets %v", names(got))
		}
		if leaf := checkTLSCertificate(t, got["default"], entry.SPIFFEID.String(), e.ca); leaf.SerialNumber.Cmp(first.SerialNumber) != 0 {
			rotated = leaf
		}
		st.send(t, &discoveryv3.DiscoveryRequest{ResourceNames: []string{"default", "ROOTCA"}, VersionInfo: resp.VersionInfo, ResponseNonce: resp.Nonce})
		last = resp
	}

	// A new CA: the bundle change is pushed, and SVIDs signed by it.
	ca2 := newSDSCA(t, sdsTD)
	e.up.setCA(ca2)
	e.cache.SetBundles(ca2.bundle(sdsTD), nil)
	for i := 0; ; i++ {
		if i == 5 {
			t.Fatal("no SVID from the new CA in 5 responses")
		}
		resp = st.next(t, "CA rotation")
		got = secrets(t, resp)
		if !sameCerts(trustedCA(t, got["ROOTCA"]), ca2.cert) {
			continue
		}
		if chain := parsePEMCerts(t, got["default"].GetTlsCertificate().GetCertificateChain().GetInlineBytes()); chain[0].CheckSignatureFrom(ca2.cert) == nil {
			checkTLSCertificate(t, got["default"], entry.SPIFFEID.String(), ca2)
			break
		}
	}
}

func mustAtoi(t *testing.T, s string) int {
	t.Helper()
	n, err := strconv.Atoi(s)
	if err != nil {
		t.Fatalf("version %q is not a counter: %v", s, err)
	}
	return n
}

// A NACK is logged and not answered; stale nonces are ignored; new names
// and later changes are still answered.
func TestSDSNACKAndStaleNonce(t *testing.T) {
	e := newSDSEnv(t, []*agent.Entry{sdsEntry("/svc", 1, callerSelector())})
	st := e.stream(t)
	st.send(t, &discoveryv3.DiscoveryRequest{ResourceNames: []string{"default"}})
	first := st.next(t, "first response")

	st.send(t, &discoveryv3.DiscoveryRequest{
		ResourceNames: []string{"default"}, ResponseNonce: first.Nonce,
		ErrorDetail: &status.Status{Code: int32(codes.InvalidArgument), Message: "bad certificate from the test"},
	})
	st.quiet(t, "after a NACK")
	deadline := time.Now().Add(sdsWait)
	for !strings.Contains(e.logs.String(), "bad certificate from the test") {
		if time.Now().After(deadline) {
			t.Fatal("the NACK's error detail was not logged")
		}
		time.Sleep(10 * time.Millisecond)
	}

	// A request naming other resources with a nonce that is not the last
	// one sent is stale and ignored.
	st.send(t, &discoveryv3.DiscoveryRequest{ResourceNames: []string{"ROOTCA"}, ResponseNonce: "stale"})
	st.quiet(t, "after a stale nonce")

	// New names with the current nonce are answered at the same version.
	st.send(t, &discoveryv3.DiscoveryRequest{ResourceNames: []string{"ROOTCA"}, ResponseNonce: first.Nonce})
	resp := st.next(t, "after new names")
	if resp.VersionInfo != first.VersionInfo || resp.Nonce == first.Nonce {
		t.Fatalf("version %q nonce %q after version %q nonce %q", resp.VersionInfo, resp.Nonce, first.VersionInfo, first.Nonce)
	}
	if got := secrets(t, resp); !slices.Equal(names(got), []string{"ROOTCA"}) {
		t.Fatalf("secrets %v", names(got))
	}

	// A change still reaches a stream whose last answer was rejected.
	e.cache.SetEntries([]*agent.Entry{sdsEntry("/svc", 1, callerSelector()), sdsEntry("/two", 2, callerSelector(), sdsOtherTD)})
	e.cache.SetBundles(e.ca.bundle(sdsTD), []*spiffebundle.Bundle{newSDSCA(t, sdsOtherTD).bundle(sdsOtherTD)})
	resp = st.next(t, "after a change")
	if v := mustAtoi(t, resp.VersionInfo); v <= mustAtoi(t, first.VersionInfo) {
		t.Fatalf("version %d after %s", v, first.VersionInfo)
	}
}

// FetchSecrets answers once, without version or nonce.
func TestSDSFetchSecrets(t *testing.T) {
	entry := sdsEntry("/svc", 1, callerSelector())
	e := newSDSEnv(t, []*agent.Entry{entry})
	resp, err := e.client.FetchSecrets(t.Context(), &discoveryv3.DiscoveryRequest{TypeUrl: secretType, ResourceNames: []string{"default"}})
	if err != nil {
		t.Fatal(err)
	}
	if resp.VersionInfo != "" || resp.Nonce != "" {
		t.Fatalf("version %q nonce %q, want neither", resp.VersionInfo, resp.Nonce)
	}
	got := secrets(t, resp)
	if !slices.Equal(names(got), []string{"default"}) {
		t.Fatalf("secrets %v", names(got))
	}
	checkTLSCertificate(t, got["default"], entry.SPIFFEID.String(), e.ca)

	_, err = e.client.FetchSecrets(t.Context(), &discoveryv3.DiscoveryRequest{TypeUrl: "type.googleapis.com/envoy.config.cluster.v3.Cluster"})
	if grpcstatus.Code(err) != codes.InvalidArgument {
		t.Fatalf("a request for clusters: %v, want InvalidArgument", err)
	}
}

// Identities by SPIFFE ID, the default only once per name; names the caller
// has no right to end the stream with InvalidArgument.
func TestSDSSPIFFEIDAndUnknownNames(t *testing.T) {
	a, b := sdsEntry("/a", 1, callerSelector()), sdsEntry("/b", 2, callerSelector())
	e := newSDSEnv(t, []*agent.Entry{a, b, sdsEntry("/not-mine", 3, selector.Selector{Type: "unix", Value: "uid:4242424"})})

	st := e.stream(t)
	st.send(t, &discoveryv3.DiscoveryRequest{ResourceNames: []string{b.SPIFFEID.String(), "default"}})
	got := secrets(t, st.next(t, "by SPIFFE ID"))
	if !slices.Equal(names(got), []string{"default", b.SPIFFEID.String()}) {
		t.Fatalf("secrets %v", names(got))
	}
	checkTLSCertificate(t, got[b.SPIFFEID.String()], b.SPIFFEID.String(), e.ca)
	checkTLSCertificate(t, got["default"], a.SPIFFEID.String(), e.ca) // the oldest entry

	for _, name := range []string{"spiffe://example.org/not-mine", "nope", "spiffe://third.org"} {
		st := e.stream(t)
		st.send(t, &discoveryv3.DiscoveryRequest{ResourceNames: []string{"default", name}})
		if err := st.end(t, codes.InvalidArgument, name); !strings.Contains(err.Error(), name) {
			t.Fatalf("the error does not name %q: %v", name, err)
		}
		_, err := e.client.FetchSecrets(t.Context(), &discoveryv3.DiscoveryRequest{ResourceNames: []string{name}})
		if grpcstatus.Code(err) != codes.InvalidArgument {
			t.Fatalf("FetchSecrets %q: %v, want InvalidArgument", name, err)
		}
	}

	st = e.stream(t)
	st.send(t, &discoveryv3.DiscoveryRequest{TypeUrl: "type.googleapis.com/envoy.config.listener.v3.Listener"})
	st.end(t, codes.InvalidArgument, "a request for listeners")

	ds, err := e.client.DeltaSecrets(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ds.Recv(); grpcstatus.Code(err) != codes.Unimplemented {
		t.Fatalf("DeltaSecrets: %v, want Unimplemented", err)
	}
}

// Trust domain IDs and ALL; the SPIFFE validator for Envoy 1.18 and later
// unless disabled by node metadata; empty names mean everything.
func TestSDSBundles(t *testing.T) {
	otherCA, thirdCA := newSDSCA(t, sdsOtherTD), newSDSCA(t, sdsThirdTD)
	entry := sdsEntry("/svc", 1, callerSelector(), sdsOtherTD)
	e := newSDSEnv(t, []*agent.Entry{entry}, otherCA.bundle(sdsOtherTD), thirdCA.bundle(sdsThirdTD))
	want := []string{"ALL", "ROOTCA", "spiffe://example.org", "spiffe://other.org"}

	st := e.stream(t)
	st.send(t, &discoveryv3.DiscoveryRequest{Node: envoyNode(30, nil), ResourceNames: want})
	got := secrets(t, st.next(t, "SPIFFE validator"))
	if !slices.Equal(names(got), want) {
		t.Fatalf("secrets %v, want %v", names(got), want)
	}
	for name, wantTD := range map[string]string{"ROOTCA": "example.org", "spiffe://example.org": "example.org", "spiffe://other.org": "other.org"} {
		tds, cas := spiffeValidator(t, got[name])
		wantCA := e.ca.cert
		if wantTD == "other.org" {
			wantCA = otherCA.cert
		}
		if !slices.Equal(tds, []string{wantTD}) || !sameCerts(cas[0], wantCA) {
			t.Fatalf("%s: trust domains %v, want %s with its CA", name, tds, wantTD)
		}
	}
	// ALL is every bundle the caller may see: not third.org.
	tds, cas := spiffeValidator(t, got["ALL"])
	if !slices.Equal(tds, []string{"example.org", "other.org"}) || !sameCerts(cas[0], e.ca.cert) || !sameCerts(cas[1], otherCA.cert) {
		t.Fatalf("ALL: trust domains %v", tds)
	}

	// Node metadata turns the validator off: plain trusted CAs.
	resp, err := e.client.FetchSecrets(t.Context(), &discoveryv3.DiscoveryRequest{
		Node:          envoyNode(30, map[string]any{"disable_spiffe_cert_validation": true}),
		ResourceNames: []string{"spiffe://other.org", "ROOTCA"},
	})
	if err != nil {
		t.Fatal(err)
	}
	got = secrets(t, resp)
	if !sameCerts(trustedCA(t, got["spiffe://other.org"]), otherCA.cert) || !sameCerts(trustedCA(t, got["ROOTCA"]), e.ca.cert) {
		t.Fatal("wrong trusted CAs with the SPIFFE validator disabled")
	}

	// ALL cannot be expressed without the validator.
	for _, node := range []*corev3.Node{nil, envoyNode(17, nil), envoyNode(30, map[string]any{"disable_spiffe_cert_validation": "true"})} {
		_, err := e.client.FetchSecrets(t.Context(), &discoveryv3.DiscoveryRequest{Node: node, ResourceNames: []string{"ALL"}})
		if grpcstatus.Code(err) != codes.FailedPrecondition {
			t.Fatalf("ALL for node %v: %v, want FailedPrecondition", node, err)
		}
	}

	// No names: every bundle and identity under its own ID.
	st = e.stream(t)
	st.send(t, &discoveryv3.DiscoveryRequest{})
	got = secrets(t, st.next(t, "no names"))
	if all := []string{"spiffe://example.org", "spiffe://example.org/svc", "spiffe://other.org"}; !slices.Equal(names(got), all) {
		t.Fatalf("secrets %v, want %v", names(got), all)
	}
	checkTLSCertificate(t, got["spiffe://example.org/svc"], "spiffe://example.org/svc", e.ca)
	if !sameCerts(trustedCA(t, got["spiffe://other.org"]), otherCA.cert) {
		t.Fatal("other.org: wrong CA")
	}
}

// A caller with no identity gets the trust domain's bundle, as from
// spire-agent, and PermissionDenied for anything else.
func TestSDSNoIdentity(t *testing.T) {
	e := newSDSEnv(t, []*agent.Entry{sdsEntry("/svc", 1, selector.Selector{Type: "unix", Value: "uid:4242424"})})
	resp, err := e.client.FetchSecrets(t.Context(), &discoveryv3.DiscoveryRequest{ResourceNames: []string{"ROOTCA"}})
	if err != nil {
		t.Fatal(err)
	}
	if got := secrets(t, resp); !sameCerts(trustedCA(t, got["ROOTCA"]), e.ca.cert) {
		t.Fatal("ROOTCA: wrong CA")
	}
	st := e.stream(t)
	st.send(t, &discoveryv3.DiscoveryRequest{ResourceNames: []string{"ROOTCA", "default"}})
	st.end(t, codes.PermissionDenied, "default without an identity")
}

// Shutdown ends open SDS streams with Unavailable, so Envoy reconnects.
func TestSDSShutdown(t *testing.T) {
	e := newSDSEnv(t, []*agent.Entry{sdsEntry("/svc", 1, callerSelector())})
	st := e.stream(t)
	st.send(t, &discoveryv3.DiscoveryRequest{ResourceNames: []string{"default"}})
	st.next(t, "first response")
	go e.srv.Shutdown(2 * time.Second)
	st.end(t, codes.Unavailable, "on shutdown")
}
