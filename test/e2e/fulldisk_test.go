package e2e

import (
	"context"
	"crypto/x509"
	"fmt"
	"github.com/lanyard-dev/lanyard/internal/testkit"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// checkWorkload fetches what a workload gets, as go-spiffe does, and
// checks that every SVID verifies against the bundle the agent serves
// with it: the X509-SVID against its X.509 context's bundles, a freshly
// minted JWT-SVID against the JWT bundles fetched right after, and by
// the agent's ValidateJWTSVID. It returns the CA that signed the X509-SVID.
func checkWorkload(t *testing.T, c *workloadapi.Client, i int) *x509.Certificate {
	t.Helper()
	ctx := testContext(t)
	// Valid when asked for: a slow test must not blame the agent for an
	// SVID that expired while the test looked at it.
	at := time.Now()
	x, err := c.FetchX509Context(ctx)
	if err != nil {
		t.Fatalf("fetch %d: %v", i, err)
	}
	svid := x.DefaultSVID()
	_, chains, err := x509svid.Verify(svid.Certificates, x.Bundles, x509svid.WithTime(at))
	if err != nil {
		t.Fatalf("fetch %d: the X509-SVID (leaf %s) does not verify against the bundle it came with: %v", i, fingerprint(svid.Certificates[0]), err)
	}
	audience := fmt.Sprintf("db-%d", i) // a new audience: minted, not cached
	token, err := c.FetchJWTSVID(ctx, jwtParams(audience))
	if err != nil {
		t.Fatalf("fetch %d: JWT-SVID: %v", i, err)
	}
	bundles, err := c.FetchJWTBundles(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := jwtsvid.ParseAndValidate(token.Marshal(), bundles, []string{audience}); err != nil {
		t.Fatalf("fetch %d: the JWT-SVID does not validate against the JWT bundle served: %v", i, err)
	}
	if _, err := c.ValidateJWTSVID(ctx, token.Marshal(), audience); err != nil {
		t.Fatalf("fetch %d: ValidateJWTSVID: %v", i, err)
	}
	return chains[0][len(chains[0])-1]
}

// Finding 6: with data_dir full when the next CA is prepared, the agent
// used to announce it "in the bundle from now on", fail to save it, not
// publish it, and sign with it from two thirds of the CA's life on: SVIDs
// that did not verify against the bundle they came with, JWT-SVIDs with
// "no JWT authority". Now the prepared CA is published at once, does not
// sign until it is saved, the failed save is warned about once a minute
// and makes /ready degraded, and once the disk has room it is activated.
func TestFullDataDirNeverSignsWithUnpublishedCA(t *testing.T) {
	dir := newAgentDir(t)
	fill, free := testkit.SmallDisk(t, filepath.Join(dir, "data"))
	healthPort := freePort(t)
	// ca_ttl is 30s: the next CA is prepared at 15s and activated at 20s.
	cfg := strings.Replace(baseConfig, `x509_svid_ttl = "1h"`, `x509_svid_ttl = "4s"
      ca_ttl        = "30s"`, 1) + fmt.Sprintf(`
health_checks {
  listener_enabled = true
  bind_address     = "127.0.0.1"
  bind_port        = %d
}
`, healthPort)
	ready := fmt.Sprintf("http://127.0.0.1:%d/ready", healthPort)
	a := startAgentIn(t, dir, cfg)
	fill()
	c := a.client(t)
	w := watchVerified(t, c)
	first := checkWorkload(t, c, 0)
	activateAt := first.NotAfter.Add(-10 * time.Second)

	// Through preparation and past the activation point, on a full disk.
	i := 1
	for ; time.Now().Before(activateAt.Add(3 * time.Second)); i++ {
		if signer := checkWorkload(t, c, i); !signer.Equal(first) {
			t.Fatalf("fetch %d: signed by a CA that could not be saved", i)
		}
		time.Sleep(200 * time.Millisecond)
	}
	logs := a.Logs.String()
	if !strings.Contains(logs, "Prepared the next local CA") {
		t.Fatalf("the next CA was not prepared by %s:\n%s", activateAt, logs)
	}
	if strings.Contains(logs, "Activated the next local CA") {
		t.Fatal("a CA that could not be saved was activated")
	}
	if n := strings.Count(logs, "Could not save the local CA state"); n != 1 {
		t.Errorf("the failed save was warned about %d times, want once a minute:\n%s", n, logs)
	}
	if n := strings.Count(logs, "Could not save the cache"); n > 1 {
		t.Errorf("the failed cache save was warned about %d times, want once a minute", n)
	}
	if code, body := httpGet(t, ready); code != http.StatusServiceUnavailable || !strings.Contains(body, "local CA state cannot be saved") {
		t.Errorf("/ready on a full disk: %d %s", code, body)
	}

	free()
	var signer *x509.Certificate
	deadline := time.Now().Add(15 * time.Second)
	for ; ; i++ {
		if signer = checkWorkload(t, c, i); !signer.Equal(first) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no SVID from the next CA within 15s of freeing the disk:\n%s", a.Logs.String())
		}
		time.Sleep(200 * time.Millisecond)
	}
	if !strings.Contains(a.Logs.String(), "Activated the next local CA") {
		t.Error("the next CA signs but its activation was not logged")
	}
	waitFor(t, 10*time.Second, "/ready to recover once the disk has room", func() bool {
		code, _ := httpGet(t, ready)
		return code == http.StatusOK
	})

	// Every update an open stream received verified, when it arrived,
	// against the bundle it came with.
	if n, errs := w.result(); n < 5 || len(errs) > 0 {
		t.Errorf("the open stream got %d updates; these did not verify: %v", n, errs)
	}
}

// verifiedUpdates checks each X.509 context a stream delivers when it
// arrives: its SVID must verify against its bundles.
type verifiedUpdates struct {
	mu   sync.Mutex
	n    int
	errs []error
}

func (w *verifiedUpdates) OnX509ContextUpdate(c *workloadapi.X509Context) {
	_, _, err := x509svid.Verify(c.DefaultSVID().Certificates, c.Bundles)
	w.mu.Lock()
	defer w.mu.Unlock()
	w.n++
	if err != nil {
		w.errs = append(w.errs, fmt.Errorf("update %d: %w", w.n, err))
	}
}

func (w *verifiedUpdates) OnX509ContextWatchError(err error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if status.Code(err) != codes.Canceled {
		w.errs = append(w.errs, err)
	}
}

func (w *verifiedUpdates) result() (int, []error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.n, append([]error(nil), w.errs...)
}

func watchVerified(t *testing.T, c *workloadapi.Client) *verifiedUpdates {
	w := &verifiedUpdates{}
	testkit.WatchX509(t, c, w)
	return w
}

// Finding 10: local_ca.json deleted while cache.json survives. The agent
// makes a new CA, which is a warning naming the old CA (from the saved
// bundle) and the new one. What it means for workloads: the old CA leaves
// the bundle at once, so an SVID or a JWT-SVID signed before the restart
// no longer verifies against what the agent serves; the agent re-signs
// the SVIDs it holds, and streams get the new ones.
func TestDeletedCAStateWithSavedCacheWarns(t *testing.T) {
	dir := newAgentDir(t)
	a := startAgentIn(t, dir, baseConfig)
	c := a.client(t)
	ctx := testContext(t)
	before, err := c.FetchX509Context(ctx)
	if err != nil {
		t.Fatal(err)
	}
	oldLocal, _ := before.Bundles.GetX509BundleForTrustDomain(exampleTD)
	oldRoot := oldLocal.X509Authorities()[0]
	oldToken, err := c.FetchJWTSVID(ctx, jwtParams("db"))
	if err != nil {
		t.Fatal(err)
	}
	waitPersisted(t, a)
	a.Stop()
	if err := os.Remove(filepath.Join(a.dataDir, "local_ca.json")); err != nil {
		t.Fatal(err)
	}

	b := startAgentIn(t, dir, baseConfig)
	c2 := b.client(t)
	var after *workloadapi.X509Context
	waitFor(t, 10*time.Second, "the new bundle to be served", func() bool {
		after, err = c2.FetchX509Context(context.Background())
		if err != nil {
			return false
		}
		local, _ := after.Bundles.GetX509BundleForTrustDomain(exampleTD)
		return !local.HasX509Authority(oldRoot)
	})
	newLocal, _ := after.Bundles.GetX509BundleForTrustDomain(exampleTD)
	newRoot := newLocal.X509Authorities()[0]
	logs := b.Logs.String()
	for _, want := range []string{"[WARN]", "state is missing but the saved cache is not", fingerprint(oldRoot), fingerprint(newRoot)} {
		if !strings.Contains(logs, want) {
			t.Errorf("the new CA's log lacks %q:\n%s", want, logs)
		}
	}
	// The consequences the README states.
	if _, _, err := x509svid.Verify(after.DefaultSVID().Certificates, after.Bundles); err != nil {
		t.Errorf("the re-signed SVID does not verify against the new bundle: %v", err)
	}
	if _, _, err := x509svid.Verify(before.DefaultSVID().Certificates, after.Bundles); err == nil {
		t.Error("an SVID signed before the restart still verifies against the new bundle")
	}
	if _, err := c2.ValidateJWTSVID(ctx, oldToken.Marshal(), "db"); err == nil {
		t.Error("a JWT-SVID signed before the restart still validates")
	}
}
