package workloadapi_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/attestor"
	"github.com/lanyard-dev/lanyard/conf"
	"github.com/lanyard-dev/lanyard/workloadapi"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// BenchmarkCARotationFanout is a CA rotation reaching 1,000 open
// FetchX509SVID streams, each on its own connection, over a real Unix
// socket: every iteration replaces the CA in the bundle, which makes the
// one SVID the streams share be re-signed, and waits until every stream
// has an SVID of the new CA. spread-ms is from the first stream's message
// to the last one's (what `make bench` reports as the rotation spread),
// last-ms from the bundle change to the last one's.
func BenchmarkCARotationFanout(b *testing.B) {
	const streams = 1000
	up := &rotatingUpstream{ca: newRotationCA(b)}
	log := hclog.New(&hclog.LoggerOptions{Level: hclog.Warn, Output: os.Stderr})
	cache := agent.NewCache(log, up)
	td := spiffeid.RequireTrustDomainFromString("example.org")
	cache.SetEntries([]*agent.Entry{{
		ID: "bench", SPIFFEID: spiffeid.RequireFromString("spiffe://example.org/bench"), CreatedAt: 1,
		Selectors: []attestor.Selector{{Type: "unix", Value: "uid:" + strconv.Itoa(os.Getuid())}},
	}})
	cache.SetBundles(spiffebundle.FromX509Authorities(td, []*x509.Certificate{up.current().cert}), nil)
	dir, err := os.MkdirTemp("", "wrb-")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { os.RemoveAll(dir) })
	socket := filepath.Join(dir, "api.sock")
	l, err := agent.Listen(socket, agent.DefaultMaxConnections(), log)
	if err != nil {
		b.Fatal(err)
	}
	srv := workloadapi.NewServer(workloadapi.Config{Log: log, Attestor: uidAttestor{}, Cache: cache})
	ctx, cancel := context.WithCancel(headerCtx())
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); _ = cache.Rotator().Run(ctx) }()
	go func() { defer wg.Done(); _ = srv.GRPC.Serve(l) }()
	b.Cleanup(func() {
		cancel()
		srv.Shutdown(time.Second)
		wg.Wait()
	})

	type msg struct {
		bundle []byte
		at     time.Time
	}
	msgs := make(chan msg, streams)
	for range streams {
		c, done := benchClient(b, socket)
		b.Cleanup(done)
		stream, err := c.FetchX509SVID(ctx, &workload.X509SVIDRequest{})
		if err != nil {
			b.Fatal(err)
		}
		go func() {
			for {
				resp, err := stream.Recv()
				if err != nil {
					return
				}
				// The bundle is the new CA's only once the SVID is one it
				// signed: an SVID that does not chain is not served.
				msgs <- msg{bundle: resp.Svids[0].Bundle, at: time.Now()}
			}
		}()
	}
	for range streams {
		<-msgs
	}
	var spread, last time.Duration
	b.ResetTimer()
	for range b.N {
		b.StopTimer()
		next := newRotationCA(b)
		b.StartTimer()
		up.rotate(next)
		start := time.Now()
		cache.SetBundles(spiffebundle.FromX509Authorities(td, []*x509.Certificate{next.cert}), nil)
		var times []time.Time
		for len(times) < streams {
			select {
			case m := <-msgs:
				if bytes.Equal(m.bundle, next.cert.Raw) {
					times = append(times, m.at)
				}
			case <-time.After(30 * time.Second):
				b.Fatalf("%d of %d streams got an SVID of the new CA", len(times), streams)
			}
		}
		first, end := slices.MinFunc(times, time.Time.Compare), slices.MaxFunc(times, time.Time.Compare)
		spread += end.Sub(first)
		last += end.Sub(start)
	}
	b.ReportMetric(float64(spread.Microseconds())/1000/float64(b.N), "spread-ms")
	b.ReportMetric(float64(last.Microseconds())/1000/float64(b.N), "last-ms")
}

// uidAttestor gives every caller its uid's selector, as the unix
// attestor does, without reading /proc.
type uidAttestor struct{}

func (uidAttestor) Attest(_ context.Context, p attestor.Process) ([]attestor.Selector, error) {
	return []attestor.Selector{{Type: "unix", Value: "uid:" + strconv.Itoa(os.Getuid())}}, nil
}

type rotationCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

var rotationSerial struct {
	sync.Mutex
	n int64
}

func nextRotationSerial() *big.Int {
	rotationSerial.Lock()
	defer rotationSerial.Unlock()
	rotationSerial.n++
	return big.NewInt(rotationSerial.n)
}

func newRotationCA(b *testing.B) *rotationCA {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		b.Fatal(err)
	}
	serial := nextRotationSerial()
	u, _ := url.Parse("spiffe://example.org")
	tmpl := &x509.Certificate{
		SerialNumber: serial, Subject: pkix.Name{CommonName: "rotation CA " + serial.String()},
		URIs: []*url.URL{u}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageCertSign, BasicConstraintsValid: true, IsCA: true,
		SubjectKeyId: serial.Bytes(),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		b.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		b.Fatal(err)
	}
	return &rotationCA{cert: cert, key: key}
}

// rotatingUpstream signs with its current CA.
type rotatingUpstream struct {
	mu sync.Mutex
	ca *rotationCA
}

func (u *rotatingUpstream) current() *rotationCA {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.ca
}

func (u *rotatingUpstream) rotate(ca *rotationCA) {
	u.mu.Lock()
	u.ca = ca
	u.mu.Unlock()
}

func (u *rotatingUpstream) Run(ctx context.Context, _ agent.Sink) error {
	<-ctx.Done()
	return nil
}

func (u *rotatingUpstream) MintX509SVIDs(_ context.Context, reqs []agent.X509Request) ([]agent.X509Result, error) {
	ca := u.current()
	out := make([]agent.X509Result, len(reqs))
	for i, r := range reqs {
		id, _ := url.Parse(r.Entry.SPIFFEID.String())
		tmpl := &x509.Certificate{
			SerialNumber: nextRotationSerial(), URIs: []*url.URL{id},
			Subject:   pkix.Name{CommonName: "bench"},
			NotBefore: time.Now().Add(-time.Second), NotAfter: time.Now().Add(time.Hour),
			KeyUsage: x509.KeyUsageDigitalSignature, AuthorityKeyId: ca.cert.SubjectKeyId,
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, r.Key.Public(), ca.key)
		if err != nil {
			out[i].Err = err
			continue
		}
		leaf, err := x509.ParseCertificate(der)
		out[i] = agent.X509Result{Chain: []*x509.Certificate{leaf}, Err: err}
	}
	return out, nil
}

func (u *rotatingUpstream) MintJWTSVID(context.Context, *agent.Entry, []string) (*agent.JWTSVID, error) {
	return nil, context.Canceled
}

func (u *rotatingUpstream) Resync(context.Context) (bool, error) { return false, nil }

func (u *rotatingUpstream) Reconfigure(*conf.Section) error { return nil }
