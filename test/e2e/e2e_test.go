package e2e

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/json"
	"github.com/lanyard-dev/lanyard/internal/testkit"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/grpc/status"
)

// agentBlock is the agent block every test's config starts with.
const agentBlock = `
agent {
  trust_domain = "example.org"
  data_dir     = "@DATA@"
  socket_path  = "@SOCKET@"
  log_level    = "debug"
}
`

const baseConfig = agentBlock + `plugins {
  WorkloadAttestor "unix" { plugin_data { discover_workload_path = true } }
  UpstreamAuthority "local" {
    plugin_data {
      x509_svid_ttl = "1h"
      jwt_svid_ttl  = "5m"
      entry {
        spiffe_id = "spiffe://example.org/user/@UID@"
        selectors = ["unix:uid:@UID@"]
      }
    }
  }
}
`

var userID = spiffeid.RequireFromString("spiffe://example.org/user/" + itoa(os.Getuid()))

func itoa(i int) string { return strconv.Itoa(i) }

func TestFetchAndValidateX509AndJWT(t *testing.T) {
	a := startAgent(t, baseConfig)
	c := a.client(t)
	ctx := testContext(t)

	x509ctx, err := c.FetchX509Context(ctx)
	if err != nil {
		t.Fatal(err)
	}
	svid := x509ctx.DefaultSVID()
	if svid.ID != userID {
		t.Fatalf("SVID ID = %s, want %s", svid.ID, userID)
	}
	if _, _, err := x509svid.Verify(svid.Certificates, x509ctx.Bundles); err != nil {
		t.Fatalf("the X509-SVID does not verify against the fetched bundle: %v", err)
	}
	if !svid.PrivateKey.Public().(*ecdsa.PublicKey).Equal(svid.Certificates[0].PublicKey) {
		t.Fatal("the private key does not match the SVID")
	}

	jwtSVID, err := c.FetchJWTSVID(ctx, jwtsvid.Params{Audience: "db"})
	if err != nil {
		t.Fatal(err)
	}
	if jwtSVID.ID != userID {
		t.Fatalf("JWT-SVID ID = %s, want %s", jwtSVID.ID, userID)
	}
	jwtBundles, err := c.FetchJWTBundles(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := jwtsvid.ParseAndValidate(jwtSVID.Marshal(), jwtBundles, []string{"db"}); err != nil {
		t.Fatalf("the JWT-SVID does not validate against the fetched JWT bundle: %v", err)
	}
	validated, err := c.ValidateJWTSVID(ctx, jwtSVID.Marshal(), "db")
	if err != nil {
		t.Fatalf("ValidateJWTSVID: %v", err)
	}
	if validated.ID != userID || validated.Claims["sub"] != userID.String() {
		t.Fatalf("ValidateJWTSVID returned %s with claims %v", validated.ID, validated.Claims)
	}

	// The wrong audience and a token signed by a stranger are InvalidArgument.
	if _, err := c.ValidateJWTSVID(ctx, jwtSVID.Marshal(), "other"); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("ValidateJWTSVID with the wrong audience: %v, want InvalidArgument", err)
	}
	if _, err := c.ValidateJWTSVID(ctx, foreignToken(t, "db"), "db"); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("ValidateJWTSVID with a foreign-signed token: %v, want InvalidArgument", err)
	}
	if _, err := c.ValidateJWTSVID(ctx, "not-a-jwt", "db"); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("ValidateJWTSVID with garbage: %v, want InvalidArgument", err)
	}

	// The JWT bundle is a JWKS whose keys carry kid and use.
	raw := rawJWTBundles(t, a)
	var jwks struct {
		Keys []map[string]any `json:"keys"`
	}
	if err := json.Unmarshal(raw["spiffe://example.org"], &jwks); err != nil {
		t.Fatal(err)
	}
	if len(jwks.Keys) == 0 {
		t.Fatal("the JWT bundle has no keys")
	}
	for _, k := range jwks.Keys {
		if k["kid"] == "" || k["kid"] == nil || k["use"] != "jwt-svid" {
			t.Fatalf("JWT bundle key %v lacks kid or use=jwt-svid", k)
		}
	}
}

func rawJWTBundles(t *testing.T, a *agentProc) map[string][]byte {
	ctx := withHeader(testContext(t))
	stream, err := workload.NewSpiffeWorkloadAPIClient(a.rawConn(t)).FetchJWTBundles(ctx, &workload.JWTBundlesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	resp, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	return resp.Bundles
}

// foreignToken is a well-formed JWT-SVID signed by a key the agent does not know.
func foreignToken(t *testing.T, audience string) string {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: jose.JSONWebKey{Key: key, KeyID: "stranger"}}, (&jose.SignerOptions{}).WithType("JWT"))
	if err != nil {
		t.Fatal(err)
	}
	token, err := jwt.Signed(signer).Claims(jwt.Claims{
		Subject:  userID.String(),
		Audience: jwt.Audience{audience},
		Expiry:   jwt.NewNumericDate(time.Now().Add(time.Minute)),
		IssuedAt: jwt.NewNumericDate(time.Now()),
	}).Serialize()
	if err != nil {
		t.Fatal(err)
	}
	return token
}

func TestSecurityHeaderAndStatusCodes(t *testing.T) {
	a := startAgent(t, baseConfig)
	client := workload.NewSpiffeWorkloadAPIClient(a.rawConn(t))
	ctx := testContext(t)

	// No header, and the header twice: InvalidArgument on every method.
	if _, err := client.FetchJWTSVID(ctx, &workload.JWTSVIDRequest{Audience: []string{"x"}}); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("FetchJWTSVID without the header: %v, want InvalidArgument", err)
	}
	stream, err := client.FetchX509SVID(ctx, &workload.X509SVIDRequest{})
	if err == nil {
		_, err = stream.Recv()
	}
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("FetchX509SVID without the header: %v, want InvalidArgument", err)
	}
	twice := withHeader(withHeader(ctx))
	if _, err := client.ValidateJWTSVID(twice, &workload.ValidateJWTSVIDRequest{Audience: "a", Svid: "b"}); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("a doubled header: %v, want InvalidArgument", err)
	}

	hctx := withHeader(ctx)
	if _, err := client.FetchJWTSVID(hctx, &workload.JWTSVIDRequest{}); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("FetchJWTSVID without audience: %v, want InvalidArgument", err)
	}
	if _, err := client.FetchJWTSVID(hctx, &workload.JWTSVIDRequest{Audience: []string{"x"}, SpiffeId: "spiffe://example.org/not/mine"}); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("FetchJWTSVID for an identity the caller lacks: %v, want PermissionDenied", err)
	}
	if _, err := client.FetchJWTSVID(hctx, &workload.JWTSVIDRequest{Audience: []string{"x"}, SpiffeId: "not an id"}); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("FetchJWTSVID with a malformed SPIFFE ID: %v, want InvalidArgument", err)
	}
	if _, err := client.ValidateJWTSVID(hctx, &workload.ValidateJWTSVIDRequest{Svid: "x"}); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("ValidateJWTSVID without audience: %v, want InvalidArgument", err)
	}
	if _, err := client.ValidateJWTSVID(hctx, &workload.ValidateJWTSVIDRequest{Audience: "x"}); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("ValidateJWTSVID without svid: %v, want InvalidArgument", err)
	}
	wit, err := client.FetchWITSVID(hctx, &workload.WITSVIDRequest{})
	if err == nil {
		_, err = wit.Recv()
	}
	if status.Code(err) != codes.Unimplemented {
		t.Fatalf("FetchWITSVID: %v, want Unimplemented", err)
	}
	witb, err := client.FetchWITBundles(hctx, &workload.WITBundlesRequest{})
	if err == nil {
		_, err = witb.Recv()
	}
	if status.Code(err) != codes.Unimplemented {
		t.Fatalf("FetchWITBundles: %v, want Unimplemented", err)
	}

	// Health and reflection share the socket and need no header.
	resp, err := healthpb.NewHealthClient(a.rawConn(t)).Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil || resp.Status != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("health: %v %v", resp, err)
	}
	refl, err := reflectionpb.NewServerReflectionClient(a.rawConn(t)).ServerReflectionInfo(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := refl.Send(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{}}); err != nil {
		t.Fatal(err)
	}
	rr, err := refl.Recv()
	if err != nil {
		t.Fatal(err)
	}
	var services []string
	for _, s := range rr.GetListServicesResponse().GetService() {
		services = append(services, s.Name)
	}
	if !strings.Contains(strings.Join(services, ","), "SpiffeWorkloadAPI") {
		t.Fatalf("reflection lists %v, want SpiffeWorkloadAPI among them", services)
	}
}

// x509Updates collects the X.509 contexts a watcher receives.
type x509Updates struct {
	mu      sync.Mutex
	updates []*workloadapi.X509Context
	errs    []error
}

func (w *x509Updates) OnX509ContextUpdate(c *workloadapi.X509Context) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.updates = append(w.updates, c)
}

func (w *x509Updates) OnX509ContextWatchError(err error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if status.Code(err) != codes.Canceled {
		w.errs = append(w.errs, err)
	}
}

func (w *x509Updates) snapshot() []*workloadapi.X509Context {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]*workloadapi.X509Context(nil), w.updates...)
}

func watch(t *testing.T, c *workloadapi.Client) *x509Updates {
	w := &x509Updates{}
	testkit.WatchX509(t, c, w)
	return w
}

func TestRotationIsPushedToOpenStream(t *testing.T) {
	a := startAgent(t, strings.Replace(baseConfig, `x509_svid_ttl = "1h"`, `x509_svid_ttl = "4s"`, 1))
	w := watch(t, a.client(t))
	waitFor(t, 10*time.Second, "the first X.509 context", func() bool { return len(w.snapshot()) >= 1 })
	first := w.snapshot()[0].DefaultSVID().Certificates[0]
	// Renewal is at half-life (2s) with jitter: within 10s a new one arrives.
	waitFor(t, 10*time.Second, "a rotated SVID on the open stream", func() bool {
		ups := w.snapshot()
		return !ups[len(ups)-1].DefaultSVID().Certificates[0].Equal(first)
	})
	ups := w.snapshot()
	rotated := ups[len(ups)-1].DefaultSVID()
	if !rotated.Certificates[0].NotBefore.After(first.NotBefore) {
		t.Fatal("the rotated SVID is not newer than the first")
	}
	// Every message differs from the one before it: no duplicates.
	for i := 1; i < len(ups); i++ {
		if ups[i].DefaultSVID().Certificates[0].Equal(ups[i-1].DefaultSVID().Certificates[0]) {
			t.Fatalf("update %d repeats update %d", i, i-1)
		}
	}
	if len(w.errs) > 0 {
		t.Fatalf("the watcher saw errors: %v", w.errs)
	}
}

const twoEntries = `
      entry {
        spiffe_id = "spiffe://example.org/user/@UID@"
        selectors = ["unix:uid:@UID@"]
        hint      = "internal"
      }
      entry {
        spiffe_id = "spiffe://example.org/second"
        selectors = ["unix:uid:@UID@", "unix:gid:` + "@GID@" + `"]
        hint      = "external"
        dns_names = ["second.example.org"]
      }
      entry {
        spiffe_id = "spiffe://example.org/same-hint"
        selectors = ["unix:uid:@UID@"]
        hint      = "internal"
      }
`

func withEntries(entries string) string {
	start := strings.Index(baseConfig, "      entry {")
	end := strings.LastIndex(baseConfig, "    }\n  }\n}")
	cfg := baseConfig[:start] + strings.TrimLeft(entries, "\n") + baseConfig[end:]
	return strings.ReplaceAll(cfg, "@GID@", itoa(os.Getgid()))
}

func TestEntryReloadReachesOpenStream(t *testing.T) {
	a := startAgent(t, baseConfig)
	w := watch(t, a.client(t))
	waitFor(t, 10*time.Second, "the first X.509 context", func() bool { return len(w.snapshot()) >= 1 })
	if n := len(w.snapshot()[0].SVIDs); n != 1 {
		t.Fatalf("first update has %d SVIDs, want 1", n)
	}

	a.reload(withEntries(twoEntries), "Reloaded the config")
	waitFor(t, 10*time.Second, "the new entries on the open stream", func() bool {
		ups := w.snapshot()
		return len(ups[len(ups)-1].SVIDs) == 2
	})
	ups := w.snapshot()
	svids := ups[len(ups)-1].SVIDs
	// Oldest entry first; the third shares a hint with the first and is left out.
	if svids[0].ID != userID || svids[0].Hint != "internal" {
		t.Fatalf("default SVID = %s (hint %q), want %s (internal)", svids[0].ID, svids[0].Hint, userID)
	}
	if svids[1].ID.String() != "spiffe://example.org/second" || svids[1].Hint != "external" {
		t.Fatalf("second SVID = %s (hint %q)", svids[1].ID, svids[1].Hint)
	}
	if got := svids[1].Certificates[0].DNSNames; len(got) != 1 || got[0] != "second.example.org" {
		t.Fatalf("DNS names = %v", got)
	}
	if !svids[0].Certificates[0].Equal(ups[0].DefaultSVID().Certificates[0]) {
		t.Fatal("an unchanged entry's SVID was re-signed on reload")
	}

	// A broken config is refused and the old one stays in force.
	count := len(w.snapshot())
	a.reload(strings.Replace(baseConfig, `x509_svid_ttl = "1h"`, `x509_svid_ttl = "soon"`, 1), "Reload failed")
	if !strings.Contains(a.Logs.String(), "x509_svid_ttl") {
		t.Fatalf("the reload error does not name the key:\n%s", a.Logs.String())
	}
	ctx := testContext(t)
	svidsNow, err := a.client(t).FetchX509SVIDs(ctx)
	if err != nil || len(svidsNow) != 2 {
		t.Fatalf("after a failed reload: %d SVIDs, %v; want the 2 of the old config", len(svidsNow), err)
	}
	if got := len(w.snapshot()); got != count {
		t.Fatalf("a failed reload sent %d messages on the open stream", got-count)
	}

	// Removing the caller's entries ends the stream with PermissionDenied.
	a.reload(withEntries(`
      entry {
        spiffe_id = "spiffe://example.org/nobody"
        selectors = ["unix:uid:4242424"]
      }
`), "Reloaded the config")
	if _, err := a.client(t).FetchX509SVID(ctx); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("fetch with no entry left: %v, want PermissionDenied", err)
	}
}

func TestCallerWithoutEntryIsDenied(t *testing.T) {
	testkit.RequireRoot(t, "to run a child process under another uid")
	a := startAgent(t, baseConfig)
	// uid 65534 (nobody) has no entry.
	cmd := exec.Command(lanyardBin, "api", "fetch", "x509", "-socketPath", a.socket, "-timeout", "3s")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := cmd.CombinedOutput()
	if err == nil {
		t.Fatalf("a caller without an entry got an SVID:\n%s", out)
	}
	if !strings.Contains(string(out), "PermissionDenied") && !strings.Contains(string(out), "no identity issued") {
		t.Fatalf("want PermissionDenied, got:\n%s", out)
	}
	// The entitled caller is unaffected.
	if _, err := a.client(t).FetchX509SVID(testContext(t)); err != nil {
		t.Fatal(err)
	}
}

func TestRestartKeepsTrustBundleAndJWTKeys(t *testing.T) {
	dir := newAgentDir(t)
	a := startAgentIn(t, dir, baseConfig)
	ctx := testContext(t)
	x1, err := a.client(t).FetchX509Bundles(ctx)
	if err != nil {
		t.Fatal(err)
	}
	j1 := rawJWTBundles(t, a)
	a.Stop()

	if info, err := os.Stat(a.dataDir); err != nil || info.Mode().Perm() != 0o700 {
		t.Fatalf("data_dir mode: %v %v, want 0700", info.Mode(), err)
	}
	files, _ := os.ReadDir(a.dataDir)
	for _, f := range files {
		info, _ := f.Info()
		if info.Mode().Perm() != 0o600 {
			t.Fatalf("%s has mode %v, want 0600", f.Name(), info.Mode())
		}
	}

	b := startAgentIn(t, dir, baseConfig)
	x2, err := b.client(t).FetchX509Bundles(ctx)
	if err != nil {
		t.Fatal(err)
	}
	td := spiffeid.RequireTrustDomainFromString("example.org")
	r1, _ := x1.GetX509BundleForTrustDomain(td)
	r2, _ := x2.GetX509BundleForTrustDomain(td)
	if !r1.Equal(r2) {
		t.Fatal("the X.509 trust bundle changed across a restart")
	}
	if j2 := rawJWTBundles(t, b); string(j1["spiffe://example.org"]) != string(j2["spiffe://example.org"]) {
		t.Fatal("the JWT keys changed across a restart")
	}
}

func TestSocketInUseIsRefused(t *testing.T) {
	a := startAgent(t, baseConfig)
	other := newAgentDir(t)
	cfg := expandConfig(baseConfig, other+"/data", a.socket)
	path := other + "/agent.conf"
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	out, code := runCLI(t, "run", "-config", path)
	if code == 0 || !strings.Contains(out, "in use") {
		t.Fatalf("a second agent on a busy socket: exit %d, output:\n%s", code, out)
	}
	// The first agent still serves.
	if !a.healthy() {
		t.Fatal("the first agent stopped serving")
	}
}

func TestStaleSocketIsReplaced(t *testing.T) {
	dir := newAgentDir(t)
	a := startAgentIn(t, dir, baseConfig)
	// SIGKILL leaves the socket file behind.
	_ = a.Cmd.Process.Kill()
	<-a.Exited
	if _, err := os.Stat(a.socket); err != nil {
		t.Fatalf("expected a stale socket after SIGKILL: %v", err)
	}
	b := startAgentIn(t, dir, baseConfig)
	if _, err := b.client(t).FetchX509SVID(testContext(t)); err != nil {
		t.Fatal(err)
	}
}

func TestInvalidConfigNamesFileLineAndKey(t *testing.T) {
	dir := newAgentDir(t)
	cases := []struct {
		name, config, want string
	}{
		{"unknown key", strings.Replace(baseConfig, `log_level    = "debug"`, `log_levle = "debug"`, 1), `agent.conf:6:3: agent.log_levle: unknown key`},
		{"bad duration", strings.Replace(baseConfig, `jwt_svid_ttl  = "5m"`, `jwt_svid_ttl  = "5 minutes"`, 1), `agent.conf:13:7: plugins.UpstreamAuthority "local".plugin_data.jwt_svid_ttl`},
		{"bad SPIFFE ID", strings.Replace(baseConfig, `spiffe://example.org/user/@UID@`, `spiffe://Example.org/user`, 1), `agent.conf:15:9: plugins.UpstreamAuthority "local".plugin_data.entry[0].spiffe_id`},
		{"selector without type", strings.Replace(baseConfig, `["unix:uid:@UID@"]`, `["uid"]`, 1), `agent.conf:16:9: plugins.UpstreamAuthority "local".plugin_data.entry[0].selectors`},
		{"unknown attestor", strings.Replace(baseConfig, `WorkloadAttestor "unix"`, `WorkloadAttestor "nope"`, 1), `agent.conf:9:3`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			path := dir + "/agent.conf"
			if err := os.WriteFile(path, []byte(expandConfig(tc.config, dir+"/data", dir+"/api.sock")), 0o644); err != nil {
				t.Fatal(err)
			}
			for _, cmd := range []string{"validate", "run"} {
				out, code := runCLI(t, cmd, "-config", path)
				if code == 0 || !strings.Contains(out, tc.want) {
					t.Fatalf("lanyard %s: exit %d, want an error containing %q, got:\n%s", cmd, code, tc.want, out)
				}
			}
		})
	}
	path := dir + "/good.conf"
	if err := os.WriteFile(path, []byte(expandConfig(baseConfig, dir+"/good-data", dir+"/api.sock")), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, code := runCLI(t, "validate", "-config", path); code != 0 {
		t.Fatalf("validate of a good config: exit %d:\n%s", code, out)
	}
	if _, err := os.Stat(dir + "/good-data"); err == nil {
		t.Fatal("validate wrote into data_dir")
	}
}

func TestCLIAgainstAgent(t *testing.T) {
	a := startAgent(t, baseConfig)
	out, code := runCLI(t, "api", "fetch", "x509", "-socketPath", a.socket, "-write", a.dir+"/out")
	if code != 0 || !strings.Contains(out, userID.String()) {
		t.Fatalf("api fetch x509: exit %d:\n%s", code, out)
	}
	pem, err := os.ReadFile(a.dir + "/out/svid.0.pem")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := x509svid.Parse(pem, mustRead(t, a.dir+"/out/svid.0.key")); err != nil {
		t.Fatalf("the written SVID and key do not parse as an X509-SVID: %v", err)
	}
	out, code = runCLI(t, "api", "fetch", "jwt", "-socketPath", a.socket, "-audience", "web")
	if code != 0 || !strings.Contains(out, "token(") {
		t.Fatalf("api fetch jwt: exit %d:\n%s", code, out)
	}
	token := strings.TrimSpace(strings.SplitN(strings.SplitN(out, "token(", 2)[1], "\n", 3)[1])
	out, code = runCLI(t, "api", "validate", "jwt", "-socketPath", a.socket, "-audience", "web", "-svid", token)
	if code != 0 || !strings.Contains(out, userID.String()) {
		t.Fatalf("api validate jwt: exit %d:\n%s", code, out)
	}
	out, code = runCLI(t, "healthcheck", "-socketPath", a.socket)
	if code != 0 || !strings.Contains(out, "healthy") {
		t.Fatalf("healthcheck: exit %d:\n%s", code, out)
	}
}

func mustRead(t *testing.T, path string) []byte {
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func jwtParams(audience string) jwtsvid.Params { return jwtsvid.Params{Audience: audience} }

// TestJWTSVIDAudienceIsExact: tokens are cached per audience list, and
// lists that once shared a cache key (["x", "y"] and ["x\x00y"], joined
// with a NUL) get tokens of their own, each naming exactly what was asked.
func TestJWTSVIDAudienceIsExact(t *testing.T) {
	a := startAgent(t, baseConfig)
	c := a.client(t)
	ctx := testContext(t)
	for _, p := range []jwtsvid.Params{
		{Audience: "x", ExtraAudiences: []string{"y"}},
		{Audience: "x\x00y"},
		{Audience: "x", ExtraAudiences: []string{"y"}},
	} {
		want := append([]string{p.Audience}, p.ExtraAudiences...)
		svid, err := c.FetchJWTSVID(ctx, p)
		if err != nil {
			t.Fatalf("FetchJWTSVID for %q: %v", want, err)
		}
		tok, err := jwt.ParseSigned(svid.Marshal(), []jose.SignatureAlgorithm{jose.ES256})
		if err != nil {
			t.Fatal(err)
		}
		var claims jwt.Claims
		if err := tok.UnsafeClaimsWithoutVerification(&claims); err != nil {
			t.Fatal(err)
		}
		if !slices.Equal([]string(claims.Audience), want) {
			t.Fatalf("asked for audience %q, got a token for %q", want, claims.Audience)
		}
	}
}
