package interop

import (
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/lanyard-dev/lanyard/test/delegate"
	"github.com/lanyard-dev/lanyard/test/spire/spiretest"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	delegatedv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/agent/delegatedidentity/v1"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"
)

// The users of the Delegated Identity comparison. Both agents run as root,
// so their admin sockets are root:root 0770: the callers run in group root,
// as a node proxy shares the agent's group (test/e2e shows the refusal of
// a user outside it).
const (
	delegateUID = 47201 // an authorized delegate
	podUID      = 47202 // the workload it serves
	podGroup    = 47299 // a supplementary group of the workload, in its entry
	strangerUID = 47203 // an entry, not a delegate
	noEntryUID  = 47204 // no entry
	multiUID    = 47205 // a workload with entries sharing a hint, and an admin entry
	callerGID   = 0
)

const (
	delegateID = "spiffe://example.org/delegate"
	podID      = "spiffe://example.org/pod"
	readyID    = "spiffe://example.org/ready"
	multiID    = "spiffe://example.org/multi"
)

func uidSel(uid int) string { return "unix:uid:" + strconv.Itoa(uid) }

// podSelectors are the client's flags for the workload's selectors: its
// entry's, a supplementary group among them, which attestation by PID
// must find too.
var podSelectors = []string{"-selector", uidSel(podUID), "-selector", podGroupSelector}

var podGroupSelector = "unix:supplementary_gid:" + strconv.Itoa(podGroup)

func adminKeys(admin string) string {
	return fmt.Sprintf("    admin_socket_path = %q\n    authorized_delegates = [%q]\n", admin, delegateID)
}

// adminAgent is one agent under comparison.
type adminAgent struct {
	name          string
	socket, admin string
}

// TestDelegatedIdentityAgreesWithSpireAgent runs one Delegated Identity
// client against spire-agent 1.13.3's admin socket and Lanyard's, both
// nodes of one spire-server with the same entries, and compares what each
// answers: the X509-SVID responses by selectors and by PID, the JWT-SVIDs,
// the X.509 and JWT bundles, and the status of every refusal and malformed
// request. Lanyard differs only where it is deliberately better (see
// deliberate below, and the JWKS "use" in compareJWTBundles).
func TestDelegatedIdentityAgreesWithSpireAgent(t *testing.T) {
	testkit.RequireRoot(t, "to run the delegate and the workload under other uids")
	s := spiretest.StartServer(t, spiretest.WithCacheReloadInterval(time.Second))
	setOtherBundle(t, s)
	delegateEntry := s.CreateEntry(t, nodeID, delegateID, uidSel(delegateUID))
	s.CreateEntry(t, nodeID, "spiffe://example.org/stranger", uidSel(strangerUID))
	s.CLI(t, "entry", "create", "-parentID", nodeID, "-spiffeID", podID, "-selector", uidSel(podUID), "-selector", podGroupSelector,
		"-federatesWith", "spiffe://other.org", "-hint", "pod", "-dns", "pod.example.org")
	for _, flags := range [][]string{{"-spiffeID", multiID + "/a", "-hint", "a"}, {"-spiffeID", multiID + "/b", "-hint", "a"}, {"-spiffeID", multiID + "/admin", "-admin"}} {
		s.CLI(t, append([]string{"entry", "create", "-parentID", nodeID, "-selector", uidSel(multiUID)}, flags...)...)
	}
	// Created last: once it reaches an agent, the others have.
	s.CreateEntry(t, nodeID, readyID, uidSelector)

	spireAdmin := filepath.Join(testkit.ShortDir(t, "spa-"), "admin", "admin.sock")
	spire := adminAgent{name: "spire-agent", admin: spireAdmin}
	spire.socket = s.StartAgent(t, s.JoinToken(t, nodeID), spiretest.WithAgentKeys(adminKeys(spireAdmin)), spiretest.WithSyncInterval(time.Second))
	lyAdmin := filepath.Join(testkit.ShortDir(t, "lya-"), "admin", "admin.sock")
	n := newNode(t, s, fastSync+adminKeys(lyAdmin), diskKeys)
	n.start("-joinToken", s.JoinToken(t, nodeID))
	lanyard := adminAgent{name: "lanyard", socket: n.socket, admin: lyAdmin}
	for _, a := range []adminAgent{spire, lanyard} {
		fetchID(t, a.socket, readyID)
	}

	// Both make the admin socket 0770 and its directory 0750: spire-agent
	// asks MkdirAll for 0755 but runs under umask 0027, which it sets
	// itself; Lanyard asks for 0750. Only the agent's user and group may
	// even look in.
	for _, c := range []struct {
		path string
		mode os.FileMode
	}{
		{spireAdmin, os.ModeSocket | 0o770}, {lyAdmin, os.ModeSocket | 0o770},
		{filepath.Dir(spireAdmin), os.ModeDir | 0o750}, {filepath.Dir(lyAdmin), os.ModeDir | 0o750},
	} {
		info, err := os.Lstat(c.path)
		if err != nil {
			t.Fatal(err)
		}
		if info.Mode()&(os.ModeType|os.ModePerm) != c.mode {
			t.Errorf("%s: mode %v, want %v", c.path, info.Mode(), c.mode)
		}
	}

	bin := delegate.Build(t)
	pod := delegate.StartWorkload(t, podUID, podGroup)
	gonePID := delegate.ExitedPID(t, podUID)
	var seen [2]observation
	for i, a := range []adminAgent{spire, lanyard} {
		seen[i] = observe(t, bin, a, pod.Cmd.Process.Pid, gonePID)
	}
	compareObservations(t, s, seen[0], seen[1])
	rotateAuthorities(t, s, seen[:])
	revokeDelegate(t, s, delegateEntry, seen[:], bin)
}

// setOtherBundle gives the server a new bundle of the federated trust
// domain other.org.
func setOtherBundle(t *testing.T, s *spiretest.Server) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "other.pem")
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: testkit.NewCA(t, "spiffe://other.org").Cert.Raw}), 0o600); err != nil {
		t.Fatal(err)
	}
	s.CLI(t, "bundle", "set", "-id", "spiffe://other.org", "-path", path)
}

// revokeDelegate deletes the delegate's entry: each agent re-checks the
// delegate before the next update of each open stream and ends it with
// PermissionDenied. spire-agent re-checks only when the stream has an
// update to send, so the test waits until both agents know the entry is
// gone and then changes a bundle; Lanyard re-checks on every change of
// its cache and may end the streams before.
func revokeDelegate(t *testing.T, s *spiretest.Server, entryID string, seen []observation, bin string) {
	t.Helper()
	s.DeleteEntry(t, entryID)
	for _, o := range seen {
		waitFor(t, rotationBound, o.agent+" to drop the delegate's entry", func() bool {
			m := delegate.Start(t, bin, delegateUID, callerGID, "-workload", o.at.socket, "-admin", o.at.admin, "x509bundles").Next(t, callBound)
			return m.Kind == "self-error" && m.Code == codes.PermissionDenied
		})
	}
	setOtherBundle(t, s)
	for _, o := range seen {
		for name, c := range map[string]*delegate.Client{"X509-SVID": o.svidStream, "X.509 bundle": o.x509BundleStream, "JWT bundle": o.jwtBundleStream} {
			if end := c.End(t, rotationBound); end.Code != codes.PermissionDenied {
				t.Errorf("%s: the %s stream of a delegate whose entry is gone ended with %s (%s), want PermissionDenied", o.agent, name, end.Code, end.Message)
			}
		}
	}
}

// rotateAuthorities rotates the server's X.509 CA and JWT key as SPIRE
// documents it (prepare, activate, taint) and follows each agent's open
// delegate streams: the new CA and key reach the bundle streams, then the
// workload's SVID signed by the new CA reaches its stream, verified
// against the bundles the stream of bundles sent.
func rotateAuthorities(t *testing.T, s *spiretest.Server, seen []observation) {
	t.Helper()
	oldX509 := localAuthorities(t, s, "x509")["active"]
	newX509, newJWT := s.PrepareX509Authority(t), s.PrepareJWTAuthority(t)
	bundles := make([]*x509bundle.Set, len(seen))
	for i, o := range seen {
		m := o.x509BundleStream.Until(t, rotationBound, o.agent+"'s X.509 bundles with the prepared CA", func(m delegate.Msg) bool {
			if m.Kind != "x509bundles" {
				return false
			}
			b, ok := delegate.X509Bundles(t, m.X509Bundles).Get(td)
			return ok && slices.ContainsFunc(b.X509Authorities(), func(c *x509.Certificate) bool { return skiHex(c) == newX509 })
		})
		bundles[i] = delegate.X509Bundles(t, m.X509Bundles)
		o.jwtBundleStream.Until(t, rotationBound, o.agent+"'s JWT bundles with the prepared key", func(m delegate.Msg) bool {
			return m.Kind == "jwtbundles" && jwksKeys(t, m.JWTBundles.Bundles[td.IDString()])[newJWT] != nil
		})
	}
	s.ActivateX509Authority(t, newX509)
	s.CLI(t, "localauthority", "x509", "taint", "-authorityID", oldX509)
	for i, o := range seen {
		m := o.svidStream.Until(t, rotationBound, o.agent+"'s SVID signed by the new CA", func(m delegate.Msg) bool {
			return hasSVIDs(m) && issuedBy(delegate.SVIDs(t, m.X509, nil)[0].Certificates, newX509)
		})
		if svid := delegate.SVIDs(t, m.X509, bundles[i])[0]; svid.ID.String() != podID {
			t.Errorf("%s: the re-signed SVID is for %s, want %s", o.agent, svid.ID, podID)
		}
	}
}

// rotationBound bounds each wait of the rotation: a sync of each agent
// (every second here) and spire-agent's pass over tainted authorities.
const rotationBound = 60 * time.Second

// observation is what one agent answered.
type observation struct {
	agent              string
	at                 adminAgent
	self               string
	bySelectors, byPID *delegatedv1.SubscribeToX509SVIDsResponse
	noEntryFirst       *delegatedv1.SubscribeToX509SVIDsResponse
	// multiX509 and multiJWT are the SPIFFE IDs, sorted, of the SVIDs of
	// the workload with entries sharing a hint and an admin entry.
	multiX509, multiJWT    []string
	x509Bundles            *delegatedv1.SubscribeToX509BundlesResponse
	jwtBundles             *delegatedv1.SubscribeToJWTBundlesResponse
	jwtBySelectors, jwtPID *delegatedv1.FetchJWTSVIDsResponse
	// refusals is the status each refusal case ended with.
	refusals map[string]codes.Code
	// gonePIDX509 is the first thing a subscription for an exited PID
	// got: an "end" or an "x509" message.
	gonePIDX509 delegate.Msg
	// The streams left open, for the rotation.
	svidStream, x509BundleStream, jwtBundleStream *delegate.Client
}

func hasSVIDs(m delegate.Msg) bool { return m.Kind == "x509" && len(m.X509.X509Svids) > 0 }

// refusal is a call that an agent refuses, or answers with an error.
type refusal struct {
	name string
	uid  int
	args []string // the client's flags, before the call
	call string
}

func refusals(podPID, gonePID int) []refusal {
	pid := strconv.Itoa(podPID)
	sel := podSelectors
	return []refusal{
		{"not a delegate: x509", strangerUID, sel, "x509"},
		{"not a delegate: x509 bundles", strangerUID, nil, "x509bundles"},
		{"not a delegate: jwt bundles", strangerUID, nil, "jwtbundles"},
		{"not a delegate: jwt", strangerUID, append([]string{"-audience", "db"}, sel...), "jwt"},
		{"not a delegate: malformed x509", strangerUID, nil, "x509"},
		{"no entry: x509", noEntryUID, sel, "x509"},
		{"no entry: x509 bundles", noEntryUID, nil, "x509bundles"},
		{"no entry: jwt", noEntryUID, append([]string{"-audience", "db"}, sel...), "jwt"},
		{"selectors and pid: x509", delegateUID, append([]string{"-pid", pid}, sel...), "x509"},
		{"selectors and pid: jwt", delegateUID, append([]string{"-audience", "db", "-pid", pid}, sel...), "jwt"},
		{"neither: x509", delegateUID, nil, "x509"},
		{"neither: jwt", delegateUID, []string{"-audience", "db"}, "jwt"},
		{"selector without type", delegateUID, []string{"-selector", ":uid:1"}, "x509"},
		{"selector without value", delegateUID, []string{"-selector", "unix:"}, "x509"},
		{"jwt without audience", delegateUID, sel, "jwt"},
		{"jwt without audience, not a delegate", strangerUID, sel, "jwt"},
		{"jwt for selectors with no entry", delegateUID, []string{"-audience", "db", "-selector", uidSel(4242424)}, "jwt"},
		{"jwt for an exited pid", delegateUID, []string{"-audience", "db", "-pid", strconv.Itoa(gonePID)}, "jwt"},
		{"jwt for a negative pid", delegateUID, []string{"-audience", "db", "-pid", "-1"}, "jwt"},
		{"jwt with an empty audience", delegateUID, append([]string{"-audience", ""}, sel...), "jwt"},
		{"jwt with too many selectors", delegateUID, append(append([]string{"-audience", "db"}, sel...), manySelectors(maxSelectors+1-2)...), "jwt"},
		{"jwt with too many audiences", delegateUID, append(manyAudiences(maxAudiences+1), sel...), "jwt"},
	}
}

// manySelectors are n selectors that no entry has, as client flags.
func manySelectors(n int) []string {
	var out []string
	for i := range n {
		out = append(out, "-selector", "unix:gid:"+strconv.Itoa(50000+i))
	}
	return out
}

// manyAudiences are n audiences, as client flags.
func manyAudiences(n int) []string {
	var out []string
	for i := range n {
		out = append(out, "-audience", "aud"+strconv.Itoa(i))
	}
	return out
}

// Lanyard's bounds on a request (adminapi's maxSelectors, maxAudiences):
// a delegate names a workload by a few selectors (Cilium by one) or by
// PID, and audiences key the token cache. spire-agent has none.
const (
	maxSelectors = 64
	maxAudiences = 32
)

// deliberate are the calls where Lanyard answers otherwise than
// spire-agent 1.13.3, on purpose (spire-agent's code first):
//   - an exited PID: spire-agent attests it to no selectors (its unix
//     attestor's error is only logged) and answers as for a workload with
//     no entry; Lanyard says the process is not there, as the SPIFFE
//     Broker API answers for a PID reference;
//   - a negative PID: spire-agent attests it as it does an exited one;
//     Lanyard refuses the malformed request;
//   - an empty audience: spire-agent asks the server, which refuses, and
//     answers Unavailable (retry: forever); Lanyard refuses the request;
//   - too many selectors or audiences: spire-agent has no bound.
var deliberate = map[string][2]codes.Code{
	"jwt for an exited pid":       {codes.PermissionDenied, codes.NotFound},
	"jwt for a negative pid":      {codes.PermissionDenied, codes.InvalidArgument},
	"jwt with an empty audience":  {codes.Unavailable, codes.InvalidArgument},
	"jwt with too many selectors": {codes.OK, codes.InvalidArgument},
	"jwt with too many audiences": {codes.OK, codes.InvalidArgument},
}

const callBound = 30 * time.Second

func observe(t *testing.T, bin string, a adminAgent, podPID, gonePID int) observation {
	t.Helper()
	o := observation{agent: a.name, at: a, refusals: map[string]codes.Code{}}
	run := func(uid int, args ...string) *delegate.Client {
		return delegate.Start(t, bin, uid, callerGID, append([]string{"-admin", a.admin}, args...)...)
	}
	first := func(c *delegate.Client, kind string) delegate.Msg {
		return c.Until(t, callBound, a.name+"'s first "+kind+" message", func(m delegate.Msg) bool { return m.Kind == kind })
	}
	o.x509BundleStream = run(delegateUID, "-workload", a.socket, "x509bundles")
	o.self = o.x509BundleStream.Next(t, callBound).Self
	o.x509Bundles = first(o.x509BundleStream, "x509bundles").X509Bundles
	o.jwtBundleStream = run(delegateUID, "jwtbundles")
	o.jwtBundles = first(o.jwtBundleStream, "jwtbundles").JWTBundles
	o.svidStream = run(delegateUID, append(podSelectors, "x509")...)
	o.bySelectors = o.svidStream.Until(t, callBound, a.name+"'s SVIDs by selectors", hasSVIDs).X509
	o.byPID = run(delegateUID, "-pid", strconv.Itoa(podPID), "x509").Until(t, callBound, a.name+"'s SVIDs by PID", hasSVIDs).X509
	o.noEntryFirst = first(run(delegateUID, "-selector", uidSel(4242424), "x509"), "x509").X509
	for _, x := range run(delegateUID, "-selector", uidSel(multiUID), "x509").Until(t, callBound, a.name+"'s SVIDs of the workload with many entries", hasSVIDs).X509.X509Svids {
		o.multiX509 = append(o.multiX509, delegate.IDString(x.X509Svid.Id))
	}
	for _, x := range first(run(delegateUID, "-audience", "db", "-selector", uidSel(multiUID), "jwt"), "jwt").JWT.Svids {
		o.multiJWT = append(o.multiJWT, delegate.IDString(x.Id))
	}
	slices.Sort(o.multiX509)
	slices.Sort(o.multiJWT)
	o.jwtBySelectors = first(run(delegateUID, append([]string{"-audience", "db"}, append(podSelectors, "jwt")...)...), "jwt").JWT
	o.jwtPID = first(run(delegateUID, "-audience", "db", "-pid", strconv.Itoa(podPID), "jwt"), "jwt").JWT
	o.gonePIDX509 = run(delegateUID, "-pid", strconv.Itoa(gonePID), "x509").Until(t, callBound, a.name+"'s answer for an exited PID", func(m delegate.Msg) bool {
		return m.Kind == "x509" || m.Kind == "end"
	})
	for _, r := range refusals(podPID, gonePID) {
		// A response instead of the refusal is recorded as OK.
		end := run(r.uid, append(r.args, r.call)...).Until(t, callBound, a.name+"'s answer to "+r.name, func(m delegate.Msg) bool {
			return m.Kind == "end" || m.Kind == r.call
		})
		o.refusals[r.name] = end.Code
		t.Logf("%s: %s: %s (%s)", a.name, r.name, end.Code, end.Message)
	}
	return o
}

func compareObservations(t *testing.T, s *spiretest.Server, spire, lanyard observation) {
	t.Helper()
	for _, o := range []observation{spire, lanyard} {
		if o.self != delegateID {
			t.Errorf("%s: the delegate's own SVID is %q, want %s", o.agent, o.self, delegateID)
		}
	}
	serverBundles := delegate.X509Bundles(t, spire.x509Bundles)
	compareX509Bundles(t, s, spire.x509Bundles, lanyard.x509Bundles)
	compareJWTBundles(t, spire.jwtBundles, lanyard.jwtBundles)
	compareX509SVIDs(t, "by selectors", spire.bySelectors, lanyard.bySelectors, serverBundles)
	compareX509SVIDs(t, "by PID", spire.byPID, lanyard.byPID, serverBundles)
	compareX509SVIDs(t, "spire-agent by selectors and by PID", spire.bySelectors, spire.byPID, serverBundles)
	// A workload with no entry: one empty update, and the stream waits.
	for _, o := range []observation{spire, lanyard} {
		if len(o.noEntryFirst.X509Svids) != 0 || len(o.noEntryFirst.FederatesWith) != 0 {
			t.Errorf("%s: for selectors with no entry the first update is %v, want an empty one", o.agent, o.noEntryFirst)
		}
	}
	compareMultipleEntries(t, spire, lanyard)
	compareJWTSVIDs(t, "by selectors", spire, lanyard, spire.jwtBySelectors, lanyard.jwtBySelectors)
	compareJWTSVIDs(t, "by PID", spire, lanyard, spire.jwtPID, lanyard.jwtPID)

	for _, name := range slices.Sorted(maps.Keys(spire.refusals)) {
		got := [2]codes.Code{spire.refusals[name], lanyard.refusals[name]}
		want, ok := deliberate[name]
		switch {
		case ok && got != want:
			t.Errorf("%s: spire-agent %s, lanyard %s; want the deliberate difference %s, %s", name, got[0], got[1], want[0], want[1])
		case !ok && got[0] != got[1]:
			t.Errorf("%s: spire-agent %s, lanyard %s", name, got[0], got[1])
		case !ok && got[0] == codes.OK:
			t.Errorf("%s: both agents answered OK to a call they should refuse", name)
		}
	}
	// An exited PID: spire-agent subscribes to no selectors (an empty
	// update, then nothing); Lanyard ends the call with NotFound, as it
	// ends a subscription whose process exits (test/e2e).
	if m := spire.gonePIDX509; m.Kind != "x509" || len(m.X509.X509Svids) != 0 {
		t.Errorf("spire-agent for an exited PID: %+v, want an empty update (if this changed, Lanyard's NotFound may now be the common answer)", m)
	}
	if m := lanyard.gonePIDX509; m.Kind != "end" || m.Code != codes.NotFound {
		t.Errorf("lanyard for an exited PID: %+v, want NotFound", m)
	}
}

// compareMultipleEntries checks what spire-agent answers for a workload
// whose entries share a hint, one of them an admin entry: every entry's
// SVID but the admin one's (the Workload API's rule that a hint is unique
// in a response does not apply here), and a JWT-SVID for every entry, the
// admin one's too; Lanyard must answer the same (its Workload API keeps
// one SVID per hint, its Delegated Identity API does not).
func compareMultipleEntries(t *testing.T, spire, lanyard observation) {
	t.Helper()
	a, b, admin := multiID+"/a", multiID+"/b", multiID+"/admin"
	if want := []string{a, b}; !slices.Equal(spire.multiX509, want) {
		t.Errorf("spire-agent's X509-SVIDs for a workload with entries sharing a hint and an admin entry: %v, want %v", spire.multiX509, want)
	}
	if want := []string{a, admin, b}; !slices.Equal(spire.multiJWT, want) {
		t.Errorf("spire-agent's JWT-SVIDs for a workload with entries sharing a hint and an admin entry: %v, want %v", spire.multiJWT, want)
	}
	if !slices.Equal(lanyard.multiX509, spire.multiX509) || !slices.Equal(lanyard.multiJWT, spire.multiJWT) {
		t.Errorf("for entries sharing a hint and an admin entry, spire-agent sends X509-SVIDs %v and JWT-SVIDs %v, lanyard %v and %v",
			spire.multiX509, spire.multiJWT, lanyard.multiX509, lanyard.multiJWT)
	}
}

func compareX509Bundles(t *testing.T, s *spiretest.Server, spire, lanyard *delegatedv1.SubscribeToX509BundlesResponse) {
	t.Helper()
	if !slices.Equal(slices.Sorted(maps.Keys(spire.CaCertificates)), []string{"spiffe://example.org", "spiffe://other.org"}) {
		t.Errorf("spire-agent's X.509 bundles are for %v, want example.org and other.org", slices.Sorted(maps.Keys(spire.CaCertificates)))
	}
	got, want := delegate.X509Bundles(t, lanyard), delegate.X509Bundles(t, spire)
	if got.Len() != want.Len() {
		t.Errorf("X.509 bundles: lanyard %d, spire-agent %d", got.Len(), want.Len())
	}
	for _, b := range want.Bundles() {
		mine, ok := got.Get(b.TrustDomain())
		if !ok || !mine.Equal(b) {
			t.Errorf("the X.509 bundle of %s differs: lanyard %v, spire-agent %v", b.TrustDomain(), mine, b)
		}
	}
	if server := serverBundle(t, s); !want.Bundles()[0].Equal(server) && !want.Bundles()[1].Equal(server) {
		t.Error("spire-agent's X.509 bundles do not include the server's")
	}
}

// compareJWTBundles compares every key's fields. spire-agent sends
// "standard JWKS" (bundleutil.StandardJWKS: no "use"); Lanyard's keys carry
// "use": "jwt-svid", as the JWT-SVID spec (section 6.1) requires of a key
// in a SPIFFE bundle and as its Workload API sends them. A client that
// reads plain JWKS (go-spiffe's jwtbundle.Parse) reads both.
func compareJWTBundles(t *testing.T, spire, lanyard *delegatedv1.SubscribeToJWTBundlesResponse) {
	t.Helper()
	if got, want := slices.Sorted(maps.Keys(lanyard.Bundles)), slices.Sorted(maps.Keys(spire.Bundles)); !slices.Equal(got, want) {
		t.Errorf("JWT bundles for %v, spire-agent's for %v", got, want)
	}
	for tdID, spireJWKS := range spire.Bundles {
		want, got := jwksKeys(t, spireJWKS), jwksKeys(t, lanyard.Bundles[tdID])
		if len(want) != len(got) {
			t.Errorf("%s: lanyard's JWKS has %d keys, spire-agent's %d:\n%s\n%s", tdID, len(got), len(want), lanyard.Bundles[tdID], spireJWKS)
		}
		for kid, w := range want {
			g := got[kid]
			if g["use"] != "jwt-svid" {
				t.Errorf("%s: lanyard's key %s has use %v, want jwt-svid", tdID, kid, g["use"])
			}
			delete(g, "use")
			if !maps.EqualFunc(g, w, func(a, b any) bool { return fmt.Sprint(a) == fmt.Sprint(b) }) {
				t.Errorf("%s: key %s: lanyard %v, spire-agent %v", tdID, kid, g, w)
			}
		}
	}
}

// jwksKeys is a JWKS's keys by kid, each with all its fields.
func jwksKeys(t *testing.T, jwks []byte) map[string]map[string]any {
	t.Helper()
	var set struct {
		Keys []map[string]any `json:"keys"`
	}
	if err := json.Unmarshal(jwks, &set); err != nil {
		t.Fatalf("a JWKS does not parse: %v\n%s", err, jwks)
	}
	out := map[string]map[string]any{}
	for _, k := range set.Keys {
		out[fmt.Sprint(k["kid"])] = k
	}
	return out
}

// compareX509SVIDs compares two X509-SVID responses' shape: the same
// identities in the same order, hints, federates_with, chain lengths,
// DNS names and lifetimes; both verify against the server's bundle.
func compareX509SVIDs(t *testing.T, what string, a, b *delegatedv1.SubscribeToX509SVIDsResponse, bundles *x509bundle.Set) {
	t.Helper()
	as, bs := delegate.SVIDs(t, a, bundles), delegate.SVIDs(t, b, bundles)
	if len(as) != 1 || len(bs) != 1 {
		t.Fatalf("%s: %d and %d SVIDs, want 1 (%s) each", what, len(as), len(bs), podID)
	}
	if !slices.Equal(a.FederatesWith, b.FederatesWith) || !slices.Equal(a.FederatesWith, []string{"spiffe://other.org"}) {
		t.Errorf("%s: federates_with %v and %v, want [spiffe://other.org]", what, a.FederatesWith, b.FederatesWith)
	}
	x, y := as[0], bs[0]
	if x.ID.String() != podID || y.ID != x.ID || x.Hint != "pod" || y.Hint != x.Hint {
		t.Errorf("%s: %s hint %q and %s hint %q, want %s hint pod", what, x.ID, x.Hint, y.ID, y.Hint, podID)
	}
	lx, ly := x.Certificates[0], y.Certificates[0]
	if len(x.Certificates) != len(y.Certificates) || !slices.Equal(lx.DNSNames, ly.DNSNames) || lifetime(lx) != lifetime(ly) {
		t.Errorf("%s: chain %d vs %d certificates, DNS names %v vs %v, lifetime %s vs %s", what,
			len(x.Certificates), len(y.Certificates), lx.DNSNames, ly.DNSNames, lifetime(lx), lifetime(ly))
	}
}

func lifetime(c *x509.Certificate) time.Duration {
	return c.NotAfter.Sub(c.NotBefore).Round(time.Second)
}

func compareJWTSVIDs(t *testing.T, what string, spire, lanyard observation, a, b *delegatedv1.FetchJWTSVIDsResponse) {
	t.Helper()
	if len(a.Svids) != 1 || len(b.Svids) != 1 {
		t.Fatalf("JWT %s: %d and %d JWT-SVIDs, want 1 each", what, len(a.Svids), len(b.Svids))
	}
	x, y := a.Svids[0], b.Svids[0]
	if x.Hint != y.Hint || !proto.Equal(x.Id, y.Id) || x.ExpiresAt-x.IssuedAt != y.ExpiresAt-y.IssuedAt {
		t.Errorf("JWT %s: spire-agent %s hint %q lifetime %ds, lanyard %s hint %q lifetime %ds", what,
			delegate.IDString(x.Id), x.Hint, x.ExpiresAt-x.IssuedAt, delegate.IDString(y.Id), y.Hint, y.ExpiresAt-y.IssuedAt)
	}
	// Each validates against either agent's JWT bundles: the server's keys.
	for _, svid := range []*struct {
		token string
		exp   int64
	}{{x.Token, x.ExpiresAt}, {y.Token, y.ExpiresAt}} {
		for _, o := range []observation{spire, lanyard} {
			parsed, err := jwtsvid.ParseAndValidate(svid.token, delegate.JWTBundles(t, o.jwtBundles), []string{"db"})
			if err != nil || parsed.ID.String() != podID || parsed.Expiry.Unix() != svid.exp {
				t.Errorf("JWT %s: a JWT-SVID does not validate against %s's JWT bundles as %s: %v", what, o.agent, podID, err)
			}
		}
	}
}
