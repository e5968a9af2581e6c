package bench

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
)

// Kind is a fetch workload.
type Kind string

// The fetch workloads.
const (
	// NewConn: connect, FetchX509SVID, first message, close; what a
	// short-lived process does.
	NewConn Kind = "x509-new-conn"
	// Reused: FetchX509SVID and its first message on a connection each
	// client keeps.
	Reused Kind = "x509-reused-conn"
	// JWT: FetchJWTSVID on a connection each client keeps.
	JWT Kind = "jwt-reused-conn"
)

// Kinds lists the fetch workloads in report order.
var Kinds = []Kind{NewConn, Reused, JWT}

// JWTAudience is the audience every JWT-SVID fetch asks for.
const JWTAudience = "bench"

const (
	// maxSamplesPerClient bounds a client's latency record; at the
	// throughputs seen here it is never reached within a round.
	maxSamplesPerClient = 1 << 20
	// opTimeout bounds one fetch, so a stuck agent cannot hang a round.
	opTimeout = 10 * time.Second
	// errorPause keeps a client from spinning on an agent that fails.
	errorPause = 5 * time.Millisecond
)

// LoadResult is one round of one fetch workload against one target.
type LoadResult struct {
	Ops       int             // fetches completed inside the window
	Errors    int             // fetches that failed inside the window
	FirstErr  string          // the first failure, if any
	Window    time.Duration   // the measured window
	Latencies []time.Duration // one per completed fetch, unsorted
}

// Throughput is completed fetches per second.
func (r *LoadResult) Throughput() float64 {
	if r.Window <= 0 {
		return 0
	}
	return float64(r.Ops) / r.Window.Seconds()
}

// Dial opens a gRPC client connection to the Workload API at socket; the
// connection is made on first use.
func Dial(socket string) (*grpc.ClientConn, error) {
	return grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
}

// WithHeader adds the Workload API's security header.
func WithHeader(ctx context.Context) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "workload.spiffe.io", "true")
}

// fetcher does one fetch of a workload; close releases what it holds.
type fetcher struct {
	kind   Kind
	socket string
	conn   *grpc.ClientConn
	client workload.SpiffeWorkloadAPIClient
}

func newFetcher(kind Kind, socket string) (*fetcher, error) {
	f := &fetcher{kind: kind, socket: socket}
	if kind != NewConn {
		conn, err := Dial(socket)
		if err != nil {
			return nil, err
		}
		f.conn, f.client = conn, workload.NewSpiffeWorkloadAPIClient(conn)
	}
	return f, nil
}

func (f *fetcher) close() {
	if f.conn != nil {
		f.conn.Close()
	}
}

// fetch does one fetch; ctx carries the security header.
func (f *fetcher) fetch(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	switch f.kind {
	case NewConn:
		conn, err := Dial(f.socket)
		if err != nil {
			return err
		}
		defer conn.Close()
		return fetchX509(ctx, workload.NewSpiffeWorkloadAPIClient(conn))
	case Reused:
		return fetchX509(ctx, f.client)
	case JWT:
		resp, err := f.client.FetchJWTSVID(ctx, &workload.JWTSVIDRequest{Audience: []string{JWTAudience}})
		if err != nil {
			return err
		}
		if len(resp.Svids) == 0 || resp.Svids[0].Svid == "" {
			return errors.New("FetchJWTSVID answered without a JWT-SVID")
		}
		return nil
	}
	return fmt.Errorf("unknown workload %q", f.kind)
}

// fetchX509 opens FetchX509SVID, reads the first message and ends the
// stream (the deferred cancel of the caller's context).
func fetchX509(ctx context.Context, client workload.SpiffeWorkloadAPIClient) error {
	stream, err := client.FetchX509SVID(ctx, &workload.X509SVIDRequest{})
	if err != nil {
		return err
	}
	resp, err := stream.Recv()
	if err != nil {
		return err
	}
	if len(resp.Svids) == 0 || len(resp.Svids[0].X509Svid) == 0 {
		return errors.New("FetchX509SVID answered without an X509-SVID")
	}
	return nil
}

// Load runs a closed loop of clients fetching from socket: each client
// fetches again as soon as its fetch returns. Fetches in the first warmup
// are not counted; those that start and end inside the following window
// are. atWindow, when not nil, is called as the window opens and as it
// closes (with false), to measure the server over the same span.
func Load(ctx context.Context, socket string, kind Kind, clients int, warmup, window time.Duration, atWindow func(open bool)) (*LoadResult, error) {
	if clients < 1 {
		return nil, fmt.Errorf("clients must be at least 1, not %d", clients)
	}
	fetchers := make([]*fetcher, clients)
	defer func() {
		for _, f := range fetchers {
			if f != nil {
				f.close()
			}
		}
	}()
	hctx := WithHeader(ctx)
	for i := range fetchers {
		f, err := newFetcher(kind, socket)
		if err != nil {
			return nil, err
		}
		fetchers[i] = f
		// A kept connection is made before the clock starts.
		if kind != NewConn {
			if err := f.fetch(hctx); err != nil {
				return nil, fmt.Errorf("%s on %s: first fetch: %w", kind, socket, err)
			}
		}
	}

	type clientResult struct {
		lat      []time.Duration
		errs     int
		firstErr error
	}
	results := make([]clientResult, clients)
	begin := time.Now()
	from, to := begin.Add(warmup), begin.Add(warmup+window)
	if atWindow != nil {
		// Both run exactly once and have returned when Load does, even
		// when ctx ended early.
		var ran sync.WaitGroup
		// A fired timer may still be running atWindow(true) when Load
		// returns and closes the window itself: one at a time.
		var mu sync.Mutex
		one := func(open bool) {
			mu.Lock()
			defer mu.Unlock()
			atWindow(open)
		}
		call := func(open bool) func() {
			ran.Add(1)
			return func() {
				defer ran.Done()
				one(open)
			}
		}
		opened := time.AfterFunc(warmup, call(true))
		closed := time.AfterFunc(warmup+window, call(false))
		defer func() {
			if opened.Stop() {
				ran.Done()
				one(true)
			}
			if closed.Stop() {
				ran.Done()
				one(false)
			}
			ran.Wait()
		}()
	}
	var wg sync.WaitGroup
	for i, f := range fetchers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := &results[i]
			r.lat = make([]time.Duration, 0, 4096)
			for ctx.Err() == nil {
				start := time.Now()
				if !start.Before(to) {
					return
				}
				err := f.fetch(hctx)
				end := time.Now()
				counted := !start.Before(from) && !end.After(to)
				switch {
				case err != nil:
					if counted {
						r.errs++
						if r.firstErr == nil {
							r.firstErr = err
						}
					}
					time.Sleep(errorPause)
				case counted && len(r.lat) < maxSamplesPerClient:
					r.lat = append(r.lat, end.Sub(start))
				}
			}
		}()
	}
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	out := &LoadResult{Window: window}
	for _, r := range results {
		out.Ops += len(r.lat)
		out.Errors += r.errs
		if r.firstErr != nil && out.FirstErr == "" {
			out.FirstErr = r.firstErr.Error()
		}
		out.Latencies = append(out.Latencies, r.lat...)
	}
	return out, nil
}

// Percentiles of a set of latencies.
type Percentiles struct {
	P50 time.Duration `json:"p50_ns"`
	P90 time.Duration `json:"p90_ns"`
	P99 time.Duration `json:"p99_ns"`
	Max time.Duration `json:"max_ns"`
}

// PercentilesOf sorts lat in place and returns its percentiles (nearest
// rank).
func PercentilesOf(lat []time.Duration) Percentiles {
	if len(lat) == 0 {
		return Percentiles{}
	}
	slices.Sort(lat)
	at := func(q float64) time.Duration {
		i := int(q*float64(len(lat))+0.5) - 1
		return lat[min(max(i, 0), len(lat)-1)]
	}
	return Percentiles{P50: at(0.50), P90: at(0.90), P99: at(0.99), Max: lat[len(lat)-1]}
}
