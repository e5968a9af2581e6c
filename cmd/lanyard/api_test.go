package main

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/x509"
	"encoding/pem"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health"
	"google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
)

const (
	apiTestID    = "spiffe://example.org/workload"
	apiTestID2   = "spiffe://example.org/rotated"
	apiTestFedTD = "spiffe://fed.test"
	apiTestKID   = "test-kid-1"
)

// apiTestPKI holds a real CA, a federated CA and a JWT signing key.
type apiTestPKI struct {
	td     spiffeid.TrustDomain
	ca     *testkit.CA
	fed    *testkit.CA
	jwtKey *ecdsa.PrivateKey
}

func newAPITestPKI(t *testing.T) *apiTestPKI {
	return &apiTestPKI{
		td:     spiffeid.RequireTrustDomainFromString("example.org"),
		ca:     testkit.NewCA(t, "spiffe://example.org"),
		fed:    testkit.NewCA(t, apiTestFedTD),
		jwtKey: testkit.NewKey(t),
	}
}

// leaf issues an X509-SVID and returns its DER and PKCS#8 key.
func (p *apiTestPKI) leaf(t *testing.T, id string) ([]byte, []byte) {
	t.Helper()
	cert, key := p.ca.SVID(t, id, time.Hour)
	return cert.Raw, testkit.PKCS8(t, key)
}

func (p *apiTestPKI) x509Response(t *testing.T, id, hint string) *workload.X509SVIDResponse {
	der, key := p.leaf(t, id)
	return &workload.X509SVIDResponse{
		Svids: []*workload.X509SVID{{
			SpiffeId:    id,
			X509Svid:    der,
			X509SvidKey: key,
			Bundle:      p.ca.Cert.Raw,
			Hint:        hint,
		}},
		FederatedBundles: map[string][]byte{apiTestFedTD: p.fed.Cert.Raw},
	}
}

func (p *apiTestPKI) signJWT(t *testing.T, key *ecdsa.PrivateKey, sub string, aud []string) string {
	t.Helper()
	now := time.Now()
	tok, err := testkit.SignJWT(key, apiTestKID, sub, aud, now, now.Add(5*time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func (p *apiTestPKI) jwtBundle(t *testing.T) *jwtbundle.Bundle {
	t.Helper()
	b := jwtbundle.New(p.td)
	if err := b.AddJWTAuthority(apiTestKID, p.jwtKey.Public()); err != nil {
		t.Fatal(err)
	}
	return b
}

// apiFakeServer is a Workload API server backed by apiTestPKI.
type apiFakeServer struct {
	workload.UnimplementedSpiffeWorkloadAPIServer
	t       *testing.T
	pki     *apiTestPKI
	x509    []*workload.X509SVIDResponse // sent in order on each stream
	denyAll bool

	mu      sync.Mutex
	jwtReqs []*workload.JWTSVIDRequest
}

func (f *apiFakeServer) FetchX509SVID(_ *workload.X509SVIDRequest, stream workload.SpiffeWorkloadAPI_FetchX509SVIDServer) error {
	if f.denyAll {
		return status.Error(codes.PermissionDenied, "no identity issued")
	}
	for _, r := range f.x509 {
		if err := stream.Send(r); err != nil {
			return err
		}
	}
	<-stream.Context().Done()
	return nil
}

func (f *apiFakeServer) FetchJWTSVID(_ context.Context, req *workload.JWTSVIDRequest) (*workload.JWTSVIDResponse, error) {
	f.mu.Lock()
	f.jwtReqs = append(f.jwtReqs, req)
	f.mu.Unlock()
	id := apiTestID
	if req.SpiffeId != "" {
		id = req.SpiffeId
	}
	return &workload.JWTSVIDResponse{Svids: []*workload.JWTSVID{{
		SpiffeId: id,
		Svid:     f.pki.signJWT(f.t, f.pki.jwtKey, id, req.Audience),
	}}}, nil
}

func (f *apiFakeServer) FetchJWTBundles(_ *workload.JWTBundlesRequest, stream workload.SpiffeWorkloadAPI_FetchJWTBundlesServer) error {
	jwks, err := f.pki.jwtBundle(f.t).Marshal()
	if err != nil {
		return status.Error(codes.Internal, err.Error())
	}
	if err := stream.Send(&workload.JWTBundlesResponse{Bundles: map[string][]byte{f.pki.td.IDString(): jwks}}); err != nil {
		return err
	}
	<-stream.Context().Done()
	return nil
}

func (f *apiFakeServer) ValidateJWTSVID(_ context.Context, req *workload.ValidateJWTSVIDRequest) (*workload.ValidateJWTSVIDResponse, error) {
	if req.Audience == "" || req.Svid == "" {
		return nil, status.Error(codes.InvalidArgument, "audience and svid are required")
	}
	svid, err := jwtsvid.ParseAndValidate(req.Svid, f.pki.jwtBundle(f.t), []string{req.Audience})
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	claims, err := structpb.NewStruct(svid.Claims)
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	return &workload.ValidateJWTSVIDResponse{SpiffeId: svid.ID.String(), Claims: claims}, nil
}

func apiRequireHeader(ctx context.Context) error {
	md, _ := metadata.FromIncomingContext(ctx)
	if v := md.Get("workload.spiffe.io"); len(v) != 1 || v[0] != "true" {
		return status.Error(codes.InvalidArgument, "security header missing from request")
	}
	return nil
}

// startFake serves f and the health service on a Unix socket in a temp dir.
func apiStartFake(t *testing.T, f *apiFakeServer) (string, *health.Server) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "api.sock")
	lis, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(
		grpc.UnaryInterceptor(func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
			if err := apiRequireHeader(ctx); err != nil {
				return nil, err
			}
			return h(ctx, req)
		}),
		grpc.StreamInterceptor(func(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, h grpc.StreamHandler) error {
			if err := apiRequireHeader(ss.Context()); err != nil {
				return err
			}
			return h(srv, ss)
		}),
	)
	workload.RegisterSpiffeWorkloadAPIServer(srv, f)
	hs := health.NewServer()
	grpc_health_v1.RegisterHealthServer(srv, hs)
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(srv.Stop)
	return sock, hs
}

func apiInvoke(t *testing.T, fn func([]string, *bytes.Buffer, *bytes.Buffer) int, args ...string) (int, string, string) {
	t.Helper()
	var out, errOut bytes.Buffer
	code := fn(args, &out, &errOut)
	t.Logf("args %q -> %d\nstdout:\n%s\nstderr:\n%s", args, code, out.String(), errOut.String())
	return code, out.String(), errOut.String()
}

func apiCmd(args []string, out, errOut *bytes.Buffer) int { return runAPI(args, out, errOut) }
func apiHealthCmd(args []string, out, errOut *bytes.Buffer) int {
	return runHealthcheck(args, out, errOut)
}

func apiReadPEM(t *testing.T, path string, wantMode os.FileMode) []*pem.Block {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != wantMode {
		t.Errorf("%s: mode %v, want %v", path, fi.Mode().Perm(), wantMode)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var blocks []*pem.Block
	for {
		var b *pem.Block
		b, data = pem.Decode(data)
		if b == nil {
			break
		}
		blocks = append(blocks, b)
	}
	if len(blocks) == 0 {
		t.Fatalf("%s holds no PEM blocks", path)
	}
	return blocks
}

func TestAPIFetchX509PrintsAndWrites(t *testing.T) {
	pki := newAPITestPKI(t)
	sock, _ := apiStartFake(t, &apiFakeServer{t: t, pki: pki, x509: []*workload.X509SVIDResponse{pki.x509Response(t, apiTestID, "internal")}})
	dir := filepath.Join(t.TempDir(), "out") // created by -write

	code, out, errOut := apiInvoke(t, apiCmd, "fetch", "x509", "-socketPath", sock, "-write", dir)
	if code != 0 {
		t.Fatalf("exit %d, stderr %q", code, errOut)
	}
	for _, want := range []string{
		"Received 1 svid after ",
		"SPIFFE ID:\t\t" + apiTestID + "\n",
		"Hint:\t\t\tinternal\n",
		"SVID Valid After:\t",
		"CA #1 Valid Until:\t" + pki.ca.Cert.NotAfter.String(),
		"[" + apiTestFedTD + "] CA #1 Valid After:\t",
		"Writing key #0 to file " + filepath.Join(dir, "svid.0.key") + ".",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("stdout lacks %q", want)
		}
	}

	certBlocks := apiReadPEM(t, filepath.Join(dir, "svid.0.pem"), 0o644)
	leaf, err := x509.ParseCertificate(certBlocks[0].Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != apiTestID {
		t.Errorf("written SVID has URIs %v, want %s", leaf.URIs, apiTestID)
	}
	keyBlocks := apiReadPEM(t, filepath.Join(dir, "svid.0.key"), 0o600)
	if keyBlocks[0].Type != "PRIVATE KEY" {
		t.Errorf("key PEM type %q, want PRIVATE KEY (PKCS#8)", keyBlocks[0].Type)
	}
	key, err := x509.ParsePKCS8PrivateKey(keyBlocks[0].Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if !key.(crypto.Signer).Public().(*ecdsa.PublicKey).Equal(leaf.PublicKey) {
		t.Error("written key does not match the written SVID")
	}
	bundle := apiReadPEM(t, filepath.Join(dir, "bundle.0.pem"), 0o644)
	if !bytes.Equal(bundle[0].Bytes, pki.ca.Cert.Raw) {
		t.Error("bundle.0.pem is not the trust domain CA")
	}
	fed := apiReadPEM(t, filepath.Join(dir, "federated_bundle.0.0.pem"), 0o644)
	if !bytes.Equal(fed[0].Bytes, pki.fed.Cert.Raw) {
		t.Error("federated_bundle.0.0.pem is not the federated CA")
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: apiTestPool(pki.ca.Cert), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		t.Errorf("written SVID does not chain to the written bundle: %v", err)
	}
	left, _ := filepath.Glob(filepath.Join(dir, ".*tmp*"))
	if len(left) != 0 {
		t.Errorf("temporary files left behind: %v", left)
	}
}

func apiTestPool(certs ...*x509.Certificate) *x509.CertPool {
	p := x509.NewCertPool()
	for _, c := range certs {
		p.AddCert(c)
	}
	return p
}

func TestAPIFetchX509FromEnvURIAndSilent(t *testing.T) {
	pki := newAPITestPKI(t)
	sock, _ := apiStartFake(t, &apiFakeServer{t: t, pki: pki, x509: []*workload.X509SVIDResponse{pki.x509Response(t, apiTestID, "")}})
	t.Setenv("SPIFFE_ENDPOINT_SOCKET", "unix://"+sock)

	code, out, errOut := apiInvoke(t, apiCmd, "fetch", "-silent")
	if code != 0 || out != "" {
		t.Fatalf("exit %d, stdout %q, stderr %q; want 0 and no output", code, out, errOut)
	}
	code, out, _ = apiInvoke(t, apiCmd, "fetch", "x509", "-socketPath", "unix://"+sock)
	if code != 0 || !strings.Contains(out, apiTestID) {
		t.Fatalf("unix URI -socketPath: exit %d, stdout %q", code, out)
	}
	if strings.Contains(out, "Hint:") {
		t.Error("printed a Hint line for an SVID without a hint")
	}
}

func TestAPIFetchX509Errors(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "missing.sock")
	code, _, errOut := apiInvoke(t, apiCmd, "fetch", "x509", "-socketPath", missing, "-timeout", "2s")
	want := "cannot reach the Workload API at unix://" + missing + ": "
	if code != 1 || !strings.Contains(errOut, want) || !strings.Contains(errOut, "is the agent running? (set -socketPath or SPIFFE_ENDPOINT_SOCKET)") {
		t.Errorf("missing socket: exit %d, stderr %q; want 1 and %q", code, errOut, want)
	}
	if strings.Count(strings.TrimSpace(errOut), "\n") != 0 {
		t.Errorf("error is not one line: %q", errOut)
	}

	pki := newAPITestPKI(t)
	sock, _ := apiStartFake(t, &apiFakeServer{t: t, pki: pki, denyAll: true})
	code, _, errOut = apiInvoke(t, apiCmd, "fetch", "x509", "-socketPath", sock)
	if code != 1 || !strings.Contains(errOut, "has no identity for this process: no identity issued") {
		t.Errorf("permission denied: exit %d, stderr %q", code, errOut)
	}
}

func TestAPIFetchJWT(t *testing.T) {
	pki := newAPITestPKI(t)
	fake := &apiFakeServer{t: t, pki: pki}
	sock, _ := apiStartFake(t, fake)

	code, out, errOut := apiInvoke(t, apiCmd, "fetch", "jwt", "-socketPath", sock, "-audience", "a", "-audience", "b,c", "-spiffeID", apiTestID2)
	if code != 0 {
		t.Fatalf("exit %d, stderr %q", code, errOut)
	}
	fake.mu.Lock()
	reqs := fake.jwtReqs
	fake.mu.Unlock()
	if len(reqs) != 1 || !reflect.DeepEqual(reqs[0].Audience, []string{"a", "b", "c"}) || reqs[0].SpiffeId != apiTestID2 {
		t.Fatalf("server saw requests %v, want audience [a b c] and spiffe_id %s", reqs, apiTestID2)
	}

	lines := strings.Split(out, "\n")
	if len(lines) < 4 || lines[0] != "token("+apiTestID2+"):" || lines[2] != "bundle(spiffe://example.org):" {
		t.Fatalf("unexpected layout:\n%s", out)
	}
	token := strings.TrimPrefix(lines[1], "\t")
	b, err := jwtbundle.Parse(pki.td, []byte(strings.TrimPrefix(lines[3], "\t")))
	if err != nil {
		t.Fatalf("printed bundle does not parse: %v", err)
	}
	svid, err := jwtsvid.ParseAndValidate(token, b, []string{"b"})
	if err != nil {
		t.Fatalf("printed token does not verify with the printed bundle: %v", err)
	}
	if svid.ID.String() != apiTestID2 {
		t.Errorf("token subject %s, want %s", svid.ID, apiTestID2)
	}
}

func TestAPIValidateJWT(t *testing.T) {
	pki := newAPITestPKI(t)
	sock, _ := apiStartFake(t, &apiFakeServer{t: t, pki: pki})
	token := pki.signJWT(t, pki.jwtKey, apiTestID, []string{"svc"})

	code, out, errOut := apiInvoke(t, apiCmd, "validate", "jwt", "-socketPath", sock, "-audience", "svc", "-svid", token)
	if code != 0 {
		t.Fatalf("exit %d, stderr %q", code, errOut)
	}
	for _, want := range []string{"SVID is valid.\n", "SPIFFE ID : " + apiTestID + "\n", `Claims    : {`, `"sub":"` + apiTestID + `"`, `"aud":"svc"`} {
		if !strings.Contains(out, want) {
			t.Errorf("stdout lacks %q", want)
		}
	}

	code, _, errOut = apiInvoke(t, apiCmd, "validate", "jwt", "-socketPath", sock, "-audience", "other", "-svid", token)
	if code != 1 || !strings.HasPrefix(errOut, "SVID is not valid: ") {
		t.Errorf("wrong audience: exit %d, stderr %q", code, errOut)
	}
	forged := pki.signJWT(t, testkit.NewKey(t), apiTestID, []string{"svc"})
	code, _, errOut = apiInvoke(t, apiCmd, "validate", "jwt", "-socketPath", sock, "-audience", "svc", "-svid", forged)
	if code != 1 || !strings.HasPrefix(errOut, "SVID is not valid: ") {
		t.Errorf("forged token: exit %d, stderr %q", code, errOut)
	}
}

func TestAPIWatchCount(t *testing.T) {
	pki := newAPITestPKI(t)
	sock, _ := apiStartFake(t, &apiFakeServer{t: t, pki: pki, x509: []*workload.X509SVIDResponse{
		pki.x509Response(t, apiTestID, ""),
		pki.x509Response(t, apiTestID2, ""),
	}})

	code, out, errOut := apiInvoke(t, apiCmd, "watch", "-socketPath", sock, "-count", "2", "-timeout", "20s")
	if code != 0 {
		t.Fatalf("exit %d, stderr %q", code, errOut)
	}
	if n := strings.Count(out, "Received 1 svid after "); n != 2 {
		t.Errorf("printed %d updates, want 2", n)
	}
	first, second := strings.Index(out, apiTestID+"\n"), strings.Index(out, apiTestID2+"\n")
	if first < 0 || second < first {
		t.Errorf("updates missing or out of order:\n%s", out)
	}
}

func TestAPIWatchTimeoutWithoutAgent(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "missing.sock")
	start := time.Now()
	code, _, errOut := apiInvoke(t, apiCmd, "watch", "-socketPath", missing, "-timeout", "300ms")
	if code != 1 || !strings.Contains(errOut, "no X.509-SVID from the Workload API at unix://"+missing+" within 300ms; giving up") ||
		!strings.Contains(errOut, "cannot reach the Workload API") {
		t.Errorf("exit %d, stderr %q", code, errOut)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("took %s to give up", d)
	}
}

func TestHealthcheckCommand(t *testing.T) {
	pki := newAPITestPKI(t)
	sock, hs := apiStartFake(t, &apiFakeServer{t: t, pki: pki})

	code, out, errOut := apiInvoke(t, apiHealthCmd, "-socketPath", sock, "-shallow", "-verbose")
	if code != 0 || !strings.HasSuffix(out, "Agent is healthy.\n") || errOut != "" {
		t.Errorf("healthy: exit %d, stdout %q, stderr %q", code, out, errOut)
	}

	hs.SetServingStatus("", grpc_health_v1.HealthCheckResponse_NOT_SERVING)
	code, _, errOut = apiInvoke(t, apiHealthCmd, "-socketPath", "unix://"+sock)
	if code != 1 || errOut != "Agent is unhealthy: agent returned status \"NOT_SERVING\"\n" {
		t.Errorf("not serving: exit %d, stderr %q", code, errOut)
	}

	missing := filepath.Join(t.TempDir(), "missing.sock")
	code, out, errOut = apiInvoke(t, apiHealthCmd, "-socketPath", missing)
	if code != 1 || out != "" || !strings.HasPrefix(errOut, "Agent is unhealthy: cannot reach the agent at unix://"+missing) {
		t.Errorf("no socket: exit %d, stdout %q, stderr %q", code, out, errOut)
	}
}

func TestAPIUsageErrors(t *testing.T) {
	for _, tc := range []struct {
		fn   func([]string, *bytes.Buffer, *bytes.Buffer) int
		args []string
		code int
		want string
	}{
		{apiCmd, nil, 2, "Usage: lanyard api <command>"},
		{apiCmd, []string{"bogus"}, 2, `unknown command "api bogus"`},
		{apiCmd, []string{"fetch", "svid"}, 2, `unknown command "api fetch svid"`},
		{apiCmd, []string{"validate", "x509"}, 2, "api validate jwt"},
		{apiCmd, []string{"fetch", "jwt", "-socketPath", "/nonexistent"}, 2, "-audience is required"},
		{apiCmd, []string{"fetch", "jwt", "-audience", "a", "-spiffeID", "not-an-id"}, 2, "invalid -spiffeID"},
		{apiCmd, []string{"validate", "jwt", "-audience", "a"}, 2, "-svid is required"},
		{apiCmd, []string{"fetch", "x509", "-nope"}, 2, "flag provided but not defined: -nope"},
		{apiCmd, []string{"fetch", "x509", "extra"}, 2, `unexpected argument "extra"`},
		{apiCmd, []string{"watch", "-count", "-1"}, 2, "-count must not be negative"},
		{apiCmd, []string{"fetch", "jwt", "-audience", "a", "-timeout", "-1s"}, 2, "-timeout must not be negative"},
		{apiHealthCmd, []string{"-timeout", "-1s"}, 2, "-timeout must not be negative"},
		{apiCmd, []string{"fetch", "x509", "-h"}, 0, "Usage: lanyard api fetch x509 [flags]"},
		{apiHealthCmd, []string{"-bogus"}, 2, "Usage: lanyard healthcheck"},
		{apiHealthCmd, []string{"-socketPath", "unix://host/x"}, 1, "three slashes"},
	} {
		code, _, errOut := apiInvoke(t, tc.fn, tc.args...)
		if code != tc.code || !strings.Contains(errOut, tc.want) {
			t.Errorf("%q: exit %d, stderr %q; want %d and %q", tc.args, code, errOut, tc.code, tc.want)
		}
	}
}

func TestAPIWorkloadAddress(t *testing.T) {
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for in, want := range map[string]string{
		"/run/a b/api.sock":  "unix:///run/a%20b/api.sock",
		"unix:///run/x.sock": "unix:///run/x.sock",
		"rel.sock":           "unix://" + filepath.Join(wd, "rel.sock"),
		"tcp://127.0.0.1:81": "tcp://127.0.0.1:81",
	} {
		got, err := workloadAddress(in)
		if err != nil || got != want {
			t.Errorf("workloadAddress(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "unix://host/x", "http://x/y", "tcp://host:81", "unix:rel"} {
		if got, err := workloadAddress(bad); err == nil {
			t.Errorf("workloadAddress(%q) = %q, want an error", bad, got)
		}
	}
}
