package agent

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// healthCollector exposes Health as Prometheus gauges, read when scraped so
// that the fetch path pays nothing for them.
type healthCollector struct {
	cache *SVIDManager
	descs struct {
		ready, upstreamUp, downSeconds, firstExpiry, entries, svids *prometheus.Desc
	}
}

// NewCollector returns the agent's Prometheus collector.
func (a *Agent) NewCollector() prometheus.Collector {
	c := &healthCollector{cache: a.svids}
	c.descs.ready = prometheus.NewDesc("lanyard_ready", "1 once entries and bundles are loaded.", nil, nil)
	c.descs.upstreamUp = prometheus.NewDesc("lanyard_upstream_up", "1 while the upstream answers, 0 while the agent serves from its cache.", nil, nil)
	c.descs.downSeconds = prometheus.NewDesc("lanyard_upstream_down_seconds", "How long the upstream has been unavailable (0 when up).", nil, nil)
	c.descs.firstExpiry = prometheus.NewDesc("lanyard_x509_svid_first_expiry_seconds", "Seconds until the first cached X509-SVID expires.", nil, nil)
	c.descs.entries = prometheus.NewDesc("lanyard_entries", "Registration entries held.", nil, nil)
	c.descs.svids = prometheus.NewDesc("lanyard_x509_svids", "X509-SVIDs held.", nil, nil)
	return c
}

func (c *healthCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.descs.ready, c.descs.upstreamUp, c.descs.downSeconds, c.descs.firstExpiry, c.descs.entries, c.descs.svids} {
		ch <- d
	}
}

func (c *healthCollector) Collect(ch chan<- prometheus.Metric) {
	h := c.cache.Health()
	gauge := func(d *prometheus.Desc, v float64) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v)
	}
	gauge(c.descs.ready, boolGauge(h.Ready))
	gauge(c.descs.upstreamUp, boolGauge(h.UpstreamErr == nil))
	down := 0.0
	if h.UpstreamErr != nil {
		down = time.Since(h.UpstreamDownSince).Seconds()
	}
	gauge(c.descs.downSeconds, down)
	if !h.FirstExpiry.IsZero() {
		gauge(c.descs.firstExpiry, time.Until(h.FirstExpiry).Seconds())
	}
	gauge(c.descs.entries, float64(h.Entries))
	gauge(c.descs.svids, float64(h.X509SVIDs))
}

func boolGauge(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
