package workloadapi

import (
	"bytes"
	"context"
	"crypto/x509"
	"fmt"
	"io"
	"maps"
	"net"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/attestor"
	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/lanyard-dev/lanyard/internal/testkit/fakeagent"
	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"golang.org/x/net/http2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// received is one message of a stream, or how it ended.
type received[T any] struct {
	msg T
	err error
}

// readStream receives from a stream in the background until it ends.
func readStream[T any](t *testing.T, recv func() (T, error)) <-chan received[T] {
	ch := make(chan received[T], 16)
	done := t.Context().Done()
	go func() {
		for {
			m, err := recv()
			select {
			case ch <- received[T]{m, err}:
			case <-done:
				return
			}
			if err != nil {
				return
			}
		}
	}()
	return ch
}

func nextMsg[T any](t *testing.T, ch <-chan received[T], what string) T {
	t.Helper()
	select {
	case r := <-ch:
		if r.err != nil {
			t.Fatalf("%s: the stream ended: %v", what, r.err)
		}
		return r.msg
	case <-time.After(waitLimit):
		t.Fatalf("%s: no message within %s", what, waitLimit)
	}
	var zero T
	return zero
}

// streamEnd waits for the stream to end with code.
func streamEnd[T any](t *testing.T, ch <-chan received[T], code codes.Code, what string) error {
	t.Helper()
	select {
	case r := <-ch:
		if r.err == nil {
			t.Fatalf("%s: got a message %v, want the stream to end with %s", what, r.msg, code)
		}
		if status.Code(r.err) != code {
			t.Fatalf("%s: the stream ended with %v, want %s", what, r.err, code)
		}
		return r.err
	case <-time.After(waitLimit):
		t.Fatalf("%s: the stream did not end within %s", what, waitLimit)
	}
	return nil
}

// quiet checks that nothing arrives for quietFor.
func quiet[T any](t *testing.T, ch <-chan received[T], what string) {
	t.Helper()
	select {
	case r := <-ch:
		if r.err != nil {
			t.Fatalf("%s: the stream ended: %v", what, r.err)
		}
		t.Fatalf("%s: got a message that repeats the last one: %v", what, r.msg)
	case <-time.After(quietFor):
	}
}

// notified reports whether sub was woken, proving that a change reached the
// cache's subscribers.
func notified(t *testing.T, sub *agent.Subscription) {
	t.Helper()
	select {
	case <-sub.C:
	case <-time.After(waitLimit):
		t.Fatal("the cache did not notify its subscribers")
	}
}

func derOf(certs ...*x509.Certificate) []byte {
	var out []byte
	for _, c := range certs {
		out = append(out, c.Raw...)
	}
	return out
}

// checkX509Response checks every SVID of resp against its bundle, which
// must hold exactly roots, and returns the SPIFFE IDs in order.
func checkX509Response(t *testing.T, resp *workload.X509SVIDResponse, roots ...*x509.Certificate) []string {
	t.Helper()
	var ids []string
	for i, s := range resp.Svids {
		if !bytes.Equal(s.Bundle, derOf(roots...)) {
			t.Fatalf("SVID %d (%s): the bundle is not the %d expected roots", i, s.SpiffeId, len(roots))
		}
		svid, err := x509svid.ParseRaw(s.X509Svid, s.X509SvidKey)
		if err != nil {
			t.Fatalf("SVID %d (%s): %v", i, s.SpiffeId, err)
		}
		if svid.ID.String() != s.SpiffeId {
			t.Fatalf("SVID %d: certificate for %s, response says %s", i, svid.ID, s.SpiffeId)
		}
		bundle, err := x509bundle.ParseRaw(tdExample, s.Bundle)
		if err != nil {
			t.Fatal(err)
		}
		if _, _, err := x509svid.Verify(svid.Certificates, bundle); err != nil {
			t.Fatalf("SVID %d (%s) does not chain to its bundle: %v", i, s.SpiffeId, err)
		}
		ids = append(ids, s.SpiffeId)
	}
	return ids
}

func leafSerial(t *testing.T, s *workload.X509SVID) string {
	t.Helper()
	certs, err := x509.ParseCertificates(s.X509Svid)
	if err != nil || len(certs) == 0 {
		t.Fatalf("SVID %s: %v", s.SpiffeId, err)
	}
	return certs[0].SerialNumber.String()
}

func openX509Stream(t *testing.T, c workload.SpiffeWorkloadAPIClient) <-chan received[*workload.X509SVIDResponse] {
	t.Helper()
	stream, err := c.FetchX509SVID(callCtx(t), &workload.X509SVIDRequest{})
	if err != nil {
		t.Fatal(err)
	}
	return readStream(t, stream.Recv)
}

func openX509BundlesStream(t *testing.T, c workload.SpiffeWorkloadAPIClient) <-chan received[*workload.X509BundlesResponse] {
	t.Helper()
	stream, err := c.FetchX509Bundles(callCtx(t), &workload.X509BundlesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	return readStream(t, stream.Recv)
}

func openJWTBundlesStream(t *testing.T, c workload.SpiffeWorkloadAPIClient) <-chan received[*workload.JWTBundlesResponse] {
	t.Helper()
	stream, err := c.FetchJWTBundles(callCtx(t), &workload.JWTBundlesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	return readStream(t, stream.Recv)
}

func TestX509StreamSendsEveryChangeAndNothingElse(t *testing.T) {
	a := newEntry("/a", 1, mySelector())
	a.Hint = "internal"
	other := newEntry("/other", 2, otherSelector())
	e := newTestEnv(t, envOptions{entries: []*agent.Entry{a, other}})
	ch := openX509Stream(t, e.client(t))

	first := nextMsg(t, ch, "first message")
	if ids := checkX509Response(t, first, e.ca.Cert); !slices.Equal(ids, []string{"spiffe://example.org/a"}) {
		t.Fatalf("first message has %v", ids)
	}
	if first.Svids[0].Hint != "internal" {
		t.Fatalf("hint = %q", first.Svids[0].Hint)
	}
	if len(first.FederatedBundles) != 0 {
		t.Fatalf("federated bundles without federates_with: %v", first.FederatedBundles)
	}
	serialA := leafSerial(t, first.Svids[0])

	// Changes the caller cannot see wake the stream but send nothing.
	sub := e.cache.Subscribe()
	defer sub.Close()
	other2 := newEntry("/other", 2, otherSelector())
	other2.DNSNames = []string{"other.example.org"}
	e.cache.SetEntries([]*agent.Entry{a, other2})
	notified(t, sub)
	quiet(t, ch, "after a change to another caller's entry")
	e.cache.SetBundles(e.up.LocalBundle(t, tdExample, e.ca.Cert), []*spiffebundle.Bundle{federatedBundle(t, tdThird)})
	notified(t, sub)
	quiet(t, ch, "after a federated bundle the caller does not federate with")
	e.cache.SetBundles(e.up.LocalBundle(t, tdExample, e.ca.Cert), nil)
	notified(t, sub)
	quiet(t, ch, "after that federated bundle was removed again")
	e.cache.SetBundles(e.up.LocalBundle(t, tdExample, e.ca.Cert), nil)
	quiet(t, ch, "after an identical bundle")

	// A new identity: both SVIDs, the older entry first, the old SVID kept.
	b := newEntry("/b", 3, mySelector())
	e.cache.SetEntries([]*agent.Entry{a, other2, b})
	msg := nextMsg(t, ch, "after adding an identity")
	if ids := checkX509Response(t, msg, e.ca.Cert); !slices.Equal(ids, []string{"spiffe://example.org/a", "spiffe://example.org/b"}) {
		t.Fatalf("after adding an identity: %v", ids)
	}
	if leafSerial(t, msg.Svids[0]) != serialA {
		t.Fatal("adding an identity re-signed the existing one")
	}

	// A new root in the bundle.
	ca2 := newTestCA(t, tdExample, "ca 2")
	e.cache.SetBundles(e.up.LocalBundle(t, tdExample, e.ca.Cert, ca2.Cert), nil)
	msg = nextMsg(t, ch, "after a new root")
	checkX509Response(t, msg, e.ca.Cert, ca2.Cert)
	quiet(t, ch, "after the new root's message")

	// The old root leaves the bundle: SVIDs are re-signed by the new CA.
	e.up.SetCA(ca2)
	e.cache.SetBundles(e.up.LocalBundle(t, tdExample, ca2.Cert), nil)
	deadline := time.Now().Add(waitLimit)
	for {
		msg = nextMsg(t, ch, "after the old root was removed")
		if !bytes.Equal(msg.Svids[0].Bundle, derOf(ca2.Cert)) {
			t.Fatal("the bundle still holds the removed root")
		}
		bundle, err := x509bundle.ParseRaw(tdExample, msg.Svids[0].Bundle)
		if err != nil {
			t.Fatal(err)
		}
		allChain := true
		for _, s := range msg.Svids {
			if _, _, err := x509svid.ParseAndVerify(splitDER(t, s.X509Svid), bundle); err != nil {
				allChain = false
			}
		}
		if allChain {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the SVIDs were not re-signed by the new CA")
		}
	}
	quiet(t, ch, "after the re-signed SVIDs")

	// The hint changes: a message.
	a2 := newEntry("/a", 1, mySelector())
	a2.Hint = "renamed"
	e.cache.SetEntries([]*agent.Entry{a2, other2, b})
	msg = nextMsg(t, ch, "after a hint change")
	if msg.Svids[0].Hint != "renamed" {
		t.Fatalf("hint = %q", msg.Svids[0].Hint)
	}

	// The caller's last entries go: PermissionDenied ends the stream.
	e.cache.SetEntries([]*agent.Entry{other2})
	streamEnd(t, ch, codes.PermissionDenied, "after the caller's entries were removed")
}

func splitDER(t *testing.T, der []byte) [][]byte {
	t.Helper()
	certs, err := x509.ParseCertificates(der)
	if err != nil {
		t.Fatal(err)
	}
	out := make([][]byte, len(certs))
	for i, c := range certs {
		out[i] = c.Raw
	}
	return out
}

func TestX509StreamPushesRotation(t *testing.T) {
	a := newEntry("/short", 1, mySelector())
	a.X509SVIDTTL = 2 * time.Second
	// When each SVID was signed, by serial: certificate times have a
	// one-second resolution, too coarse to tell when the renewal was signed.
	var mu sync.Mutex
	signedAt := map[string]time.Time{}
	e := newTestEnv(t, envOptions{entries: []*agent.Entry{a}, upstream: func(u *fakeagent.Upstream) agent.Upstream {
		u.Hook = func(out []agent.X509Result) []agent.X509Result {
			mu.Lock()
			defer mu.Unlock()
			for _, r := range out {
				if r.Err == nil {
					signedAt[r.Chain[0].SerialNumber.String()] = time.Now()
				}
			}
			return out
		}
		return u
	}})
	ch := openX509Stream(t, e.client(t))
	first := nextMsg(t, ch, "first message")
	checkX509Response(t, first, e.ca.Cert)
	serial := leafSerial(t, first.Svids[0])

	// Renewed at about half of the 2s lifetime, and pushed at once.
	msg := nextMsg(t, ch, "rotation")
	received := time.Now()
	checkX509Response(t, msg, e.ca.Cert)
	renewed := leafSerial(t, msg.Svids[0])
	if renewed == serial {
		t.Fatal("the rotation message repeats the old SVID")
	}
	mu.Lock()
	at, ok := signedAt[renewed]
	mu.Unlock()
	if !ok {
		t.Fatal("the rotation message carries an SVID the upstream did not sign")
	}
	if d := received.Sub(at); d > 500*time.Millisecond {
		t.Fatalf("the renewed SVID arrived %s after it was signed: it was not freshly signed", d)
	}
}

func TestBundleStreams(t *testing.T) {
	a := newEntry("/a", 1, mySelector())
	e := newTestEnv(t, envOptions{entries: []*agent.Entry{a}})
	c := e.client(t)
	x509Ch := openX509BundlesStream(t, c)
	jwtCh := openJWTBundlesStream(t, c)

	xm := nextMsg(t, x509Ch, "first X.509 bundles message")
	if len(xm.Bundles) != 1 || !bytes.Equal(xm.Bundles[tdExample.IDString()], e.ca.Cert.Raw) {
		t.Fatalf("X.509 bundles = %v", slices.Collect(maps.Keys(xm.Bundles)))
	}
	jm := nextMsg(t, jwtCh, "first JWT bundles message")
	jb, err := jwtbundle.Parse(tdExample, jm.Bundles[tdExample.IDString()])
	if err != nil {
		t.Fatalf("the JWT bundle does not parse: %v", err)
	}
	if !jb.HasJWTAuthority("kid-1") || len(jm.Bundles) != 1 {
		t.Fatalf("JWT bundles: %d trust domains, authorities %v", len(jm.Bundles), jb.JWTAuthorities())
	}

	// A federated bundle for a trust domain the caller does not federate
	// with reaches the cache but neither stream.
	sub := e.cache.Subscribe()
	defer sub.Close()
	third := federatedBundle(t, tdThird)
	e.cache.SetBundles(e.up.LocalBundle(t, tdExample, e.ca.Cert), []*spiffebundle.Bundle{third})
	notified(t, sub)
	quiet(t, x509Ch, "X.509 bundles after an unrelated federated bundle")
	quiet(t, jwtCh, "JWT bundles after an unrelated federated bundle")
	e.cache.SetBundles(e.up.LocalBundle(t, tdExample, e.ca.Cert), []*spiffebundle.Bundle{third})
	quiet(t, x509Ch, "X.509 bundles after an identical bundle")
	quiet(t, jwtCh, "JWT bundles after an identical bundle")

	// The caller's entry federates with other.org once its bundle is there.
	otherBundle := federatedBundle(t, tdOther)
	e.cache.SetBundles(e.up.LocalBundle(t, tdExample, e.ca.Cert), []*spiffebundle.Bundle{third, otherBundle})
	notified(t, sub)
	quiet(t, x509Ch, "X.509 bundles before the caller federates")
	fed := newEntry("/a", 1, mySelector())
	fed.FederatesWith = []spiffeid.TrustDomain{tdOther}
	e.cache.SetEntries([]*agent.Entry{fed})
	xm = nextMsg(t, x509Ch, "X.509 bundles after federates_with")
	if !bytes.Equal(xm.Bundles[tdOther.IDString()], otherBundle.X509Authorities()[0].Raw) || len(xm.Bundles) != 2 {
		t.Fatalf("X.509 bundles after federates_with: %v", slices.Collect(maps.Keys(xm.Bundles)))
	}
	jm = nextMsg(t, jwtCh, "JWT bundles after federates_with")
	ob, err := jwtbundle.Parse(tdOther, jm.Bundles[tdOther.IDString()])
	if err != nil || !ob.HasJWTAuthority("kid-other.org") || len(jm.Bundles) != 2 {
		t.Fatalf("JWT bundles after federates_with: %v, %v", slices.Collect(maps.Keys(jm.Bundles)), err)
	}

	// A new local authority: a root and a JWT key.
	ca2 := newTestCA(t, tdExample, "ca 2")
	e.up.SetJWTKey("kid-2", testkit.NewKey(t))
	e.cache.SetBundles(e.up.LocalBundle(t, tdExample, e.ca.Cert, ca2.Cert), []*spiffebundle.Bundle{third, otherBundle})
	xm = nextMsg(t, x509Ch, "X.509 bundles after a new authority")
	if !bytes.Equal(xm.Bundles[tdExample.IDString()], derOf(e.ca.Cert, ca2.Cert)) {
		t.Fatal("the new root is not in the X.509 bundle")
	}
	jm = nextMsg(t, jwtCh, "JWT bundles after a new authority")
	if jb, err = jwtbundle.Parse(tdExample, jm.Bundles[tdExample.IDString()]); err != nil || !jb.HasJWTAuthority("kid-2") {
		t.Fatalf("the new JWT key is not in the JWT bundle (%v)", err)
	}

	// The last entry goes: both streams end with PermissionDenied.
	e.cache.SetEntries(nil)
	streamEnd(t, x509Ch, codes.PermissionDenied, "X.509 bundles after the entry was removed")
	streamEnd(t, jwtCh, codes.PermissionDenied, "JWT bundles after the entry was removed")
}

func TestAllowUnauthenticatedVerifiers(t *testing.T) {
	entries := []*agent.Entry{newEntry("/other", 1, otherSelector())}
	t.Run("off", func(t *testing.T) {
		e := newTestEnv(t, envOptions{entries: entries})
		c := e.client(t)
		streamEnd(t, openX509BundlesStream(t, c), codes.PermissionDenied, "X.509 bundles")
		streamEnd(t, openJWTBundlesStream(t, c), codes.PermissionDenied, "JWT bundles")
	})
	t.Run("on", func(t *testing.T) {
		e := newTestEnv(t, envOptions{entries: entries, allowUnauthenticated: true})
		c := e.client(t)
		x509Ch := openX509BundlesStream(t, c)
		jwtCh := openJWTBundlesStream(t, c)
		xm := nextMsg(t, x509Ch, "X.509 bundles without an identity")
		if !bytes.Equal(xm.Bundles[tdExample.IDString()], e.ca.Cert.Raw) {
			t.Fatal("the local X.509 bundle is missing")
		}
		jm := nextMsg(t, jwtCh, "JWT bundles without an identity")
		if _, err := jwtbundle.Parse(tdExample, jm.Bundles[tdExample.IDString()]); err != nil {
			t.Fatalf("the local JWT bundle: %v", err)
		}
		// Bundles only: identities are still refused.
		streamEnd(t, openX509Stream(t, c), codes.PermissionDenied, "X509-SVIDs without an identity")
		_, err := c.FetchJWTSVID(callCtx(t), &workload.JWTSVIDRequest{Audience: []string{"x"}})
		if status.Code(err) != codes.PermissionDenied {
			t.Fatalf("FetchJWTSVID without an identity: %v", err)
		}
		// The streams follow bundle changes.
		ca2 := newTestCA(t, tdExample, "ca 2")
		e.cache.SetBundles(e.up.LocalBundle(t, tdExample, e.ca.Cert, ca2.Cert), nil)
		xm = nextMsg(t, x509Ch, "X.509 bundles after a new root")
		if !bytes.Equal(xm.Bundles[tdExample.IDString()], derOf(e.ca.Cert, ca2.Cert)) {
			t.Fatal("the new root is missing")
		}
	})
}

func TestFetchJWTSVID(t *testing.T) {
	a := newEntry("/a", 1, mySelector())
	a.Hint = "internal"
	b := newEntry("/b", 2, mySelector())
	b.Hint = "external"
	// Shares a hint with the older /a: left out.
	c := newEntry("/c", 3, mySelector())
	c.Hint = "internal"
	other := newEntry("/other", 4, otherSelector())
	e := newTestEnv(t, envOptions{entries: []*agent.Entry{c, b, other, a}})
	client := e.client(t)

	jm := nextMsg(t, openJWTBundlesStream(t, client), "JWT bundles")
	jb, err := jwtbundle.Parse(tdExample, jm.Bundles[tdExample.IDString()])
	if err != nil {
		t.Fatal(err)
	}
	bundles := jwtbundle.NewSet(jb)

	check := func(resp *workload.JWTSVIDResponse, audience []string, want ...string) {
		t.Helper()
		var ids, hints []string
		for _, s := range resp.Svids {
			svid, err := jwtsvid.ParseAndValidate(s.Svid, bundles, audience)
			if err != nil {
				t.Fatalf("%s: %v", s.SpiffeId, err)
			}
			if svid.ID.String() != s.SpiffeId || !slices.Equal(svid.Audience, audience) {
				t.Fatalf("token for %s aud %v, response says %s aud %v", svid.ID, svid.Audience, s.SpiffeId, audience)
			}
			ids = append(ids, s.SpiffeId)
			hints = append(hints, s.Hint)
		}
		var wantIDs, wantHints []string
		for _, w := range want {
			id, hint, _ := strings.Cut(w, "#")
			wantIDs, wantHints = append(wantIDs, id), append(wantHints, hint)
		}
		if !slices.Equal(ids, wantIDs) || !slices.Equal(hints, wantHints) {
			t.Fatalf("got %v hints %v, want %v hints %v", ids, hints, wantIDs, wantHints)
		}
	}

	resp, err := client.FetchJWTSVID(callCtx(t), &workload.JWTSVIDRequest{Audience: []string{"aud1"}})
	if err != nil {
		t.Fatal(err)
	}
	check(resp, []string{"aud1"}, "spiffe://example.org/a#internal", "spiffe://example.org/b#external")

	resp, err = client.FetchJWTSVID(callCtx(t), &workload.JWTSVIDRequest{Audience: []string{"aud1", "aud2"}, SpiffeId: "spiffe://example.org/b"})
	if err != nil {
		t.Fatal(err)
	}
	check(resp, []string{"aud1", "aud2"}, "spiffe://example.org/b#external")

	for _, tc := range []struct {
		name string
		req  *workload.JWTSVIDRequest
		code codes.Code
	}{
		{"another caller's identity", &workload.JWTSVIDRequest{Audience: []string{"x"}, SpiffeId: "spiffe://example.org/other"}, codes.PermissionDenied},
		{"an identity nobody has", &workload.JWTSVIDRequest{Audience: []string{"x"}, SpiffeId: "spiffe://example.org/nobody"}, codes.PermissionDenied},
		{"a malformed SPIFFE ID", &workload.JWTSVIDRequest{Audience: []string{"x"}, SpiffeId: "spiffe://Example.org/a"}, codes.InvalidArgument},
		{"no audience", &workload.JWTSVIDRequest{SpiffeId: "spiffe://example.org/a"}, codes.InvalidArgument},
		{"an empty audience", &workload.JWTSVIDRequest{Audience: []string{"x", ""}}, codes.InvalidArgument},
	} {
		if _, err := client.FetchJWTSVID(callCtx(t), tc.req); status.Code(err) != tc.code {
			t.Errorf("%s: %v, want %s", tc.name, err, tc.code)
		}
	}

	// go-spiffe's client sees the same identities and hints.
	svids, err := e.spiffeClient(t).FetchJWTSVIDs(t.Context(), jwtsvid.Params{Audience: "aud3"})
	if err != nil {
		t.Fatal(err)
	}
	if len(svids) != 2 || svids[0].ID.String() != "spiffe://example.org/a" || svids[0].Hint != "internal" ||
		svids[1].ID.String() != "spiffe://example.org/b" || svids[1].Hint != "external" {
		t.Fatalf("go-spiffe FetchJWTSVIDs: %v", svids)
	}
	got, err := e.spiffeClient(t).ValidateJWTSVID(t.Context(), svids[1].Marshal(), "aud3")
	if err != nil {
		t.Fatal(err)
	}
	if got.ID.String() != "spiffe://example.org/b" {
		t.Fatalf("validated %s", got.ID)
	}
}

// handlerStream lets a test call a streaming handler directly.
type handlerStream[T any] struct {
	grpc.ServerStream
	ctx  context.Context
	sent chan *T
}

func (s *handlerStream[T]) Context() context.Context { return s.ctx }

func (s *handlerStream[T]) Send(m *T) error {
	select {
	case s.sent <- m:
		return nil
	case <-s.ctx.Done():
		return s.ctx.Err()
	}
}

// callerContext is ctx with the peer credentials of this process, taken by
// the real handshake over a real Unix socket.
func callerContext(t *testing.T, ctx context.Context) context.Context {
	t.Helper()
	l, err := net.Listen("unix", filepath.Join(testkit.ShortDir(t, "wa-"), "s"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	client, err := net.Dial("unix", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	server, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	conn, info, err := attestor.Credentials().ServerHandshake(server)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return peer.NewContext(ctx, &peer.Peer{Addr: server.RemoteAddr(), AuthInfo: info})
}

func TestUnavailableUntilReady(t *testing.T) {
	e := newTestEnv(t, envOptions{notReady: true})
	h := e.srv.handler
	short := func() context.Context {
		ctx, cancel := context.WithTimeout(callerContext(t, t.Context()), 200*time.Millisecond)
		t.Cleanup(cancel)
		return ctx
	}

	// What the handlers answer when the caller's deadline passes first.
	_, err := h.FetchJWTSVID(short(), &workload.JWTSVIDRequest{Audience: []string{"x"}})
	if status.Code(err) != codes.Unavailable {
		t.Errorf("FetchJWTSVID before the cache is ready: %v, want Unavailable", err)
	}
	_, err = h.ValidateJWTSVID(short(), &workload.ValidateJWTSVIDRequest{Audience: "x", Svid: "a.b.c"})
	if status.Code(err) != codes.Unavailable {
		t.Errorf("ValidateJWTSVID before the cache is ready: %v, want Unavailable", err)
	}
	x509Stream := &handlerStream[workload.X509SVIDResponse]{ctx: short(), sent: make(chan *workload.X509SVIDResponse, 1)}
	if err := h.FetchX509SVID(&workload.X509SVIDRequest{}, x509Stream); status.Code(err) != codes.Unavailable {
		t.Errorf("FetchX509SVID before the cache is ready: %v, want Unavailable", err)
	}
	bundleStream := &handlerStream[workload.X509BundlesResponse]{ctx: short(), sent: make(chan *workload.X509BundlesResponse, 1)}
	if err := h.FetchX509Bundles(&workload.X509BundlesRequest{}, bundleStream); status.Code(err) != codes.Unavailable {
		t.Errorf("FetchX509Bundles before the cache is ready: %v, want Unavailable", err)
	}
	jwtStream := &handlerStream[workload.JWTBundlesResponse]{ctx: short(), sent: make(chan *workload.JWTBundlesResponse, 1)}
	if err := h.FetchJWTBundles(&workload.JWTBundlesRequest{}, jwtStream); status.Code(err) != codes.Unavailable {
		t.Errorf("FetchJWTBundles before the cache is ready: %v, want Unavailable", err)
	}

	// Over the socket the call ends with the client's deadline, not later.
	// (gRPC's server resets a stream at its deadline, racing the handler's
	// status, so the client may see either.)
	c := e.client(t)
	for _, call := range []struct {
		name string
		run  func(ctx context.Context) error
	}{
		{"FetchJWTSVID", func(ctx context.Context) error {
			_, err := c.FetchJWTSVID(ctx, &workload.JWTSVIDRequest{Audience: []string{"x"}})
			return err
		}},
		{"FetchX509SVID", func(ctx context.Context) error {
			s, err := c.FetchX509SVID(ctx, &workload.X509SVIDRequest{})
			if err == nil {
				_, err = s.Recv()
			}
			return err
		}},
	} {
		ctx, cancel := context.WithTimeout(callCtx(t), 200*time.Millisecond)
		start := time.Now()
		err := call.run(ctx)
		cancel()
		if code := status.Code(err); code != codes.Unavailable && code != codes.DeadlineExceeded {
			t.Errorf("%s over the socket before the cache is ready: %v", call.name, err)
		}
		if d := time.Since(start); d > 5*time.Second {
			t.Errorf("%s took %s with a 200ms deadline", call.name, d)
		}
	}

	// A stream opened before the cache is ready gets its first message as
	// soon as it is.
	ch := openX509Stream(t, c)
	quiet(t, ch, "X509-SVID stream before the cache is ready")
	e.cache.SetEntries([]*agent.Entry{newEntry("/a", 1, mySelector())})
	quiet(t, ch, "X509-SVID stream with entries but no bundle")
	e.cache.SetBundles(e.up.LocalBundle(t, tdExample, e.ca.Cert), nil)
	msg := nextMsg(t, ch, "X509-SVID stream once ready")
	checkX509Response(t, msg, e.ca.Cert)
}

func TestShutdownEndsStreamsWithUnavailable(t *testing.T) {
	e := newTestEnv(t, envOptions{entries: []*agent.Entry{newEntry("/a", 1, mySelector())}})
	c := e.client(t)
	svids := openX509Stream(t, c)
	x509Bundles := openX509BundlesStream(t, c)
	jwtBundles := openJWTBundlesStream(t, c)
	nextMsg(t, svids, "X509-SVIDs")
	nextMsg(t, x509Bundles, "X.509 bundles")
	nextMsg(t, jwtBundles, "JWT bundles")

	done := make(chan struct{})
	start := time.Now()
	go func() {
		e.srv.Shutdown(waitLimit)
		close(done)
	}()
	for _, err := range []error{
		streamEnd(t, svids, codes.Unavailable, "X509-SVIDs on shutdown"),
		streamEnd(t, x509Bundles, codes.Unavailable, "X.509 bundles on shutdown"),
		streamEnd(t, jwtBundles, codes.Unavailable, "JWT bundles on shutdown"),
	} {
		if !strings.Contains(status.Convert(err).Message(), "shutting down") {
			t.Errorf("the stream ended with %v, not the shutdown's status", err)
		}
	}
	select {
	case <-done:
	case <-time.After(waitLimit):
		t.Fatal("Shutdown did not return")
	}
	// The handlers returned at once: no wait for the grace period.
	if d := time.Since(start); d > waitLimit/2 {
		t.Fatalf("Shutdown took %s", d)
	}
	if _, err := net.Dial("unix", e.socket); err == nil {
		t.Fatal("the socket still accepts connections after Shutdown")
	}
}

func TestSendTimeoutDropsAClientThatDoesNotRead(t *testing.T) {
	// Longer than waitLimit: a reading client held up behind the stuck
	// one would miss its changes by waitLimit, however loaded the machine.
	const timeout = waitLimit + 2*time.Second
	e := newTestEnv(t, envOptions{entries: []*agent.Entry{newEntry("/a", 1, mySelector())}, sendTimeout: timeout})

	// A big bundle makes each message ~40 KiB, so two messages the client
	// never reads use up gRPC's 64 KiB per-stream send quota.
	roots := []*x509.Certificate{e.ca.Cert}
	for i := range 90 {
		roots = append(roots, newTestCA(t, tdExample, fmt.Sprintf("extra root %d", i)).Cert)
	}
	e.cache.SetBundles(e.up.LocalBundle(t, tdExample, roots...), nil)

	good := openX509Stream(t, e.client(t))
	checkX509Response(t, nextMsg(t, good, "first message to the reading client"), roots...)

	// INITIAL_WINDOW_SIZE 0: the server may not send the stream any data.
	stuck := testkit.DialH2(t, e.socket, http2.Setting{ID: http2.SettingInitialWindowSize, Val: 0})
	stuck.Call(t, 1, "FetchX509SVID", &workload.X509SVIDRequest{})
	closed := make(chan error, 1)
	go func() {
		_, err := io.Copy(io.Discard, stuck.Conn)
		closed <- err
	}()

	for i := range 4 {
		ca := newTestCA(t, tdExample, fmt.Sprintf("new root %d", i))
		roots = append(roots, ca.Cert)
		changed := time.Now()
		e.cache.SetBundles(e.up.LocalBundle(t, tdExample, roots...), nil)
		// The reading client gets every change promptly, whatever the
		// stuck one does.
		msg := nextMsg(t, good, "reading client after a change")
		checkX509Response(t, msg, roots...)
		t.Logf("change %d reached the reading client in %s", i, time.Since(changed))
		time.Sleep(50 * time.Millisecond)
	}

	select {
	case err := <-closed:
		if err != nil {
			t.Logf("the stuck connection ended with %v", err)
		}
	case <-time.After(timeout + waitLimit):
		t.Fatal("the connection of the client that does not read was not closed")
	}
	testkit.WaitFor(t, waitLimit, "the agent to log why it dropped the client", func() bool { return strings.Contains(e.logs.String(), "stopped reading") })
	// The reading client's stream is unaffected.
	ca := newTestCA(t, tdExample, "after the drop")
	roots = append(roots, ca.Cert)
	e.cache.SetBundles(e.up.LocalBundle(t, tdExample, roots...), nil)
	checkX509Response(t, nextMsg(t, good, "reading client after the drop"), roots...)
}

// Streams that end leave no goroutine behind, and later streams still get
// every change.
func TestEndedStreamsReleaseTheirGoroutines(t *testing.T) {
	e := newTestEnv(t, envOptions{entries: []*agent.Entry{newEntry("/a", 1, mySelector())}})
	c := e.client(t)
	nextMsg(t, openX509Stream(t, c), "warm-up stream")
	settle := func() int {
		// Let goroutines that are already ending finish.
		n := runtime.NumGoroutine()
		for range 50 {
			time.Sleep(20 * time.Millisecond)
			m := runtime.NumGoroutine()
			if m == n {
				break
			}
			n = m
		}
		return n
	}
	before := settle()

	const streams = 60
	ctx, cancel := context.WithCancel(callCtx(t))
	for i := range streams {
		var recv func() (proto.Message, error)
		switch i % 3 {
		case 0:
			s, err := c.FetchX509SVID(ctx, &workload.X509SVIDRequest{})
			if err != nil {
				t.Fatal(err)
			}
			recv = func() (proto.Message, error) { return s.Recv() }
		case 1:
			s, err := c.FetchX509Bundles(ctx, &workload.X509BundlesRequest{})
			if err != nil {
				t.Fatal(err)
			}
			recv = func() (proto.Message, error) { return s.Recv() }
		default:
			s, err := c.FetchJWTBundles(ctx, &workload.JWTBundlesRequest{})
			if err != nil {
				t.Fatal(err)
			}
			recv = func() (proto.Message, error) { return s.Recv() }
		}
		if _, err := recv(); err != nil {
			t.Fatal(err)
		}
	}
	cancel()

	deadline := time.Now().Add(waitLimit)
	for {
		after := settle()
		// A little slack for gRPC's own bookkeeping; a leak per stream
		// would be 60 or more.
		if after <= before+10 {
			break
		}
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Fatalf("%d goroutines before %d streams, %d after they ended:\n%s", before, streams, after, buf[:runtime.Stack(buf, true)])
		}
	}
	// A new stream on the same connection still gets changes.
	ch := openX509Stream(t, c)
	nextMsg(t, ch, "a new stream")
	e.cache.SetEntries([]*agent.Entry{newEntry("/a", 1, mySelector()), newEntry("/b", 2, mySelector())})
	if msg := nextMsg(t, ch, "after a change"); len(msg.Svids) != 2 {
		t.Fatalf("%d SVIDs", len(msg.Svids))
	}
}

func TestStreamsIgnoreChangesOfTheOtherKeyType(t *testing.T) {
	e := newTestEnv(t, envOptions{entries: []*agent.Entry{newEntry("/a", 1, mySelector())}})
	c := e.client(t)
	svids, xb, jb := openX509Stream(t, c), openX509BundlesStream(t, c), openJWTBundlesStream(t, c)
	nextMsg(t, svids, "svids")
	nextMsg(t, xb, "x509 bundles")
	nextMsg(t, jb, "jwt bundles")
	e.up.SetJWTKey("kid-2", testkit.NewKey(t))
	e.cache.SetBundles(e.up.LocalBundle(t, tdExample, e.ca.Cert), nil)
	nextMsg(t, jb, "JWT bundles after a new JWT key")
	quiet(t, svids, "X509-SVIDs after a JWT-only change")
	quiet(t, xb, "X.509 bundles after a JWT-only change")
	ca2 := newTestCA(t, tdExample, "ca 2")
	e.cache.SetBundles(e.up.LocalBundle(t, tdExample, e.ca.Cert, ca2.Cert), nil)
	nextMsg(t, svids, "svids after new root")
	nextMsg(t, xb, "x509 bundles after new root")
	quiet(t, jb, "JWT bundles after an X.509-only change")
}
