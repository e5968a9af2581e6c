package agent

import (
	"errors"
	"maps"
	"slices"
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

// ReportSave records the outcome of saving path, a file in the data
// directory: the agent reports degraded readiness while a save fails.
func (c *Cache) ReportSave(path string, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if err == nil {
		delete(c.saveErrs, path)
		return
	}
	if c.saveErrs == nil {
		c.saveErrs = map[string]error{}
	}
	c.saveErrs[path] = err
}

// ReportUpstream records the outcome of an upstream call. Upstreams call it
// through the Sink (it is optional there); the cache calls it after minting.
func (c *Cache) ReportUpstream(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case err == nil:
		c.upstreamErr = nil
		c.upstreamDownSince = time.Time{}
	case c.upstreamErr == nil:
		c.upstreamErr, c.upstreamDownSince = err, c.now()
	default:
		c.upstreamErr = err
	}
}

// Health returns the cache's state of health.
func (c *Cache) Health() Health {
	c.mu.RLock()
	defer c.mu.RUnlock()
	h := Health{
		UpstreamErr:       c.upstreamErr,
		UpstreamDownSince: c.upstreamDownSince,
		Entries:           c.entries.len(),
		X509SVIDs:         len(c.svids),
	}
	for _, path := range slices.Sorted(maps.Keys(c.saveErrs)) {
		h.SaveErr = errors.Join(h.SaveErr, c.saveErrs[path])
	}
	select {
	case <-c.ready:
		h.Ready = true
	default:
	}
	for _, svid := range c.svids {
		if h.FirstExpiry.IsZero() || svid.NotAfter.Before(h.FirstExpiry) {
			h.FirstExpiry = svid.NotAfter
		}
	}
	return h
}
