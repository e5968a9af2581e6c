package workloadapi

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/attestor"
	"github.com/lanyard-dev/lanyard/attestor/selector"
	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/lanyard-dev/lanyard/internal/testkit/fakeagent"
	"github.com/lanyard-dev/lanyard/supervisor"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"google.golang.org/grpc/metadata"
)

// BenchmarkCARotationFanout is a CA rotation reaching 1,000 open
// FetchX509SVID streams, each on its own connection, over a real Unix
// socket: every iteration replaces the CA in the bundle, which makes the
// one SVID the streams share be re-signed, and waits until every stream
// has it. spread-ms is from the first stream's message to the last one's
// (what `make bench` reports as the rotation spread), last-ms from the
// bundle change to the last one's.
func BenchmarkCARotationFanout(b *testing.B) {
	const streams = 1000
	up := fakeagent.NewUpstream(b, tdExample)
	log := hclog.New(&hclog.LoggerOptions{Level: hclog.Warn, Output: os.Stderr})
	cache := agent.NewSVIDManager(log, up)
	mine := mySelector()
	cache.SetEntries([]*agent.Entry{newEntry("/bench", 1, mine)})
	cache.SetBundles(up.CA().Bundle(tdExample), nil)
	socket := filepath.Join(testkit.ShortDir(b, "wrb-"), "api.sock")
	serve(b, log, socket, NewServer(Config{Log: log, Attestor: fixedAttestor{mine}, Identities: cache}), []supervisor.Service{cache.Rotator()})
	// The bundle is the new CA's only once the SVID is one it signed: an
	// SVID that does not chain is not served.
	msgs := openX509Streams(b, socket, streams)
	for range streams {
		<-msgs
	}
	var spread, last time.Duration
	b.ResetTimer()
	for i := range b.N {
		b.StopTimer()
		next := newTestCA(b, tdExample, "ca "+strconv.Itoa(i+1))
		b.StartTimer()
		up.SetCA(next)
		start := time.Now()
		cache.SetBundles(next.Bundle(tdExample), nil)
		var times []time.Time
		for len(times) < streams {
			select {
			case m := <-msgs:
				if bytes.Equal(m.bundle, next.Cert.Raw) {
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

// x509Message is one message of one of many FetchX509SVID streams: its
// first SVID's bundle, and when it came.
type x509Message struct {
	bundle []byte
	at     time.Time
}

// openX509Streams opens n FetchX509SVID streams, each on its own
// connection, and sends every message of each into the channel returned.
func openX509Streams(b *testing.B, socket string, n int) <-chan x509Message {
	b.Helper()
	ctx := metadata.AppendToOutgoingContext(b.Context(), headerKey, "true")
	msgs := make(chan x509Message, n)
	for range n {
		stream, err := workload.NewSpiffeWorkloadAPIClient(testkit.Dial(b, socket)).FetchX509SVID(ctx, &workload.X509SVIDRequest{})
		if err != nil {
			b.Fatal(err)
		}
		go func() {
			for {
				resp, err := stream.Recv()
				if err != nil {
					return
				}
				msgs <- x509Message{bundle: resp.Svids[0].Bundle, at: time.Now()}
			}
		}()
	}
	return msgs
}

// fixedAttestor gives every caller the same selectors, without reading
// /proc for each of a thousand connections.
type fixedAttestor []selector.Selector

func (a fixedAttestor) Attest(context.Context, attestor.Process) ([]selector.Selector, error) {
	return a, nil
}
