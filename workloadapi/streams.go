package workloadapi

import (
	"cmp"
	"slices"
	"sync"
	"time"

	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/attestor"
)

// Streams records the workloads with open X509-SVID and SDS streams and the
// SVIDs each was last sent, for `lanyard status`. It holds one small record
// per stream, which the connection and stream caps already bound, and
// shares the SVIDs with the cache rather than copying them.
type Streams struct {
	now  func() time.Time
	mu   sync.Mutex
	next uint64
	open map[uint64]*OpenStream
}

// OpenStream is one open stream as Streams.List returns it.
type OpenStream struct {
	PID      int32
	UID, GID uint32
	API      string // "x509" or "sds"
	Since    time.Time
	// SVIDs and Hints are what the stream last sent; Hints[i] belongs to
	// SVIDs[i], and is empty on SDS streams.
	SVIDs []*agent.X509SVID
	Hints []string
}

// NewStreams returns an empty record.
func NewStreams() *Streams {
	return &Streams{now: time.Now, open: map[uint64]*OpenStream{}}
}

// add records a stream and returns its key; on a nil Streams it does
// nothing.
func (t *Streams) add(caller *attestor.Caller, api string) uint64 {
	if t == nil {
		return 0
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	t.next++
	t.open[t.next] = &OpenStream{PID: caller.PID, UID: caller.UID, GID: caller.GID, API: api, Since: t.now()}
	return t.next
}

// sent records what stream key was last sent.
func (t *Streams) sent(key uint64, svids []*agent.X509SVID, hints []string) {
	if t == nil {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if s := t.open[key]; s != nil {
		s.SVIDs, s.Hints = svids, hints
	}
}

func (t *Streams) remove(key uint64) {
	if t == nil {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.open, key)
}

// List returns the open streams, oldest first.
func (t *Streams) List() []OpenStream {
	t.mu.Lock()
	out := make([]OpenStream, 0, len(t.open))
	for _, s := range t.open {
		out = append(out, *s)
	}
	t.mu.Unlock()
	slices.SortFunc(out, func(a, b OpenStream) int {
		return cmp.Or(a.Since.Compare(b.Since), cmp.Compare(a.PID, b.PID))
	})
	return out
}
