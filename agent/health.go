package agent

import (
	"errors"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// Health is the agent's own view of whether it can keep workloads supplied.
type Health struct {
	// Ready is set once entries and bundles are loaded (from the upstream or
	// from the saved cache).
	Ready bool
	// UpstreamErr is the upstream's last failure, nil once it works again.
	UpstreamErr error
	// UpstreamDownSince is when the current failure began.
	UpstreamDownSince time.Time
	// SaveErr says which files in the data directory cannot be saved, nil
	// when every last save succeeded. A restart would lose what they hold,
	// and the local CA does not activate a successor it has not saved.
	SaveErr error
	// FirstExpiry is when the first cached X509-SVID expires (zero if none).
	FirstExpiry time.Time
	Entries     int
	X509SVIDs   int
	JWTSVIDs    int // cached tokens
}

// Degraded reports whether the agent cannot do all of its work: it serves
// from its cache without a working upstream (SVIDs stop being renewed), or
// it cannot save its state.
func (h Health) Degraded() bool { return h.UpstreamErr != nil || h.SaveErr != nil }

// Reason says why the agent is degraded, or "" when it is not.
func (h Health) Reason() string {
	if err := errors.Join(h.UpstreamErr, h.SaveErr); err != nil {
		return err.Error()
	}
	return ""
}

// healthSource records how the upstream and the saves fare: the agent
// reports degraded readiness while either fails.
type healthSource struct {
	now func() time.Time
	// up mirrors upstreamErr == nil for the fetch path, which asks on
	// every call.
	up atomic.Bool

	mu                sync.Mutex
	upstreamErr       error
	upstreamDownSince time.Time
	saveErrs          map[string]error // by path; see reportSave
}

func newHealthSource(now func() time.Time) *healthSource {
	h := &healthSource{now: now}
	h.up.Store(true)
	return h
}

// reportSave records the outcome of saving path, a file in the data
// directory.
func (h *healthSource) reportSave(path string, err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if err == nil {
		delete(h.saveErrs, path)
		return
	}
	if h.saveErrs == nil {
		h.saveErrs = map[string]error{}
	}
	h.saveErrs[path] = err
}

// reportUpstream records the outcome of an upstream call.
func (h *healthSource) reportUpstream(err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	switch {
	case err == nil:
		h.upstreamErr = nil
		h.upstreamDownSince = time.Time{}
	case h.upstreamErr == nil:
		h.upstreamErr, h.upstreamDownSince = err, h.now()
	default:
		h.upstreamErr = err
	}
	h.up.Store(err == nil)
}

// upstreamUp reports whether the last upstream call succeeded.
func (h *healthSource) upstreamUp() bool { return h.up.Load() }

// fill sets what the source knows of the agent's health.
func (h *healthSource) fill(out *Health) {
	h.mu.Lock()
	defer h.mu.Unlock()
	out.UpstreamErr, out.UpstreamDownSince = h.upstreamErr, h.upstreamDownSince
	for _, path := range slices.Sorted(maps.Keys(h.saveErrs)) {
		out.SaveErr = errors.Join(out.SaveErr, h.saveErrs[path])
	}
}
