package testkit

import (
	"crypto/x509"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

var td = spiffeid.RequireTrustDomainFromString("example.org")

// The builders make what go-spiffe accepts: an SVID signed by a CA, or by
// an intermediate under it, verifies against the CA's bundle.
func TestSVIDsVerifyAgainstTheCAsBundle(t *testing.T) {
	root := NewTrustDomainCA(t, td)
	inter := root.NewIntermediate(t, td.IDString())
	for name, signer := range map[string]*CA{"root": root, "intermediate": inter} {
		leaf, _ := signer.SVID(t, "spiffe://example.org/web", time.Hour)
		chain := []*x509.Certificate{leaf}
		if signer == inter {
			chain = append(chain, inter.Cert)
		}
		id, _, err := x509svid.Verify(chain, root.Bundle(td))
		if err != nil || id.String() != "spiffe://example.org/web" {
			t.Errorf("%s: Verify = %v, %v", name, id, err)
		}
	}
}

func TestCertOptions(t *testing.T) {
	nb, na := time.Now().Add(-time.Minute).Truncate(time.Second), time.Now().Add(time.Hour).Truncate(time.Second)
	ca := NewCA(t, "", WithCommonName("node CA"), WithValidity(nb, na))
	if ca.Cert.Subject.CommonName != "node CA" || !ca.Cert.NotBefore.Equal(nb) || !ca.Cert.NotAfter.Equal(na) || len(ca.Cert.URIs) != 0 {
		t.Errorf("CA = %s %s..%s %v", ca.Cert.Subject, ca.Cert.NotBefore, ca.Cert.NotAfter, ca.Cert.URIs)
	}
	if !ca.Cert.IsCA || ca.Cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		t.Error("not a CA")
	}
}

func TestSignJWTVerifies(t *testing.T) {
	key := NewKey(t)
	now := time.Now()
	token, err := SignJWT(key, "kid-1", "spiffe://example.org/web", []string{"db"}, now, now.Add(time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	b := jwtbundle.New(td)
	if err := b.AddJWTAuthority("kid-1", key.Public()); err != nil {
		t.Fatal(err)
	}
	svid, err := jwtsvid.ParseAndValidate(token, b, []string{"db"})
	if err != nil || svid.ID.String() != "spiffe://example.org/web" {
		t.Errorf("ParseAndValidate = %v, %v", svid, err)
	}
}

func TestBufferLimit(t *testing.T) {
	b := &Buffer{Limit: 4}
	for range 3 {
		if n, err := b.Write([]byte("abc")); n != 3 || err != nil {
			t.Fatalf("Write = %d, %v", n, err)
		}
	}
	if got := b.String(); got != "abcabc" {
		t.Errorf("kept %q, want the writes up to the first past the limit", got)
	}
	log, logs := NewLogger(hclog.Debug)
	log.Info("hello", "k", "v")
	if !strings.Contains(logs.String(), "hello: k=v") {
		t.Errorf("logged %q", logs.String())
	}
}

func TestReceiveAndOpenFDs(t *testing.T) {
	ch := make(chan int, 1)
	go func() { ch <- 7 }()
	if got := Receive(t, ch, 10*time.Second, "the value"); got != 7 {
		t.Errorf("Receive = %d, want 7", got)
	}
	before := OpenFDs(t)
	f, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if after := OpenFDs(t); after != before+1 {
		t.Errorf("OpenFDs = %d after opening one file, want %d", after, before+1)
	}
}

// A child's lines arrive in order, its stdin closing ends it, and the end
// of its output closes Lines.
func TestStartChild(t *testing.T) {
	c := StartChild(t, exec.Command("sh", "-c", "echo ready; cat >/dev/null; echo done"))
	if line, ok := c.Next(t, 5*time.Second); !ok || line != "ready" {
		t.Fatalf("first line %q, %v", line, ok)
	}
	c.Stdin.Close()
	if line, ok := c.Next(t, 5*time.Second); !ok || line != "done" {
		t.Fatalf("line after stdin closed %q, %v", line, ok)
	}
	if line, ok := c.Next(t, 5*time.Second); ok {
		t.Fatalf("a line %q after the output ended", line)
	}
	Receive(t, c.Exited, 5*time.Second, "the child to exit")
}
