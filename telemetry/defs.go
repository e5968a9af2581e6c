// Package telemetry holds every Prometheus metric Lanyard exposes: their
// definitions in one list (Defs), which the docs and the alert-rule check
// read, and the Metrics that components record into. A nil *Metrics
// records nothing, so that components work without it in tests.
package telemetry

import "github.com/prometheus/client_golang/prometheus"

// Kind is a metric's Prometheus type.
type Kind string

// The kinds Lanyard uses.
const (
	Counter   Kind = "counter"
	Gauge     Kind = "gauge"
	Histogram Kind = "histogram"
)

// Def defines one metric. Labels are bounded sets: never a SPIFFE ID, a
// pid or a uid.
type Def struct {
	Name   string
	Kind   Kind
	Labels []string
	Help   string
	// SPIRE names spire-agent's nearest metric (its telemetry keys), for
	// the docs; empty when it has none.
	SPIRE string
}

// Desc is the metric's descriptor, for collectors that read at scrape.
func (d Def) Desc() *prometheus.Desc {
	return prometheus.NewDesc(d.Name, d.Help, d.Labels, nil)
}

// The label values of uid_class: connections and streams are counted by
// the kind of user, never by uid.
const (
	UIDRoot   = "root"
	UIDSystem = "system" // below 1000, Debian's and Fedora's first user
	UIDUser   = "user"
)

// UIDClass buckets a uid for a label.
func UIDClass(uid uint32) string {
	switch {
	case uid == 0:
		return UIDRoot
	case uid < 1000:
		return UIDSystem
	default:
		return UIDUser
	}
}

// The agent's health gauges; their names are older than this package and
// stay as they are: users alert on them.
var (
	Ready          = Def{Name: "lanyard_ready", Kind: Gauge, Help: "1 once entries and bundles are loaded."}
	UpstreamUp     = Def{Name: "lanyard_upstream_up", Kind: Gauge, Help: "1 while the upstream answers, 0 while the agent serves from its cache."}
	UpstreamDown   = Def{Name: "lanyard_upstream_down_seconds", Kind: Gauge, Help: "How long the upstream has been unavailable (0 when up)."}
	FirstExpiry    = Def{Name: "lanyard_x509_svid_first_expiry_seconds", Kind: Gauge, Help: "Seconds until the first cached X509-SVID expires.", SPIRE: "cache_manager.expiring_svids (a count, not a time)"}
	Entries        = Def{Name: "lanyard_entries", Kind: Gauge, Help: "Registration entries held.", SPIRE: "lru_cache_record_map_size"}
	X509SVIDsTotal = Def{Name: "lanyard_x509_svids", Kind: Gauge, Help: "X509-SVIDs held.", SPIRE: "lru_cache_svid_map_size"}
)

// Workload API, SDS and admin socket calls.
var (
	RPCHandled       = Def{Name: "lanyard_rpc_server_handled_total", Kind: Counter, Labels: []string{"service", "method", "code"}, Help: "Calls served on the Workload API and admin sockets, by gRPC method and status code; a stream counts when it ends.", SPIRE: "rpc.<service>.<method> (status label)"}
	RPCDuration      = Def{Name: "lanyard_rpc_server_duration_seconds", Kind: Histogram, Labels: []string{"service", "method"}, Help: "How long unary calls took, attestation included.", SPIRE: "rpc.<service>.<method>.elapsed_time"}
	RPCFirstResponse = Def{Name: "lanyard_rpc_server_first_response_seconds", Kind: Histogram, Labels: []string{"service", "method"}, Help: "How long a stream took to send its first response (for FetchX509SVID: attestation and, for a new workload, signing).", SPIRE: "delegated_identity_api.subscribe_x509_svid.first_x509_svid_update"}
	OpenStreams      = Def{Name: "lanyard_rpc_server_open_streams", Kind: Gauge, Labels: []string{"service", "uid_class"}, Help: "Streams open now, by the kind of user of the caller (root, system: uid below 1000, user)."}
	Connections      = Def{Name: "lanyard_rpc_server_connections", Kind: Gauge, Labels: []string{"socket", "uid_class"}, Help: "Connections open now on a socket (workload, admin), by the kind of user of the peer.", SPIRE: "workload_api.connections, sds_api.connections, delegated_identity_api.connections"}
	ConnectionsTotal = Def{Name: "lanyard_rpc_server_connections_total", Kind: Counter, Labels: []string{"socket", "uid_class"}, Help: "Connections accepted on a socket (workload, admin), by the kind of user of the peer.", SPIRE: "workload_api.connection, sds_api.connections, delegated_identity_api.connection"}
)

// Workload attestation.
var (
	AttestationDuration = Def{Name: "lanyard_workload_attestation_duration_seconds", Kind: Histogram, Help: "How long a workload attestation took, every attestor together.", SPIRE: "workload_api.workload_attestation.elapsed_time"}
	AttestorDuration    = Def{Name: "lanyard_workload_attestor_duration_seconds", Kind: Histogram, Labels: []string{"attestor"}, Help: "How long each workload attestor took to answer.", SPIRE: "workload_api.workload_attestor.elapsed_time (attestor label)"}
	AttestorFailures    = Def{Name: "lanyard_workload_attestor_failures_total", Kind: Counter, Labels: []string{"attestor", "reason"}, Help: "Workload attestor failures, by attestor and reason: error (it failed), timeout (no answer within its deadline), refused (the caller changed or left).", SPIRE: "workload_api.workload_attestor (status label)"}
)

// SVIDs per trust domain, read at scrape except the counters.
var (
	SVIDs              = Def{Name: "lanyard_svids", Kind: Gauge, Labels: []string{"trust_domain"}, Help: "X509-SVIDs held, by trust domain.", SPIRE: "lru_cache_svid_map_size"}
	SVIDEarliestExpiry = Def{Name: "lanyard_svid_earliest_expiry_seconds", Kind: Gauge, Labels: []string{"trust_domain"}, Help: "Seconds until the earliest expiry among the X509-SVIDs workloads were handed (those the agent renews), by trust domain; negative once expired.", SPIRE: "cache_manager.expiring_svids (a count)"}
	SVIDShortestTTL    = Def{Name: "lanyard_svid_shortest_ttl_seconds", Kind: Gauge, Labels: []string{"trust_domain"}, Help: "The shortest lifetime (not after minus not before) among the X509-SVIDs held, by trust domain: alerts compare outages with it."}
	SVIDRenewals       = Def{Name: "lanyard_svid_renewals_total", Kind: Counter, Labels: []string{"trust_domain"}, Help: "X509-SVIDs the rotator renewed, by trust domain.", SPIRE: "manager.sync.fetch_svids_updates (calls, not SVIDs)"}
	SVIDRenewalFailure = Def{Name: "lanyard_svid_renewal_failures_total", Kind: Counter, Labels: []string{"trust_domain"}, Help: "X509-SVID renewals that failed (the old SVID is kept and the renewal retried with backoff), by trust domain."}
)

// The upstream.
var (
	UpstreamRPCHandled  = Def{Name: "lanyard_upstream_rpc_handled_total", Kind: Counter, Labels: []string{"service", "method", "code"}, Help: "Calls to the SPIRE Server, by gRPC method and status code; a stream counts when it ends."}
	UpstreamRPCDuration = Def{Name: "lanyard_upstream_rpc_duration_seconds", Kind: Histogram, Labels: []string{"service", "method"}, Help: "How long calls to the SPIRE Server took (a stream: from its start to its end)."}
	UpstreamServer      = Def{Name: "lanyard_upstream_server_connections", Kind: Gauge, Labels: []string{"address"}, Help: "Connections open to each SPIRE Server address (normally one, to the server in use); a server no longer connected has no series."}
	UpstreamFailovers   = Def{Name: "lanyard_upstream_failovers_total", Kind: Counter, Help: "Times the agent moved to another SPIRE Server address after a failure."}
	UpstreamSyncAge     = Def{Name: "lanyard_upstream_last_sync_age_seconds", Kind: Gauge, Help: "Seconds since the upstream last delivered entries and bundles with success (absent before the first).", SPIRE: "manager.sync.fetch_entries_updates (calls)"}
)

// The embedded CA and the saved cache.
var (
	LocalCARotations = Def{Name: "lanyard_local_ca_rotations_total", Kind: Counter, Help: "Times the embedded CA activated its next authority.", SPIRE: "manager.x509_ca.rotate (spire-server)"}
	LocalCAExpiry    = Def{Name: "lanyard_local_ca_expiry_timestamp_seconds", Kind: Gauge, Help: "When the embedded CA's active authority expires, in seconds since the epoch.", SPIRE: "manager.x509_ca.rotate.expiration (spire-server)"}
	CacheLastSave    = Def{Name: "lanyard_cache_last_save_timestamp_seconds", Kind: Gauge, Help: "When the cache was last saved to the data directory with success, in seconds since the epoch (absent before the first)."}
	CacheSaveFailure = Def{Name: "lanyard_cache_save_failures_total", Kind: Counter, Help: "Saves of the cache to the data directory that failed."}
)

// Defs lists every metric Lanyard defines, for the docs and the checks of
// the alert rules and the dashboard. The Go runtime's and the process's
// (go_*, process_*) come from client_golang's collectors.
func Defs() []Def {
	return []Def{
		Ready, UpstreamUp, UpstreamDown, FirstExpiry, Entries, X509SVIDsTotal,
		RPCHandled, RPCDuration, RPCFirstResponse, OpenStreams, Connections, ConnectionsTotal,
		AttestationDuration, AttestorDuration, AttestorFailures,
		SVIDs, SVIDEarliestExpiry, SVIDShortestTTL, SVIDRenewals, SVIDRenewalFailure,
		UpstreamRPCHandled, UpstreamRPCDuration, UpstreamServer, UpstreamFailovers, UpstreamSyncAge,
		LocalCARotations, LocalCAExpiry, CacheLastSave, CacheSaveFailure,
	}
}

// StandardPrefixes are the metric names client_golang's Go and process
// collectors expose, which the agent registers too.
var StandardPrefixes = []string{"go_", "process_", "promhttp_"}

// latencyBuckets span a cached fetch (~100 µs) to an upstream call at its
// deadline (seconds).
var latencyBuckets = []float64{0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30}

func (d Def) counterVec() *prometheus.CounterVec {
	return prometheus.NewCounterVec(prometheus.CounterOpts{Name: d.Name, Help: d.Help}, d.Labels)
}

func (d Def) gaugeVec() *prometheus.GaugeVec {
	return prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: d.Name, Help: d.Help}, d.Labels)
}

func (d Def) histogramVec() *prometheus.HistogramVec {
	return prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: d.Name, Help: d.Help, Buckets: latencyBuckets}, d.Labels)
}
