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
	API      string // "x509", "sds", or "delegated"
	// For is the workload a delegate's stream serves (its PID or
	// selectors); "" for a workload's own stream.
	For   string
	Since time.Time
	// SVIDs and Hints are what the stream last sent; Hints[i] belongs to
	// SVIDs[i], and is empty on SDS streams.
	SVIDs []*agent.X509SVID
	Hints []string
}

// NewStreams returns an empty record.
func NewStreams() *Streams {
	return &Streams{now: time.Now, open: map[uint64]*OpenStream{}}
}

// Add records a stream of caller and returns its key; on a nil Streams it
// does nothing. For is who the stream serves, when not the caller itself
// (a delegate's stream for a workload).
func (t *Streams) Add(caller *attestor.Caller, api, forWorkload string) uint64 {
	if t == nil {
		return 0
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	t.next++
	t.open[t.next] = &OpenStream{PID: caller.PID, UID: caller.UID, GID: caller.GID, API: api, For: forWorkload, Since: t.now()}
	return t.next
}

// Sent records what stream key was last sent.
func (t *Streams) Sent(key uint64, svids []*agent.X509SVID, hints []string) {
	if t == nil {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if s := t.open[key]; s != nil {
		s.SVIDs, s.Hints = svids, hints
	}
}

// Remove forgets a stream that ended.
func (t *Streams) Remove(key uint64) {
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
