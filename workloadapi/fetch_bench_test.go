package workloadapi

import (
	"bytes"
	"context"
	"crypto/x509"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/conf"
	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/lanyard-dev/lanyard/supervisor"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	_ "github.com/lanyard-dev/lanyard/plugins/upstream/local"
	_ "github.com/lanyard-dev/lanyard/plugins/workloadattestor/unix"
)

// The fetch path as `lanyard run` wires it (config file, agent.New with the
// embedded CA and the unix attestor, NewServer, agent.Listen),
// measured over a real Unix socket from a gRPC client in this process.
// Client and server share the CPU, so these figures are for comparing
// versions (benchstat), not for comparing with other agents: test/bench
// does that.

const benchConf = `agent {
    trust_domain = "example.org"
    data_dir = "%[1]s/data"
    socket_path = "%[1]s/api.sock"
    log_level = "warn"
}
plugins {
    WorkloadAttestor "unix" { plugin_data {} }
    UpstreamAuthority "local" {
        plugin_data {
            entry {
                spiffe_id = "spiffe://example.org/bench"
                selectors = ["unix:uid:%[2]d"]
            }
        }
    }
}
`

// benchServer starts the agent and its Workload API and returns the socket.
func benchServer(b *testing.B) string {
	b.Helper()
	socket, _ := benchAgent(b)
	return socket
}

// benchAgent is benchServer that also returns the agent.
func benchAgent(b *testing.B) (string, *agent.Agent) {
	b.Helper()
	return benchAgentWith(b, benchConf)
}

// benchAgentWith is benchAgent with the config text (benchConf's shape).
func benchAgentWith(b *testing.B, text string) (string, *agent.Agent) {
	b.Helper()
	dir := testkit.ShortDir(b, "wab-")
	path := filepath.Join(dir, "agent.conf")
	if err := os.WriteFile(path, fmt.Appendf(nil, text, dir, os.Getuid()), 0o600); err != nil {
		b.Fatal(err)
	}
	cfg, err := conf.Load(path, false)
	if err != nil {
		b.Fatal(err)
	}
	log := hclog.New(&hclog.LoggerOptions{Level: hclog.Warn, Output: os.Stderr})
	a, err := agent.New(cfg, log)
	if err != nil {
		b.Fatal(err)
	}
	srv := NewServer(Config{Log: log, Attestor: a, Identities: a.SVIDManager(), Metrics: a.Metrics()})
	serve(b, log, cfg.Agent.SocketPath, srv, []supervisor.Service{supervisor.Func("agent", a.Run)})
	select {
	case <-a.SVIDManager().Ready():
	case <-time.After(30 * time.Second):
		b.Fatal("the agent did not become ready")
	}
	return cfg.Agent.SocketPath, a
}

func benchClient(b *testing.B, socket string) (workload.SpiffeWorkloadAPIClient, func()) {
	b.Helper()
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		b.Fatal(err)
	}
	return workload.NewSpiffeWorkloadAPIClient(conn), func() { conn.Close() }
}

func headerCtx() context.Context {
	return metadata.AppendToOutgoingContext(context.Background(), "workload.spiffe.io", "true")
}

func fetchX509(ctx context.Context, c workload.SpiffeWorkloadAPIClient) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := c.FetchX509SVID(ctx, &workload.X509SVIDRequest{})
	if err != nil {
		return err
	}
	resp, err := stream.Recv()
	if err != nil {
		return err
	}
	if len(resp.Svids) != 1 {
		return fmt.Errorf("got %d SVIDs, want 1", len(resp.Svids))
	}
	return nil
}

func fetchJWT(ctx context.Context, c workload.SpiffeWorkloadAPIClient) error {
	resp, err := c.FetchJWTSVID(ctx, &workload.JWTSVIDRequest{Audience: []string{"bench"}})
	if err != nil {
		return err
	}
	if len(resp.Svids) != 1 {
		return fmt.Errorf("got %d JWT-SVIDs, want 1", len(resp.Svids))
	}
	return nil
}

// BenchmarkFetch is one fetch at a time: FetchX509SVID and its first
// message on a kept connection, the same on a new connection each time,
// and FetchJWTSVID on a kept connection.
func BenchmarkFetch(b *testing.B) {
	benchFetch(b, benchServer(b))
}

func benchFetch(b *testing.B, socket string) {
	ctx := headerCtx()
	b.Run("x509-reused-conn", func(b *testing.B) {
		c, done := benchClient(b, socket)
		defer done()
		if err := fetchX509(ctx, c); err != nil { // mint, and connect
			b.Fatal(err)
		}
		b.ReportAllocs()
		for b.Loop() {
			if err := fetchX509(ctx, c); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("x509-new-conn", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			c, done := benchClient(b, socket)
			err := fetchX509(ctx, c)
			done()
			if err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("jwt-reused-conn", func(b *testing.B) {
		c, done := benchClient(b, socket)
		defer done()
		if err := fetchJWT(ctx, c); err != nil {
			b.Fatal(err)
		}
		b.ReportAllocs()
		for b.Loop() {
			if err := fetchJWT(ctx, c); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkFetchParallel is many clients at once, each on its own kept
// connection (GOMAXPROCS times -cpu... goroutines, see testing.B.RunParallel).
func BenchmarkFetchParallel(b *testing.B) {
	socket := benchServer(b)
	ctx := headerCtx()
	for _, bc := range []struct {
		name  string
		fetch func(context.Context, workload.SpiffeWorkloadAPIClient) error
	}{
		{"x509-reused-conn", fetchX509},
		{"jwt-reused-conn", fetchJWT},
	} {
		b.Run(bc.name, func(b *testing.B) {
			b.SetParallelism(8)
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				c, done := benchClient(b, socket)
				defer done()
				for pb.Next() {
					if err := bc.fetch(ctx, c); err != nil {
						b.Error(err)
						return
					}
				}
			})
		})
	}
}

// BenchmarkRotationFanout is a bundle change reaching open FetchX509SVID
// streams, each on its own connection: every iteration changes the bundle
// and waits until every stream has the new one. spread-ms is the time from
// the first stream's message to the last one's.
func BenchmarkRotationFanout(b *testing.B) {
	const streams = 1000
	socket, a := benchAgent(b)
	cache := a.SVIDManager()
	ctx, cancel := context.WithCancel(headerCtx())
	defer cancel()
	msgs := openX509Streams(b, socket, streams)
	var first []byte
	for range streams {
		m := <-msgs
		first = m.bundle
	}
	snap, err := cache.Bundles(ctx, nil, true)
	if err != nil {
		b.Fatal(err)
	}
	base := snap.Local.Bundle
	extra := []*x509.Certificate{benchRoot(b), benchRoot(b)}
	var spread time.Duration
	b.ResetTimer()
	for i := range b.N {
		next := base.Clone()
		next.AddX509Authority(extra[i%2])
		cache.SetBundles(next, nil)
		var firstAt, lastAt time.Time
		for n := 0; n < streams; {
			select {
			case m := <-msgs:
				if bytes.Equal(m.bundle, first) {
					continue
				}
				if n == 0 {
					firstAt = m.at
				}
				lastAt = m.at
				n++
			case <-time.After(30 * time.Second):
				b.Fatalf("%d of %d streams got the new bundle", n, streams)
			}
		}
		spread += lastAt.Sub(firstAt)
	}
	b.ReportMetric(float64(spread.Microseconds())/1000/float64(b.N), "spread-ms")
}

// benchRoot is a self-signed CA certificate for the trust domain.
func benchRoot(b *testing.B) *x509.Certificate {
	b.Helper()
	return testkit.NewTrustDomainCA(b, tdExample).Cert
}
