package files

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"io"
	"net/http"
	"os"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// rotations is how many times the served certificate must change.
const rotations = 3

// fingerprint names a certificate in failure messages and comparisons.
func fingerprint(der []byte) string {
	sum := sha256.Sum256(der)
	return hex.EncodeToString(sum[:6])
}

// leafOf is the fingerprint of the first certificate in a PEM file, or ""
// while it cannot be read.
func leafOf(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	block, _ := pem.Decode(b)
	if block == nil || block.Type != "CERTIFICATE" {
		return ""
	}
	if _, err := x509.ParseCertificate(block.Bytes); err != nil {
		return ""
	}
	return fingerprint(block.Bytes)
}

// sequence records distinct values in the order they first appear.
type sequence struct {
	mu   sync.Mutex
	seen []string
}

func (s *sequence) add(v string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if v != "" && !slices.Contains(s.seen, v) {
		s.seen = append(s.seen, v)
	}
}

func (s *sequence) snapshot() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.seen)
}

// loop runs body every interval in the background until stop; stop waits
// for the last round.
func loop(interval time.Duration, body func(ctx context.Context)) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		for ctx.Err() == nil {
			body(ctx)
			select {
			case <-ctx.Done():
			case <-time.After(interval):
			}
		}
	}()
	return func() {
		cancel()
		<-done
	}
}

// clientLoop is a go-spiffe mTLS client requesting from an app over and
// over, a new connection each time, so each request sees the certificate
// the app serves at that moment.
type clientLoop struct {
	served   sequence
	mu       sync.Mutex
	requests int
	failures []string
}

func (c *clientLoop) record(served string, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.requests++
	if err != nil {
		c.failures = append(c.failures, time.Now().Format("15:04:05.000")+" "+err.Error())
		return
	}
	c.served.add(served)
}

func startClientLoop(t *testing.T, socket string, port int) (c *clientLoop, stop func()) {
	t.Helper()
	source, err := workloadapi.NewX509Source(testkit.Context(t, 30*time.Second),
		workloadapi.WithClientOptions(workloadapi.WithAddr("unix://"+socket)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { source.Close() })
	client := &http.Client{
		Timeout: 5 * time.Second,
		Transport: &http.Transport{
			TLSClientConfig:   tlsconfig.MTLSClientConfig(source, source, tlsconfig.AuthorizeID(appID)),
			DisableKeepAlives: true,
		},
	}
	url := "https://127.0.0.1:" + strconv.Itoa(port) + "/"
	c = &clientLoop{}
	stop = loop(10*time.Millisecond, func(ctx context.Context) {
		c.record(get(ctx, client, url))
	})
	t.Cleanup(stop)
	return c, stop
}

// get fetches url and returns the fingerprint of the certificate served.
func get(ctx context.Context, client *http.Client, url string) (string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return "", err
	}
	resp, err := client.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return "", nil // stopped mid-request: not a failure of the app
		}
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1024))
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK || string(body) != "ok\n" && string(body) != "ok" {
		return "", fmt.Errorf("status %d, body %q", resp.StatusCode, body)
	}
	return fingerprint(resp.TLS.PeerCertificates[0].Raw), nil
}

// requireReloadsAcrossRotations runs the client loop against an app
// serving certFile until the file has been replaced `rotations` times and
// the app serves the latest, then requires that no request failed and that
// the app served every certificate written, in order: it reloaded after
// each rotation.
func requireReloadsAcrossRotations(t *testing.T, socket, certFile string, port int, appLog func() string) {
	t.Helper()
	var written sequence
	stopWatch := loop(20*time.Millisecond, func(context.Context) { written.add(leafOf(certFile)) })
	t.Cleanup(stopWatch)
	c, stopClients := startClientLoop(t, socket, port)
	served := func() bool {
		w, s := written.snapshot(), c.served.snapshot()
		return len(w) > rotations && len(s) > 0 && s[len(s)-1] == w[len(w)-1]
	}
	for deadline := time.Now().Add(90 * time.Second); !served(); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			c.mu.Lock()
			defer c.mu.Unlock()
			t.Fatalf("after 90s, certificates written %v, served %v; %d of %d requests failed\n%s",
				written.snapshot(), c.served.snapshot(), len(c.failures), c.requests, appLog())
		}
	}
	stopClients()
	stopWatch()
	w, s := written.snapshot(), c.served.snapshot()
	c.mu.Lock()
	defer c.mu.Unlock()
	t.Logf("%d requests; certificates written %v, served %v", c.requests, w, s)
	if len(c.failures) > 0 {
		t.Errorf("%d of %d requests failed; the first: %v\n%s", len(c.failures), c.requests, c.failures[:min(5, len(c.failures))], appLog())
	}
	// A rotation lands after the last check at most: compare what was
	// written up to the certificate served last.
	if i := slices.Index(w, s[len(s)-1]); i >= 0 {
		w = w[:i+1]
	}
	if !slices.Equal(w, s) {
		t.Errorf("served certificates %v, want each written one in turn %v", s, w)
	}
}
