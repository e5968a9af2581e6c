package workloadapi

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/x509"
	"encoding/pem"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/attestor/selector"
	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	grpcstatus "google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
)

// sdsEnv is the test environment with an SDS client: the upstream has no
// JWT key, as the SDS tests sign no JWT-SVIDs.
type sdsEnv struct {
	*testEnv
	client secretv3.SecretDiscoveryServiceClient
}

func newSDSEnv(t *testing.T, entries []*agent.Entry, federated ...*spiffebundle.Bundle) *sdsEnv {
	t.Helper()
	e := newTestEnv(t, envOptions{entries: entries, federated: federated, noJWTKey: true})
	return &sdsEnv{testEnv: e, client: secretv3.NewSecretDiscoveryServiceClient(testkit.Dial(t, e.socket))}
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
	case <-time.After(waitLimit):
		t.Fatalf("%s: no response within %s", what, waitLimit)
	}
	return nil
}

func (st *sdsStream) quiet(t *testing.T, what string) {
	t.Helper()
	select {
	case r := <-st.ch:
		t.Fatalf("%s: want no response, got %v (error %v)", what, r.resp, r.err)
	case <-time.After(quietFor):
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
	case <-time.After(waitLimit):
		t.Fatalf("%s: the stream did not end within %s", what, waitLimit)
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
func checkTLSCertificate(t *testing.T, s *tlsv3.Secret, id string, ca *testkit.CA) *x509.Certificate {
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
	roots.AddCert(ca.Cert)
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
	entry := newEntry("/svc", 1, mySelector())
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
	if cas := trustedCA(t, got["ROOTCA"]); !sameCerts(cas, e.ca.Cert) {
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
	ca2 := testkit.NewTrustDomainCA(t, tdExample)
	e.up.SetCA(ca2)
	e.cache.SetBundles(ca2.Bundle(tdExample), nil)
	for i := 0; ; i++ {
		if i == 5 {
			t.Fatal("no SVID from the new CA in 5 responses")
		}
		resp = st.next(t, "CA rotation")
		got = secrets(t, resp)
		if !sameCerts(trustedCA(t, got["ROOTCA"]), ca2.Cert) {
			continue
		}
		if chain := parsePEMCerts(t, got["default"].GetTlsCertificate().GetCertificateChain().GetInlineBytes()); chain[0].CheckSignatureFrom(ca2.Cert) == nil {
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
	e := newSDSEnv(t, []*agent.Entry{newEntry("/svc", 1, mySelector())})
	st := e.stream(t)
	st.send(t, &discoveryv3.DiscoveryRequest{ResourceNames: []string{"default"}})
	first := st.next(t, "first response")

	st.send(t, &discoveryv3.DiscoveryRequest{
		ResourceNames: []string{"default"}, ResponseNonce: first.Nonce,
		ErrorDetail: &status.Status{Code: int32(codes.InvalidArgument), Message: "bad certificate from the test"},
	})
	st.quiet(t, "after a NACK")
	testkit.WaitFor(t, waitLimit, "the NACK's error detail in the log", func() bool { return strings.Contains(e.logs.String(), "bad certificate from the test") })

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
	e.cache.SetEntries([]*agent.Entry{newEntry("/svc", 1, mySelector()), newEntry("/two", 2, mySelector(), tdOther)})
	e.cache.SetBundles(e.ca.Bundle(tdExample), []*spiffebundle.Bundle{testkit.NewTrustDomainCA(t, tdOther).Bundle(tdOther)})
	resp = st.next(t, "after a change")
	if v := mustAtoi(t, resp.VersionInfo); v <= mustAtoi(t, first.VersionInfo) {
		t.Fatalf("version %d after %s", v, first.VersionInfo)
	}
}

// FetchSecrets answers once, without version or nonce.
func TestSDSFetchSecrets(t *testing.T) {
	entry := newEntry("/svc", 1, mySelector())
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
	a, b := newEntry("/a", 1, mySelector()), newEntry("/b", 2, mySelector())
	e := newSDSEnv(t, []*agent.Entry{a, b, newEntry("/not-mine", 3, selector.Selector{Type: "unix", Value: "uid:4242424"})})

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
	otherCA, thirdCA := testkit.NewTrustDomainCA(t, tdOther), testkit.NewTrustDomainCA(t, tdThird)
	entry := newEntry("/svc", 1, mySelector(), tdOther)
	e := newSDSEnv(t, []*agent.Entry{entry}, otherCA.Bundle(tdOther), thirdCA.Bundle(tdThird))
	want := []string{"ALL", "ROOTCA", "spiffe://example.org", "spiffe://other.org"}

	st := e.stream(t)
	st.send(t, &discoveryv3.DiscoveryRequest{Node: envoyNode(30, nil), ResourceNames: want})
	got := secrets(t, st.next(t, "SPIFFE validator"))
	if !slices.Equal(names(got), want) {
		t.Fatalf("secrets %v, want %v", names(got), want)
	}
	for name, wantTD := range map[string]string{"ROOTCA": "example.org", "spiffe://example.org": "example.org", "spiffe://other.org": "other.org"} {
		tds, cas := spiffeValidator(t, got[name])
		wantCA := e.ca.Cert
		if wantTD == "other.org" {
			wantCA = otherCA.Cert
		}
		if !slices.Equal(tds, []string{wantTD}) || !sameCerts(cas[0], wantCA) {
			t.Fatalf("%s: trust domains %v, want %s with its CA", name, tds, wantTD)
		}
	}
	// ALL is every bundle the caller may see: not third.org.
	tds, cas := spiffeValidator(t, got["ALL"])
	if !slices.Equal(tds, []string{"example.org", "other.org"}) || !sameCerts(cas[0], e.ca.Cert) || !sameCerts(cas[1], otherCA.Cert) {
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
	if !sameCerts(trustedCA(t, got["spiffe://other.org"]), otherCA.Cert) || !sameCerts(trustedCA(t, got["ROOTCA"]), e.ca.Cert) {
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
	if !sameCerts(trustedCA(t, got["spiffe://other.org"]), otherCA.Cert) {
		t.Fatal("other.org: wrong CA")
	}
}

// A caller with no identity gets the trust domain's bundle, as from
// spire-agent, and PermissionDenied for anything else.
func TestSDSNoIdentity(t *testing.T) {
	e := newSDSEnv(t, []*agent.Entry{newEntry("/svc", 1, selector.Selector{Type: "unix", Value: "uid:4242424"})})
	resp, err := e.client.FetchSecrets(t.Context(), &discoveryv3.DiscoveryRequest{ResourceNames: []string{"ROOTCA"}})
	if err != nil {
		t.Fatal(err)
	}
	if got := secrets(t, resp); !sameCerts(trustedCA(t, got["ROOTCA"]), e.ca.Cert) {
		t.Fatal("ROOTCA: wrong CA")
	}
	st := e.stream(t)
	st.send(t, &discoveryv3.DiscoveryRequest{ResourceNames: []string{"ROOTCA", "default"}})
	st.end(t, codes.PermissionDenied, "default without an identity")
}

// Shutdown ends open SDS streams with Unavailable, so Envoy reconnects.
func TestSDSShutdown(t *testing.T) {
	e := newSDSEnv(t, []*agent.Entry{newEntry("/svc", 1, mySelector())})
	st := e.stream(t)
	st.send(t, &discoveryv3.DiscoveryRequest{ResourceNames: []string{"default"}})
	st.next(t, "first response")
	go e.srv.Shutdown(2 * time.Second)
	st.end(t, codes.Unavailable, "on shutdown")
}
