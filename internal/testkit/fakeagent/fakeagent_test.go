package fakeagent

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

var td = spiffeid.RequireTrustDomainFromString("example.org")

func TestUpstreamSignsWhatTheBundleVerifies(t *testing.T) {
	u := NewUpstream(t, td)
	e := &agent.Entry{ID: "web", SPIFFEID: spiffeid.RequireFromPath(td, "/web"), DNSNames: []string{"web.local"}}
	res, err := u.MintX509SVIDs(context.Background(), []agent.X509Request{{Entry: e, Key: testkit.NewKey(t)}})
	if err != nil || res[0].Err != nil {
		t.Fatal(err, res[0].Err)
	}
	bundle := u.LocalBundle(t, td)
	if _, _, err := x509svid.Verify(res[0].Chain, bundle); err != nil {
		t.Errorf("X509-SVID: %v", err)
	}
	if got := res[0].Chain[0].DNSNames; len(got) != 1 || got[0] != "web.local" {
		t.Errorf("DNS names %v", got)
	}
	jwt, err := u.MintJWTSVID(context.Background(), e, []string{"db"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := jwtsvid.ParseAndValidate(jwt.Token, bundle, []string{"db"}); err != nil {
		t.Errorf("JWT-SVID: %v", err)
	}
	if u.X509Calls() != 1 || u.JWTCalls() != 1 || len(u.Batches()) != 1 {
		t.Errorf("counted %d X.509 calls, %d JWT calls, batches %v", u.X509Calls(), u.JWTCalls(), u.Batches())
	}

	u.SetFail(errors.New("down"))
	if _, err := u.MintX509SVIDs(context.Background(), nil); err == nil {
		t.Error("SetFail: signing succeeded")
	}
	u.SetFail(nil)
	u.SetJWTKey("", nil)
	if _, err := u.MintJWTSVID(context.Background(), e, []string{"db"}); !errors.Is(err, ErrNoJWTKey) {
		t.Errorf("no JWT key: %v", err)
	}
	u.SetGate(make(chan struct{}))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Millisecond)
	defer cancel()
	if _, err := u.MintX509SVIDs(ctx, nil); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("gated signing ended with %v", err)
	}
}

func TestSinkRecordsAndWakes(t *testing.T) {
	s := NewSink()
	go func() {
		s.SetEntries([]*agent.Entry{{ID: "a"}})
		s.ReportSave("/x", errors.New("full"))
	}()
	s.WaitFor(t, 5*time.Second, "the save report", func() bool { return s.SaveErr("/x") != nil })
	if s.EntrySets() != 1 || s.EntriesByID()["a"] == nil {
		t.Errorf("entries %v", s.Entries())
	}
}
