package bench

import (
	"bytes"
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"google.golang.org/grpc"
)

// openParallel bounds how many streams are being opened at once.
const openParallel = 32

// StreamSet holds open FetchX509SVID streams, each on its own connection
// as separate workloads would, and notes when each sees its bundle change.
type StreamSet struct {
	cancel context.CancelFunc
	wg     sync.WaitGroup
	conns  []*grpc.ClientConn

	mu      sync.Mutex
	bundles [][]byte    // the bundle of each stream's first message
	changed []time.Time // when each stream first saw another bundle
	nChange atomic.Int64
	allSeen chan struct{}
	failed  chan error
}

// OpenStreams opens n streams on socket and waits until each has its first
// message.
func OpenStreams(ctx context.Context, socket string, n int, timeout time.Duration) (*StreamSet, error) {
	sctx, cancel := context.WithCancel(WithHeader(context.Background()))
	s := &StreamSet{
		cancel:  cancel,
		conns:   make([]*grpc.ClientConn, n),
		bundles: make([][]byte, n),
		changed: make([]time.Time, n),
		allSeen: make(chan struct{}),
		failed:  make(chan error, 1),
	}
	first := make(chan error, n)
	sem := make(chan struct{}, openParallel)
	for i := range n {
		conn, err := Dial(socket)
		if err != nil {
			s.Close()
			return nil, err
		}
		s.conns[i] = conn
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			sem <- struct{}{}
			s.run(sctx, i, workload.NewSpiffeWorkloadAPIClient(conn), first, sem)
		}()
	}
	deadline := time.After(timeout)
	for range n {
		select {
		case err := <-first:
			if err != nil {
				s.Close()
				return nil, err
			}
		case <-deadline:
			s.Close()
			return nil, fmt.Errorf("%d streams on %s did not all get their first message within %s", n, socket, timeout)
		case <-ctx.Done():
			s.Close()
			return nil, ctx.Err()
		}
	}
	return s, nil
}

func (s *StreamSet) run(ctx context.Context, i int, client workload.SpiffeWorkloadAPIClient, first chan<- error, sem <-chan struct{}) {
	stream, err := client.FetchX509SVID(ctx, &workload.X509SVIDRequest{})
	var resp *workload.X509SVIDResponse
	if err == nil {
		resp, err = stream.Recv()
	}
	<-sem
	if err == nil && len(resp.Svids) == 0 {
		err = fmt.Errorf("stream %d: first message has no SVID", i)
	}
	if err != nil {
		first <- fmt.Errorf("stream %d: %w", i, err)
		return
	}
	s.mu.Lock()
	s.bundles[i] = resp.Svids[0].Bundle
	s.mu.Unlock()
	first <- nil
	for {
		resp, err := stream.Recv()
		if err != nil {
			if ctx.Err() == nil {
				select {
				case s.failed <- fmt.Errorf("stream %d ended: %w", i, err):
				default:
				}
			}
			return
		}
		now := time.Now()
		if len(resp.Svids) == 0 {
			continue
		}
		s.mu.Lock()
		newly := s.changed[i].IsZero() && !bytes.Equal(resp.Svids[0].Bundle, s.bundles[i])
		if newly {
			s.changed[i] = now
		}
		s.mu.Unlock()
		if newly && s.nChange.Add(1) == int64(len(s.changed)) {
			close(s.allSeen)
		}
	}
}

// WaitBundleChange waits until every stream has seen a bundle other than
// its first, and returns when each saw it.
func (s *StreamSet) WaitBundleChange(ctx context.Context, timeout time.Duration) ([]time.Time, error) {
	select {
	case <-s.allSeen:
	case err := <-s.failed:
		return nil, err
	case <-time.After(timeout):
		return nil, fmt.Errorf("only %d of %d streams saw the new bundle within %s", s.nChange.Load(), len(s.changed), timeout)
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]time.Time(nil), s.changed...), nil
}

// Close ends every stream and connection.
func (s *StreamSet) Close() {
	s.cancel()
	s.wg.Wait()
	for _, c := range s.conns {
		if c != nil {
			c.Close()
		}
	}
}
