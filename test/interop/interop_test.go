package interop

import (
	"bytes"
	"context"
	"crypto/sha1"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/lanyard-dev/lanyard/test/spire/spiretest"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

const nodeID = "spiffe://example.org/node"

var (
	td          = spiffeid.RequireTrustDomainFromString("example.org")
	uidSelector = fmt.Sprintf("unix:uid:%d", os.Getuid())
)

// fastSync makes Lanyard sync every second (spire-agent's default is 5s).
const fastSync = "    sync_interval = \"1s\"\n"

// x509Msg is one message of a FetchX509SVID stream, parsed.
type x509Msg struct {
	err    error
	at     time.Time
	ids    []string
	svids  [][]*x509.Certificate
	bundle []*x509.Certificate
}

// x509Stream is one FetchX509SVID stream, read in the background. Every
// message on it arrives without reconnecting.
type x509Stream struct {
	msgs chan x509Msg
}

func openX509Stream(t *testing.T, socket string) *x509Stream {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(metadata.AppendToOutgoingContext(context.Background(), "workload.spiffe.io", "true"))
	t.Cleanup(func() {
		cancel()
		conn.Close()
	})
	stream, err := workload.NewSpiffeWorkloadAPIClient(conn).FetchX509SVID(ctx, &workload.X509SVIDRequest{})
	if err != nil {
		t.Fatal(err)
	}
	s := &x509Stream{msgs: make(chan x509Msg, 64)}
	go func() {
		defer close(s.msgs)
		for {
			resp, err := stream.Recv()
			m := x509Msg{err: err, at: time.Now()}
			if err == nil {
				m.err = m.parse(resp)
			}
			s.msgs <- m
			if err != nil {
				return
			}
		}
	}()
	return s
}

func (m *x509Msg) parse(resp *workload.X509SVIDResponse) error {
	for i, svid := range resp.Svids {
		chain, err := x509.ParseCertificates(svid.X509Svid)
		if err != nil {
			return err
		}
		m.ids = append(m.ids, svid.SpiffeId)
		m.svids = append(m.svids, chain)
		if i == 0 {
			if m.bundle, err = x509.ParseCertificates(svid.Bundle); err != nil {
				return err
			}
		}
	}
	return nil
}

// next returns the next message, failing the test after bound.
func (s *x509Stream) next(t *testing.T, bound time.Duration) x509Msg {
	t.Helper()
	select {
	case m, ok := <-s.msgs:
		if !ok {
			t.Fatal("the stream ended")
		}
		return m
	case <-time.After(bound):
		t.Fatalf("no message on the stream within %s", bound)
		return x509Msg{}
	}
}

// until reads messages until one satisfies cond, failing the test after
// bound or on a stream error. It returns the messages read, the last one
// being the match.
func (s *x509Stream) until(t *testing.T, bound time.Duration, what string, cond func(x509Msg) bool) []x509Msg {
	t.Helper()
	deadline := time.After(bound)
	var seen []x509Msg
	for {
		select {
		case m, ok := <-s.msgs:
			if !ok {
				t.Fatalf("the stream ended while waiting for %s", what)
			}
			if m.err != nil {
				t.Fatalf("stream error while waiting for %s: %v", what, m.err)
			}
			seen = append(seen, m)
			if cond(m) {
				return seen
			}
		case <-deadline:
			t.Fatalf("no message with %s within %s (%d other messages)", what, bound, len(seen))
		}
	}
}

func sortedIDs(m x509Msg) []string {
	ids := slices.Clone(m.ids)
	slices.Sort(ids)
	return ids
}

func serverBundle(t *testing.T, s *spiretest.Server) *x509bundle.Bundle {
	t.Helper()
	return x509bundle.FromX509Authorities(td, s.BundleCerts(t))
}

// createEntry creates an entry parented to the node with extra CLI flags.
func createEntry(t *testing.T, s *spiretest.Server, spiffeID string, extra ...string) string {
	t.Helper()
	args := append([]string{"entry", "create", "-output", "json", "-parentID", nodeID, "-spiffeID", spiffeID, "-selector", uidSelector}, extra...)
	var resp struct {
		Results []struct {
			Entry struct {
				ID string `json:"id"`
			} `json:"entry"`
		} `json:"results"`
	}
	if err := json.Unmarshal([]byte(s.CLI(t, args...)), &resp); err != nil || len(resp.Results) != 1 || resp.Results[0].Entry.ID == "" {
		t.Fatalf("creating the entry for %s: %v %+v", spiffeID, err, resp)
	}
	return resp.Results[0].Entry.ID
}

// TestFetchX509AndJWT runs an unchanged spire-agent config, with the join
// token on the command line, and fetches through go-spiffe's client.
func TestFetchX509AndJWT(t *testing.T) {
	s := spiretest.StartServer(t)
	// A federated trust domain whose bundle the server holds.
	otherCA := testkit.NewCA(t, "spiffe://other.org").Cert
	otherPath := filepath.Join(t.TempDir(), "other.pem")
	if err := os.WriteFile(otherPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: otherCA.Raw}), 0o600); err != nil {
		t.Fatal(err)
	}
	s.CLI(t, "bundle", "set", "-id", "spiffe://other.org", "-path", otherPath)
	webID := "spiffe://example.org/web"
	createEntry(t, s, webID, "-federatesWith", "spiffe://other.org", "-dns", "web.example.org", "-hint", "web")

	n := newNode(t, s, "", diskKeys)
	token := s.JoinToken(t, nodeID)
	l := n.start("-joinToken", token)
	if strings.Contains(l.logs.String(), token) {
		t.Fatal("the log shows the join token")
	}

	t.Logf("lanyard serving -> first SVID: %s", fetchID(t, n.socket, webID).Round(time.Millisecond))

	ctx := testContext(t, time.Minute)
	client, err := workloadapi.New(ctx, workloadapi.WithAddr("unix://"+n.socket))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	x509ctx, err := client.FetchX509Context(ctx)
	if err != nil {
		t.Fatal(err)
	}
	svid := x509ctx.DefaultSVID()
	if svid.ID.String() != webID || svid.Hint != "web" {
		t.Fatalf("SVID %s hint %q, want %s hint web", svid.ID, svid.Hint, webID)
	}
	if _, _, err := x509svid.Verify(svid.Certificates, serverBundle(t, s)); err != nil {
		t.Fatalf("the SVID does not verify against spire-server's bundle: %v", err)
	}
	if !slices.Contains(svid.Certificates[0].DNSNames, "web.example.org") {
		t.Fatalf("DNS names %v, want web.example.org from the entry", svid.Certificates[0].DNSNames)
	}
	other, err := x509ctx.Bundles.GetX509BundleForTrustDomain(spiffeid.RequireTrustDomainFromString("other.org"))
	if err != nil || !other.HasX509Authority(otherCA) {
		t.Fatalf("the federated bundle of other.org is missing: %v", err)
	}

	jwt, err := client.FetchJWTSVID(ctx, jwtsvid.Params{Audience: "db"})
	if err != nil {
		t.Fatal(err)
	}
	jwtBundles, err := client.FetchJWTBundles(ctx)
	if err != nil {
		t.Fatal(err)
	}
	parsed, err := jwtsvid.ParseAndValidate(jwt.Marshal(), jwtBundles, []string{"db"})
	if err != nil {
		t.Fatalf("the JWT-SVID does not validate against the fetched bundles: %v", err)
	}
	if parsed.ID.String() != webID {
		t.Fatalf("JWT-SVID subject %s, want %s", parsed.ID, webID)
	}
	if _, err := client.ValidateJWTSVID(ctx, jwt.Marshal(), "db"); err != nil {
		t.Fatalf("Lanyard does not validate its own JWT-SVID: %v", err)
	}

	// A new entry reaches an open stream with spire-agent's default sync
	// interval and spire-server's default cache reload.
	stream := openX509Stream(t, n.socket)
	if m := stream.next(t, 30*time.Second); m.err != nil || len(m.ids) != 1 {
		t.Fatalf("first message: %v %v", m.ids, m.err)
	}
	created := time.Now()
	createEntry(t, s, "spiffe://example.org/web2")
	got := stream.until(t, 60*time.Second, "the new entry's SVID", func(m x509Msg) bool { return len(m.ids) == 2 })
	t.Logf("entry created -> SVID on the open stream: %s (default intervals)", got[len(got)-1].at.Sub(created).Round(time.Millisecond))
}

// TestEntryCreatedAndDeletedOnAnOpenStream follows one stream while its
// entries come and go.
func TestEntryCreatedAndDeletedOnAnOpenStream(t *testing.T) {
	aID := "spiffe://example.org/a"
	s, n, _ := startServing(t, aID)

	stream := openX509Stream(t, n.socket)
	if m := stream.next(t, 30*time.Second); m.err != nil || len(m.ids) != 1 || m.ids[0] != aID {
		t.Fatalf("first message: %v %v", m.ids, m.err)
	}
	bID := "spiffe://example.org/b"
	created := time.Now()
	b := createEntry(t, s, bID)
	got := stream.until(t, 30*time.Second, "the new entry's SVID", func(m x509Msg) bool {
		return slices.Equal(sortedIDs(m), []string{aID, bID})
	})
	t.Logf("entry created -> SVID on the open stream: %s (sync_interval 1s, server cache reload 1s)", got[len(got)-1].at.Sub(created).Round(time.Millisecond))

	deleted := time.Now()
	s.DeleteEntry(t, b)
	got = stream.until(t, 30*time.Second, "the deleted entry's SVID withdrawn", func(m x509Msg) bool {
		return slices.Equal(m.ids, []string{aID})
	})
	t.Logf("entry deleted -> SVID withdrawn from the open stream: %s", got[len(got)-1].at.Sub(deleted).Round(time.Millisecond))

	entries := s.CLI(t, "entry", "show", "-spiffeID", aID, "-output", "json")
	var shown struct {
		Entries []struct {
			ID string `json:"id"`
		} `json:"entries"`
	}
	if err := json.Unmarshal([]byte(entries), &shown); err != nil || len(shown.Entries) != 1 {
		t.Fatalf("finding entry a: %v %s", err, entries)
	}
	s.DeleteEntry(t, shown.Entries[0].ID)
	select {
	case m, ok := <-stream.msgs:
		for ok && m.err == nil {
			m, ok = <-stream.msgs
		}
		if !ok || status.Code(m.err) != codes.PermissionDenied {
			t.Fatalf("the stream ended with %v, want PermissionDenied once no entry is left", m.err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the stream did not end within 30s of its last entry's deletion")
	}
}

// localAuthorities returns the X.509 or JWT local authority IDs by state.
func localAuthorities(t *testing.T, s *spiretest.Server, kind string) map[string]string {
	t.Helper()
	var shown map[string]struct {
		AuthorityID string `json:"authority_id"`
	}
	out := s.CLI(t, "localauthority", kind, "show", "-output", "json")
	if err := json.Unmarshal([]byte(out), &shown); err != nil {
		t.Fatalf("parsing localauthority %s show: %v\n%s", kind, err, out)
	}
	ids := map[string]string{}
	for state, a := range shown {
		ids[state] = a.AuthorityID
	}
	return ids
}

func skiHex(c *x509.Certificate) string { return hex.EncodeToString(c.SubjectKeyId) }

func issuedBy(chain []*x509.Certificate, authorityID string) bool {
	return hex.EncodeToString(chain[len(chain)-1].AuthorityKeyId) == authorityID
}

func bundleHas(m x509Msg, authorityID string) bool {
	return slices.ContainsFunc(m.bundle, func(c *x509.Certificate) bool { return skiHex(c) == authorityID })
}

// TestCARotationReachesAnOpenStream rotates the server's X.509 CA the way
// SPIRE documents it (prepare, activate, taint, revoke) and its JWT key,
// and follows one stream: the new CA reaches it first, then SVIDs signed
// by it once the old CA is tainted, as spire-agent does.
func TestCARotationReachesAnOpenStream(t *testing.T) {
	aID := "spiffe://example.org/a"
	s, n, _ := startServing(t, aID)

	oldID := localAuthorities(t, s, "x509")["active"]
	stream := openX509Stream(t, n.socket)
	first := stream.next(t, 30*time.Second)
	if first.err != nil || len(first.svids) != 1 || !issuedBy(first.svids[0], oldID) {
		t.Fatalf("first message: %v %v", first.ids, first.err)
	}
	serial := first.svids[0][0].SerialNumber

	newID := s.PrepareX509Authority(t)
	got := stream.until(t, 30*time.Second, "the prepared CA in the bundle", func(m x509Msg) bool { return bundleHas(m, newID) })
	m := got[len(got)-1]
	if m.svids[0][0].SerialNumber.Cmp(serial) != 0 || !bundleHas(m, oldID) {
		t.Fatal("the prepared CA arrived with another SVID, or without the old CA: the bundle must come first")
	}

	s.ActivateX509Authority(t, newID)
	tainted := time.Now()
	s.CLI(t, "localauthority", "x509", "taint", "-authorityID", oldID)
	got = stream.until(t, 30*time.Second, "an SVID signed by the new CA", func(m x509Msg) bool { return issuedBy(m.svids[0], newID) })
	m = got[len(got)-1]
	if !bundleHas(m, newID) || !bundleHas(m, oldID) {
		t.Fatal("the re-signed SVID came without both CAs in the bundle")
	}
	if _, _, err := x509svid.Verify(m.svids[0], x509bundle.FromX509Authorities(td, m.bundle)); err != nil {
		t.Fatalf("the re-signed SVID does not verify against the bundle sent with it: %v", err)
	}
	t.Logf("X.509 authority tainted -> re-signed SVID on the open stream: %s", m.at.Sub(tainted).Round(time.Millisecond))

	s.CLI(t, "localauthority", "x509", "revoke", "-authorityID", oldID)
	got = stream.until(t, 30*time.Second, "the revoked CA gone from the bundle", func(m x509Msg) bool { return !bundleHas(m, oldID) })
	if m := got[len(got)-1]; !issuedBy(m.svids[0], newID) {
		t.Fatal("after revocation the stream serves an SVID of the revoked CA")
	}

	// JWT: a token cached before the rotation is replaced once its key is
	// tainted.
	ctx := testContext(t, 2*time.Minute)
	client, err := workloadapi.New(ctx, workloadapi.WithAddr("unix://"+n.socket))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	kid := func() string {
		tok, err := client.FetchJWTSVID(ctx, jwtsvid.Params{Audience: "db"})
		if err != nil {
			t.Fatal(err)
		}
		parsed, err := jose.ParseSignedCompact(tok.Marshal(), []jose.SignatureAlgorithm{jose.ES256, jose.ES384, jose.RS256, jose.PS256})
		if err != nil {
			t.Fatal(err)
		}
		return parsed.Signatures[0].Header.KeyID
	}
	oldKID := localAuthorities(t, s, "jwt")["active"]
	if k := kid(); k != oldKID {
		t.Fatalf("JWT-SVID signed with key %q, want the active %q", k, oldKID)
	}
	newKID := s.PrepareJWTAuthority(t)
	s.ActivateJWTAuthority(t, newKID)
	s.CLI(t, "localauthority", "jwt", "taint", "-authorityID", oldKID)
	waitFor(t, 30*time.Second, "a JWT-SVID signed with the new key", func() bool { return kid() == newKID })
}

// TestRestartDoesNotAttestAgain restarts Lanyard with its single-use join
// token: with the disk key manager it resumes with its stored SVID; with
// the memory key manager it must attest again, which the server refuses
// for the spent token.
func TestRestartDoesNotAttestAgain(t *testing.T) {
	s := spiretest.StartServer(t)
	webID := "spiffe://example.org/web"
	createEntry(t, s, webID)
	token := s.JoinToken(t, nodeID)

	n := newNode(t, s, "", diskKeys)
	first := n.start("-joinToken", token)
	t.Logf("start -> SVID %s", fetchID(t, n.socket, webID))
	first.stop()
	if _, err := os.Stat(filepath.Join(n.dir, "keys", "lanyard_agent_keys.json")); err != nil {
		t.Fatalf("the disk key manager's directory holds no key: %v", err)
	}

	second := n.start("-joinToken", token)
	t.Logf("restart -> SVID %s", fetchID(t, n.socket, webID))
	// The saved cache answers before the upstream has loaded its agent
	// SVID, so wait for the upstream to say how it started.
	waitFor(t, 30*time.Second, "the restarted agent to resume with its stored agent SVID", func() bool {
		logs := second.logs.String()
		if strings.Contains(logs, "Attesting the node") {
			t.Fatalf("the restarted agent attested again:\n%s", logs)
		}
		return strings.Contains(logs, "no node attestation needed")
	})
	var agents struct {
		Agents []json.RawMessage `json:"agents"`
	}
	if err := json.Unmarshal([]byte(s.CLI(t, "agent", "list", "-output", "json")), &agents); err != nil || len(agents.Agents) != 1 {
		t.Fatalf("the server knows %d agents (%v), want the one attestation", len(agents.Agents), err)
	}
	second.stop()

	mem := newNode(t, s, "", memoryKeys)
	memToken := s.JoinToken(t, nodeID)
	mem.start("-joinToken", memToken).stop()
	third, err := mem.run("-joinToken", memToken)
	if err != nil {
		t.Fatal(err)
	}
	// The agent keeps serving what it cached and retries the upstream, so
	// it does not exit; the server refusing the spent token proves that it
	// had to attest again.
	waitFor(t, 60*time.Second, "the restarted agent to report the spent join token", func() bool {
		return strings.Contains(third.logs.String(), "already been used")
	})
	if out := third.logs.String(); strings.Contains(out, memToken) || strings.Contains(out, "no node attestation needed") {
		t.Fatalf("the memory key manager's restart resumed, or logged the token:\n%s", out)
	}
}

// fetchID fetches the caller's default SVID and checks its ID. Entries
// parented to a node alias reach a new agent only once the server's entry
// cache knows the node (its cache_reload_interval, 5s by default), for
// spire-agent as for Lanyard: until then the answer is PermissionDenied,
// which clients retry.
func fetchID(t *testing.T, socket, want string) time.Duration {
	t.Helper()
	start := time.Now()
	deadline := start.Add(60 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		svid, err := workloadapi.FetchX509SVID(ctx, workloadapi.WithAddr("unix://"+socket))
		cancel()
		switch {
		case err == nil && svid.ID.String() == want:
			return time.Since(start)
		case err == nil:
			t.Fatalf("SVID %s, want %s", svid.ID, want)
		case status.Code(err) != codes.PermissionDenied || time.Now().After(deadline):
			t.Fatalf("no SVID for %s: %v", want, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestAgentSVIDIsRenewed gives agents a 20s SVID: Lanyard renews it at
// half-life with RenewAgent, keeps serving, and resumes with the renewed
// SVID after a restart.
func TestAgentSVIDIsRenewed(t *testing.T) {
	s := spiretest.StartServer(t, spiretest.WithX509SVIDTTL(20*time.Second))
	webID := "spiffe://example.org/web"
	createEntry(t, s, webID)
	token := s.JoinToken(t, nodeID)
	n := newNode(t, s, fastSync, diskKeys)
	l := n.start("-joinToken", token)
	waitFor(t, 40*time.Second, "two agent SVID renewals", func() bool {
		return strings.Count(l.logs.String(), "Agent SVID renewed") >= 2
	})
	fetchID(t, n.socket, webID)
	l.stop()
	again := n.start("-joinToken", token)
	fetchID(t, n.socket, webID)
	// The saved cache answers before the upstream loads its agent SVID.
	waitFor(t, 30*time.Second, "the restart to resume with the renewed agent SVID", func() bool {
		return strings.Contains(again.logs.String(), "no node attestation needed")
	})
}

// TestInsecureBootstrap attests without a trust bundle, trusting the first
// server it reaches, as spire-agent's insecure_bootstrap does.
func TestInsecureBootstrap(t *testing.T) {
	s := spiretest.StartServer(t)
	webID := "spiffe://example.org/web"
	createEntry(t, s, webID)
	n := newNode(t, s, "    insecure_bootstrap = true\n", diskKeys)
	body, err := os.ReadFile(n.config)
	if err != nil {
		t.Fatal(err)
	}
	body = bytes.Replace(body, []byte(fmt.Sprintf("    trust_bundle_path = %q\n", n.bundle)), nil, 1)
	if err := os.WriteFile(n.config, body, 0o600); err != nil {
		t.Fatal(err)
	}
	l := n.start("-joinToken", s.JoinToken(t, nodeID))
	fetchID(t, n.socket, webID)
	if !strings.Contains(l.logs.String(), "Insecure bootstrap") {
		t.Fatal("the agent did not say it bootstrapped insecurely")
	}
}

// TestSpireAgentCLIAsClient uses spire-agent's own CLI against Lanyard.
func TestSpireAgentCLIAsClient(t *testing.T) {
	s := spiretest.StartServer(t)
	webID := "spiffe://example.org/web"
	createEntry(t, s, webID)
	n := newNode(t, s, "    join_token = \""+s.JoinToken(t, nodeID)+"\"\n", diskKeys)
	n.start()
	fetchID(t, n.socket, webID)
	cli := filepath.Join(s.BinDir, "spire-agent")
	run := func(args ...string) string {
		t.Helper()
		ctx := testContext(t, 30*time.Second)
		out, err := exec.CommandContext(ctx, cli, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("spire-agent %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	dir := t.TempDir()
	out := run("api", "fetch", "x509", "-socketPath", n.socket, "-write", dir)
	if !strings.Contains(out, webID) {
		t.Fatalf("spire-agent api fetch x509 did not show %s:\n%s", webID, out)
	}
	for _, f := range []string{"svid.0.pem", "svid.0.key", "bundle.0.pem"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			t.Fatalf("spire-agent api fetch x509 -write did not write %s: %v", f, err)
		}
	}
	out = run("api", "fetch", "jwt", "-audience", "db", "-socketPath", n.socket)
	if !strings.Contains(out, webID) {
		t.Fatalf("spire-agent api fetch jwt did not show %s:\n%s", webID, out)
	}
	token := ""
	for _, f := range strings.Fields(out) {
		if strings.Count(f, ".") == 2 && strings.HasPrefix(f, "ey") {
			token = f
		}
	}
	if token == "" {
		t.Fatalf("no token in spire-agent api fetch jwt's output:\n%s", out)
	}
	out = run("api", "validate", "jwt", "-audience", "db", "-svid", token, "-socketPath", n.socket)
	if !strings.Contains(out, "valid") {
		t.Fatalf("spire-agent api validate jwt:\n%s", out)
	}
	run("healthcheck", "-socketPath", n.socket)
}

// withServerPlugin adds a plugin block to a running server's config and
// restarts it. spiretest configures only the join_token attestor.
func withServerPlugin(t *testing.T, s *spiretest.Server, block string) {
	t.Helper()
	s.Stop()
	conf, err := os.ReadFile(s.ConfigPath)
	if err != nil {
		t.Fatal(err)
	}
	const anchor = "plugins {\n"
	if !bytes.Contains(conf, []byte(anchor)) {
		t.Fatalf("no plugins block in %s", s.ConfigPath)
	}
	conf = bytes.Replace(conf, []byte(anchor), []byte(anchor+block+"\n"), 1)
	if err := os.WriteFile(s.ConfigPath, conf, 0o600); err != nil {
		t.Fatal(err)
	}
	s.Start()
}

// TestX509PoP attests with x509pop: the node proves it holds the key of a
// certificate the server's CA bundle trusts. The server marks x509pop
// re-attestable, so the agent SVID is renewed by attesting again.
func TestX509PoP(t *testing.T) {
	s := spiretest.StartServer(t, spiretest.WithX509SVIDTTL(20*time.Second))
	dir := t.TempDir()
	ca := testkit.NewCA(t, "", testkit.WithCommonName("node CA"))
	nodeKey := testkit.NewKey(t)
	node := ca.Issue(t, &x509.Certificate{Subject: pkix.Name{CommonName: "node-1"}, KeyUsage: x509.KeyUsageDigitalSignature}, nodeKey.Public())
	write := func(name, typ string, der []byte) string {
		p := filepath.Join(dir, name)
		testkit.WritePEM(t, p, typ, der)
		return p
	}
	nodeDER := node.Raw
	caPath, certPath, keyPath := write("ca.pem", "CERTIFICATE", ca.Cert.Raw), write("node.pem", "CERTIFICATE", nodeDER), write("node.key", "PRIVATE KEY", testkit.PKCS8(t, nodeKey))
	withServerPlugin(t, s, fmt.Sprintf("    NodeAttestor \"x509pop\" {\n        plugin_data {\n            ca_bundle_path = %q\n        }\n    }", caPath))

	// The agent ID is the certificate's SHA-1 fingerprint; an entry
	// parented to it reaches the agent without waiting for a node alias.
	sum := sha1.Sum(nodeDER)
	agentID := "spiffe://example.org/spire/agent/x509pop/" + hex.EncodeToString(sum[:])
	webID := "spiffe://example.org/web"
	s.CreateEntry(t, agentID, webID, uidSelector)

	n := newNode(t, s, fastSync, diskKeys)
	conf, err := os.ReadFile(n.config)
	if err != nil {
		t.Fatal(err)
	}
	conf = bytes.Replace(conf, []byte("NodeAttestor \"join_token\" {\n        plugin_data {}"),
		[]byte(fmt.Sprintf("NodeAttestor \"x509pop\" {\n        plugin_data {\n            private_key_path = %q\n            certificate_path = %q\n        }", keyPath, certPath)), 1)
	if err := os.WriteFile(n.config, conf, 0o600); err != nil {
		t.Fatal(err)
	}
	l := n.start()
	fetchID(t, n.socket, webID)
	if !strings.Contains(l.logs.String(), "reattestable=true") {
		t.Fatal("the server did not mark the x509pop attestation re-attestable")
	}
	waitFor(t, 40*time.Second, "the agent SVID renewed by attesting again", func() bool {
		return strings.Contains(l.logs.String(), "Agent SVID re-attested")
	})
	fetchID(t, n.socket, webID)
}

// TestResyncOnMiss: a workload that connects right after its entry was
// created, at default settings (spire-server refreshes its entry cache
// every 5 s, lanyard syncs every 5 s), is held until the entry arrives and
// gets its SVID on its first call instead of PermissionDenied.
func TestResyncOnMiss(t *testing.T) {
	s := spiretest.StartServer(t)
	// An entry for another workload, so the node is known and ready.
	s.CreateEntry(t, nodeID, "spiffe://example.org/other", "unix:uid:65534")
	n := newNode(t, s, "", diskKeys)
	l := n.start("-joinToken", s.JoinToken(t, nodeID))
	waitFor(t, 10*time.Second, "the first sync", func() bool { return strings.Contains(l.logs.String(), "First sync with the SPIRE Server done") })

	webID := "spiffe://example.org/web"
	created := time.Now()
	s.CreateEntry(t, nodeID, webID, uidSelector)
	ctx := testContext(t, 20*time.Second)
	// go-spiffe's FetchX509SVID makes one call: PermissionDenied fails it.
	svid, err := workloadapi.FetchX509SVID(ctx, workloadapi.WithAddr("unix://"+n.socket))
	if err != nil {
		t.Fatalf("the first call right after the entry was created: %v", err)
	}
	t.Logf("entry create -> SVID on the first call: %s", time.Since(created).Round(time.Millisecond))
	if svid.ID.String() != webID {
		t.Fatalf("SVID %s, want %s", svid.ID, webID)
	}
}

// TestSwapSpireAgentForLanyard is the drop-in: spire-agent attests with a
// join token and serves; it is stopped and lanyard starts on the very same
// config, without a token, takes over the agent SVID spire-agent stored,
// and serves the same identity without attesting again.
func TestSwapSpireAgentForLanyard(t *testing.T) {
	s := spiretest.StartServer(t)
	webID := "spiffe://example.org/web"
	createEntry(t, s, webID)
	n := newNode(t, s, "", diskKeys)
	if err := os.MkdirAll(filepath.Join(n.dir, "keys"), 0o700); err != nil {
		t.Fatal(err)
	}

	bin := filepath.Join(s.BinDir, "spire-agent")
	var logs testkit.Buffer
	cmd := exec.Command(bin, "run", "-config", n.config, "-joinToken", s.JoinToken(t, nodeID))
	cmd.Stdout, cmd.Stderr = &logs, &logs
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	stopped := false
	stop := func() {
		if stopped {
			return
		}
		stopped = true
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(15 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
	}
	t.Cleanup(func() {
		stop()
		if t.Failed() {
			t.Logf("spire-agent logs:\n%s", logs.String())
		}
	})
	waitFor(t, 60*time.Second, "spire-agent to serve", func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		return exec.CommandContext(ctx, bin, "healthcheck", "-socketPath", n.socket).Run() == nil
	})
	fetchID(t, n.socket, webID)
	stop()
	// Lanyard takes these over only as the agent's own private files
	// (agent.ReadAdoptedFile): check that spire-agent writes them so.
	for _, f := range []string{filepath.Join(n.data, "agent-data.json"), filepath.Join(n.dir, "keys", "keys.json")} {
		var st syscall.Stat_t
		if err := syscall.Lstat(f, &st); err != nil {
			t.Fatal(err)
		}
		if st.Mode&syscall.S_IFMT != syscall.S_IFREG || st.Uid != uint32(os.Geteuid()) || st.Mode&0o7077 != 0 {
			t.Fatalf("spire-agent wrote %s with mode %o, owner uid %d: not a private file of its user", f, st.Mode, st.Uid)
		}
	}

	l := n.start()
	t.Logf("spire-agent stopped -> SVID from lanyard: %s", fetchID(t, n.socket, webID).Round(time.Millisecond))
	waitFor(t, 30*time.Second, "lanyard to take over spire-agent's agent SVID", func() bool {
		return strings.Contains(l.logs.String(), "Took over the agent SVID spire-agent stored")
	})
	var agents struct {
		Agents []json.RawMessage `json:"agents"`
	}
	if err := json.Unmarshal([]byte(s.CLI(t, "agent", "list", "-output", "json")), &agents); err != nil || len(agents.Agents) != 1 {
		t.Fatalf("the server knows %d agents (%v), want the one spire-agent attested", len(agents.Agents), err)
	}
}
