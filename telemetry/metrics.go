package telemetry

import (
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics is what components record into, and the registry the metrics
// endpoint serves. Every method is safe on a nil *Metrics and then does
// nothing.
type Metrics struct {
	reg *prometheus.Registry

	rpcHandled       *prometheus.CounterVec
	rpcDuration      *prometheus.HistogramVec
	rpcFirstResponse *prometheus.HistogramVec
	openStreams      *prometheus.GaugeVec
	connections      *prometheus.GaugeVec
	connectionsTotal *prometheus.CounterVec

	attestation      prometheus.Histogram
	attestorDuration *prometheus.HistogramVec
	attestorFailures *prometheus.CounterVec

	renewals        *prometheus.CounterVec
	renewalFailures *prometheus.CounterVec

	upstreamHandled   *prometheus.CounterVec
	upstreamDuration  *prometheus.HistogramVec
	upstreamServer    *prometheus.GaugeVec
	serverMu          sync.Mutex     // serverConns and upstreamServer together
	serverConns       map[string]int // connections open by server address
	upstreamFailovers prometheus.Counter

	caRotations  prometheus.Counter
	caExpiry     prometheus.Gauge
	lastSave     prometheus.Gauge
	saveFailures prometheus.Counter

	// Gauges absent until they have a value: a zero would read as "expired
	// in 1970" to an alert.
	caExpiryOnce, lastSaveOnce sync.Once
}

// New returns Metrics with every metric registered in a new registry.
func New() *Metrics {
	m := &Metrics{
		reg:              prometheus.NewRegistry(),
		serverConns:      map[string]int{},
		rpcHandled:       RPCHandled.counterVec(),
		rpcDuration:      RPCDuration.histogramVec(),
		rpcFirstResponse: RPCFirstResponse.histogramVec(),
		openStreams:      OpenStreams.gaugeVec(),
		connections:      Connections.gaugeVec(),
		connectionsTotal: ConnectionsTotal.counterVec(),
		attestation:      prometheus.NewHistogram(prometheus.HistogramOpts{Name: AttestationDuration.Name, Help: AttestationDuration.Help, Buckets: latencyBuckets}),
		attestorDuration: AttestorDuration.histogramVec(),
		attestorFailures: AttestorFailures.counterVec(),
		renewals:         SVIDRenewals.counterVec(),
		renewalFailures:  SVIDRenewalFailure.counterVec(),
		upstreamHandled:  UpstreamRPCHandled.counterVec(),
		upstreamDuration: UpstreamRPCDuration.histogramVec(),
		upstreamServer:   UpstreamServer.gaugeVec(),
		upstreamFailovers: prometheus.NewCounter(prometheus.CounterOpts{
			Name: UpstreamFailovers.Name, Help: UpstreamFailovers.Help,
		}),
		caRotations:  prometheus.NewCounter(prometheus.CounterOpts{Name: LocalCARotations.Name, Help: LocalCARotations.Help}),
		caExpiry:     prometheus.NewGauge(prometheus.GaugeOpts{Name: LocalCAExpiry.Name, Help: LocalCAExpiry.Help}),
		lastSave:     prometheus.NewGauge(prometheus.GaugeOpts{Name: CacheLastSave.Name, Help: CacheLastSave.Help}),
		saveFailures: prometheus.NewCounter(prometheus.CounterOpts{Name: CacheSaveFailure.Name, Help: CacheSaveFailure.Help}),
	}
	m.reg.MustRegister(m.rpcHandled, m.rpcDuration, m.rpcFirstResponse, m.openStreams, m.connections, m.connectionsTotal,
		m.attestation, m.attestorDuration, m.attestorFailures, m.renewals, m.renewalFailures,
		m.upstreamHandled, m.upstreamDuration, m.upstreamServer, m.upstreamFailovers,
		m.caRotations, m.saveFailures)
	return m
}

// Registry is what the metrics endpoint serves; collectors that read at
// scrape register in it.
func (m *Metrics) Registry() *prometheus.Registry {
	if m == nil {
		return nil
	}
	return m.reg
}

// Register adds collectors that read their values at scrape.
func (m *Metrics) Register(cs ...prometheus.Collector) {
	if m != nil {
		m.reg.MustRegister(cs...)
	}
}

// Attestation records one workload attestation, every attestor together.
func (m *Metrics) Attestation(took time.Duration) {
	if m != nil {
		m.attestation.Observe(took.Seconds())
	}
}

// The reasons of AttestorFailures.
const (
	AttestorError   = "error"
	AttestorTimeout = "timeout"
	AttestorRefused = "refused"
)

// AttestorObserver records the calls of one workload attestor; resolved
// once per attestor so that an attestation allocates nothing for it.
type AttestorObserver struct {
	duration prometheus.Observer
	failures *prometheus.CounterVec
	name     string
}

// Attestor returns the observer of the attestor configured as name.
func (m *Metrics) Attestor(name string) *AttestorObserver {
	if m == nil {
		return nil
	}
	return &AttestorObserver{duration: m.attestorDuration.WithLabelValues(name), failures: m.attestorFailures, name: name}
}

// Answered records how long the attestor took.
func (o *AttestorObserver) Answered(took time.Duration) {
	if o != nil {
		o.duration.Observe(took.Seconds())
	}
}

// Failed records a failure for reason (AttestorError and the others).
func (o *AttestorObserver) Failed(reason string) {
	if o != nil {
		o.failures.WithLabelValues(o.name, reason).Inc()
	}
}

// SVIDRenewed records the rotator's renewal of an SVID of trust domain td
// (its name), failed when err is not nil.
func (m *Metrics) SVIDRenewed(td string, err error) {
	switch {
	case m == nil:
	case err != nil:
		m.renewalFailures.WithLabelValues(td).Inc()
	default:
		m.renewals.WithLabelValues(td).Inc()
	}
}

// CacheSaved records a save of the cache at when, failed when err is not
// nil. The last-success gauge appears at the first success.
func (m *Metrics) CacheSaved(when time.Time, err error) {
	switch {
	case m == nil:
	case err != nil:
		m.saveFailures.Inc()
	default:
		m.lastSave.Set(float64(when.UnixNano()) / 1e9)
		m.lastSaveOnce.Do(func() { m.reg.MustRegister(m.lastSave) })
	}
}

// LocalCAActive records the embedded CA's active authority, which expires
// at notAfter; rotated is true when it replaced another (not at start).
func (m *Metrics) LocalCAActive(notAfter time.Time, rotated bool) {
	if m == nil {
		return
	}
	if rotated {
		m.caRotations.Inc()
	}
	m.caExpiry.Set(float64(notAfter.Unix()))
	m.caExpiryOnce.Do(func() { m.reg.MustRegister(m.caExpiry) })
}
