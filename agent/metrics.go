package agent

import (
	"time"

	"github.com/lanyard-dev/lanyard/telemetry"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// newCollectors are the agent's metrics read when scraped, so that the
// fetch path pays nothing for them: its health, its SVIDs by trust domain
// and the age of its upstream's last sync.
func (a *Agent) newCollectors() []prometheus.Collector {
	return []prometheus.Collector{
		&healthCollector{cache: a.svids},
		&svidCollector{store: a.svids.store, now: a.svids.now},
		&syncCollector{self: a.SelfIdentity()},
	}
}

// healthCollector exposes Health as Prometheus gauges.
type healthCollector struct {
	cache *SVIDManager
}

var healthDescs = struct {
	ready, upstreamUp, downSeconds, firstExpiry, entries, svids *prometheus.Desc
}{
	telemetry.Ready.Desc(), telemetry.UpstreamUp.Desc(), telemetry.UpstreamDown.Desc(),
	telemetry.FirstExpiry.Desc(), telemetry.Entries.Desc(), telemetry.X509SVIDsTotal.Desc(),
}

func (c *healthCollector) Describe(ch chan<- *prometheus.Desc) {
	d := healthDescs
	for _, desc := range []*prometheus.Desc{d.ready, d.upstreamUp, d.downSeconds, d.firstExpiry, d.entries, d.svids} {
		ch <- desc
	}
}

func (c *healthCollector) Collect(ch chan<- prometheus.Metric) {
	h := c.cache.Health()
	d := healthDescs
	gauge(ch, d.ready, boolGauge(h.Ready))
	gauge(ch, d.upstreamUp, boolGauge(h.UpstreamErr == nil))
	down := 0.0
	if h.UpstreamErr != nil {
		down = time.Since(h.UpstreamDownSince).Seconds()
	}
	gauge(ch, d.downSeconds, down)
	if !h.FirstExpiry.IsZero() {
		gauge(ch, d.firstExpiry, time.Until(h.FirstExpiry).Seconds())
	}
	gauge(ch, d.entries, float64(h.Entries))
	gauge(ch, d.svids, float64(h.X509SVIDs))
}

func gauge(ch chan<- prometheus.Metric, d *prometheus.Desc, v float64, labels ...string) {
	ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
}

func boolGauge(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// svidCollector exposes the X509-SVIDs held by trust domain.
type svidCollector struct {
	store *entryStore
	now   func() time.Time
}

var svidDescs = struct{ count, earliest, shortestTTL *prometheus.Desc }{
	telemetry.SVIDs.Desc(), telemetry.SVIDEarliestExpiry.Desc(), telemetry.SVIDShortestTTL.Desc(),
}

func (c *svidCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- svidDescs.count
	ch <- svidDescs.earliest
	ch <- svidDescs.shortestTTL
}

func (c *svidCollector) Collect(ch chan<- prometheus.Metric) {
	now := c.now()
	for td, st := range c.store.svidStats() {
		name := td.Name()
		gauge(ch, svidDescs.count, float64(st.count), name)
		gauge(ch, svidDescs.shortestTTL, st.shortestTTL.Seconds(), name)
		if !st.earliestServed.IsZero() {
			gauge(ch, svidDescs.earliest, st.earliestServed.Sub(now).Seconds(), name)
		}
	}
}

// svidStats is what the metrics show of one trust domain's SVIDs.
type svidStats struct {
	count       int
	shortestTTL time.Duration
	// earliestServed is the earliest expiry among the SVIDs handed to a
	// workload, which the rotator renews; unserved ones expire unrenewed.
	earliestServed time.Time
}

// svidStats reads the SVIDs held by trust domain.
func (s *entryStore) svidStats() map[spiffeid.TrustDomain]*svidStats {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := map[spiffeid.TrustDomain]*svidStats{}
	for _, svid := range s.svids {
		td := svid.ID.TrustDomain()
		st := out[td]
		if st == nil {
			st = &svidStats{}
			out[td] = st
		}
		st.count++
		if ttl := svid.NotAfter.Sub(svid.NotBefore); st.shortestTTL == 0 || ttl < st.shortestTTL {
			st.shortestTTL = ttl
		}
		if svid.served.Load() && (st.earliestServed.IsZero() || svid.NotAfter.Before(st.earliestServed)) {
			st.earliestServed = svid.NotAfter
		}
	}
	return out
}

// syncCollector exposes how long ago the upstream last synced.
type syncCollector struct {
	self SelfIdentity // nil: the upstream does not say
}

var syncAgeDesc = telemetry.UpstreamSyncAge.Desc()

func (c *syncCollector) Describe(ch chan<- *prometheus.Desc) { ch <- syncAgeDesc }

func (c *syncCollector) Collect(ch chan<- prometheus.Metric) {
	if c.self == nil {
		return
	}
	if last := c.self.LastSync(); !last.IsZero() {
		gauge(ch, syncAgeDesc, time.Since(last).Seconds())
	}
}
