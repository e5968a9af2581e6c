// Package delegate builds and runs the Delegated Identity API client of
// test/delegate/client under the uid and gid a test names, and reads its
// answers: the same client for Lanyard's admin socket (test/e2e) and for
// spire-agent's (test/interop).
package delegate

import (
	"bytes"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	delegatedv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/agent/delegatedidentity/v1"
	"github.com/spiffe/spire-api-sdk/proto/spire/api/types"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
)

// Build compiles the client into a directory every user may read and
// returns its path.
func Build(t testing.TB) string {
	t.Helper()
	bin := filepath.Join(testkit.ShortDir(t, "dlg-"), "client")
	out, err := exec.Command("go", "build", "-o", bin, "github.com/lanyard-dev/lanyard/test/delegate/client").CombinedOutput()
	if err != nil {
		t.Fatalf("building the delegate client: %v\n%s", err, out)
	}
	return bin
}

// Client is a running client.
type Client struct {
	child *testkit.Child
}

// Start runs the client bin as uid with primary group gid and no
// supplementary groups; it is stopped when the test ends.
func Start(t testing.TB, bin string, uid, gid int, args ...string) *Client {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)},
		Pdeathsig:  syscall.SIGKILL,
	}
	return &Client{child: testkit.StartChild(t, cmd)}
}

// StartWorkload runs a process of uid (and gid uid, with the
// supplementary groups) that sleeps: a workload for a delegate to name by
// PID or by selectors. It is killed when the test ends.
func StartWorkload(t testing.TB, uid int, groups ...uint32) *testkit.Child {
	t.Helper()
	cmd := exec.Command("sleep", "600")
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(uid), Groups: groups},
		Pdeathsig:  syscall.SIGKILL,
	}
	return testkit.StartChild(t, cmd)
}

// ExitedPID is the PID of a process of uid that has exited and been
// reaped.
func ExitedPID(t testing.TB, uid int) int {
	t.Helper()
	cmd := exec.Command("true")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(uid)}}
	if err := cmd.Run(); err != nil {
		t.Fatal(err)
	}
	return cmd.Process.Pid
}

// Msg is one line of the client's output: one response, or the end.
type Msg struct {
	// Kind is the call ("x509", "jwt", "x509bundles", "jwtbundles"),
	// "self" (the client's own SPIFFE ID, in Self), "self-error" (in
	// Code and Message) or "end".
	Kind        string
	Self        string
	X509        *delegatedv1.SubscribeToX509SVIDsResponse
	JWT         *delegatedv1.FetchJWTSVIDsResponse
	X509Bundles *delegatedv1.SubscribeToX509BundlesResponse
	JWTBundles  *delegatedv1.SubscribeToJWTBundlesResponse
	Code        codes.Code
	Message     string
}

// Next is the client's next line, failing the test after bound or when
// the client printed nothing more.
func (c *Client) Next(t testing.TB, bound time.Duration) Msg {
	t.Helper()
	line, ok := c.child.Next(t, bound)
	if !ok {
		t.Fatalf("the delegate client ended without a word; stderr:\n%s", c.child.Stderr.String())
	}
	kind, rest, _ := strings.Cut(line, " ")
	m := Msg{Kind: kind}
	var into proto.Message
	switch kind {
	case "self":
		m.Self = rest
	case "end", "self-error":
		// "<code name> <message>", as grpc's codes.Code.String spells it.
		name, msg, _ := strings.Cut(rest, " ")
		m.Code, m.Message = codeNamed(t, name), msg
	case "x509":
		m.X509 = &delegatedv1.SubscribeToX509SVIDsResponse{}
		into = m.X509
	case "jwt":
		m.JWT = &delegatedv1.FetchJWTSVIDsResponse{}
		into = m.JWT
	case "x509bundles":
		m.X509Bundles = &delegatedv1.SubscribeToX509BundlesResponse{}
		into = m.X509Bundles
	case "jwtbundles":
		m.JWTBundles = &delegatedv1.SubscribeToJWTBundlesResponse{}
		into = m.JWTBundles
	default:
		t.Fatalf("the delegate client printed %q", line)
	}
	if into != nil {
		if err := protojson.Unmarshal([]byte(rest), into); err != nil {
			t.Fatalf("the delegate client's %s line does not parse: %v\n%s", kind, err, line)
		}
	}
	return m
}

func codeNamed(t testing.TB, name string) codes.Code {
	for c := codes.OK; c <= codes.Unauthenticated; c++ {
		if c.String() == name {
			return c
		}
	}
	t.Fatalf("the delegate client printed an unknown status code %q", name)
	return codes.Unknown
}

// Until reads lines until one satisfies cond, failing the test if the call
// ends first (unless cond accepts the end) or after bound.
func (c *Client) Until(t testing.TB, bound time.Duration, what string, cond func(Msg) bool) Msg {
	t.Helper()
	deadline := time.Now().Add(bound)
	for {
		m := c.Next(t, time.Until(deadline))
		if cond(m) {
			return m
		}
		if m.Kind == "end" || m.Kind == "self-error" {
			t.Fatalf("the call ended with %s (%s) while waiting for %s", m.Code, m.Message, what)
		}
	}
}

// End reads lines until the call ends and returns its end.
func (c *Client) End(t testing.TB, bound time.Duration) Msg {
	t.Helper()
	return c.Until(t, bound, "the end of the call", func(m Msg) bool { return m.Kind == "end" || m.Kind == "self-error" })
}

// Args builds the client's arguments: the call, the workload's selectors
// and, when pid is not 0, its PID.
func Args(workloadSocket, adminSocket, call string, pid int, selectors ...string) []string {
	args := []string{"-admin", adminSocket}
	if workloadSocket != "" {
		args = append(args, "-workload", workloadSocket)
	}
	for _, s := range selectors {
		args = append(args, "-selector", s)
	}
	if pid != 0 {
		args = append(args, "-pid", strconv.Itoa(pid))
	}
	return append(args, call)
}

// SVIDs parses every X509-SVID of a response with its key (go-spiffe
// checks the key matches the leaf) and checks each against the bundles.
func SVIDs(t testing.TB, resp *delegatedv1.SubscribeToX509SVIDsResponse, bundles x509bundle.Source) []*x509svid.SVID {
	t.Helper()
	var out []*x509svid.SVID
	for i, s := range resp.X509Svids {
		svid, err := x509svid.ParseRaw(bytes.Join(s.X509Svid.CertChain, nil), s.X509SvidKey)
		if err != nil {
			t.Fatalf("delegated X509-SVID %d does not parse: %v", i, err)
		}
		if svid.ID.String() != IDString(s.X509Svid.Id) {
			t.Fatalf("delegated X509-SVID %d is for %s, the response says %s", i, svid.ID, IDString(s.X509Svid.Id))
		}
		if got, want := s.X509Svid.ExpiresAt, svid.Certificates[0].NotAfter.Unix(); got != want {
			t.Fatalf("delegated X509-SVID %d: expires_at %d, its certificate's NotAfter %d", i, got, want)
		}
		if bundles != nil {
			if _, _, err := x509svid.Verify(svid.Certificates, bundles); err != nil {
				t.Fatalf("delegated X509-SVID %d (%s) does not verify against the bundle: %v", i, svid.ID, err)
			}
		}
		svid.Hint = s.X509Svid.Hint
		out = append(out, svid)
	}
	return out
}

// IDString is a SPIFFE ID message as a string.
func IDString(id *types.SPIFFEID) string {
	if id == nil {
		return ""
	}
	return "spiffe://" + id.TrustDomain + id.Path
}

// X509Bundles parses an X.509 bundles response.
func X509Bundles(t testing.TB, resp *delegatedv1.SubscribeToX509BundlesResponse) *x509bundle.Set {
	t.Helper()
	set := x509bundle.NewSet()
	for tdID, der := range resp.CaCertificates {
		b, err := x509bundle.ParseRaw(trustDomain(t, tdID), der)
		if err != nil {
			t.Fatalf("the X.509 bundle of %s does not parse: %v", tdID, err)
		}
		set.Add(b)
	}
	return set
}

// JWTBundles parses a JWT bundles response.
func JWTBundles(t testing.TB, resp *delegatedv1.SubscribeToJWTBundlesResponse) *jwtbundle.Set {
	t.Helper()
	set := jwtbundle.NewSet()
	for tdID, jwks := range resp.Bundles {
		b, err := jwtbundle.Parse(trustDomain(t, tdID), jwks)
		if err != nil {
			t.Fatalf("the JWT bundle of %s does not parse: %v\n%s", tdID, err, jwks)
		}
		set.Add(b)
	}
	return set
}

// trustDomain parses a bundle map's key, which must be "spiffe://<td>".
func trustDomain(t testing.TB, key string) spiffeid.TrustDomain {
	t.Helper()
	td, err := spiffeid.TrustDomainFromString(key)
	if err != nil || td.IDString() != key {
		t.Fatalf("bundle key %q is not a trust domain's SPIFFE ID: %v", key, err)
	}
	return td
}
