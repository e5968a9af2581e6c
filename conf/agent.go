package conf

import (
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// DefaultWorkloadAttestorTimeout and MaxWorkloadAttestorTimeout bound
// agent.workload_attestor_timeout, a key SPIRE lacks: spire-agent waits on
// its attestors as long as the caller waits. The default is the longest
// that SPIRE's k8s attestor waits by default (60 polls of the kubelet,
// 500ms apart, for a container not listed yet), so an attestor ported with
// SPIRE's defaults is not cut short; past the maximum, a fetch held up by one
// attestor is an outage more than a wait.
const (
	DefaultWorkloadAttestorTimeout = 30 * time.Second
	MaxWorkloadAttestorTimeout     = time.Minute
)

// Agent is the agent block.
type Agent struct {
	TrustDomain                   spiffeid.TrustDomain
	DataDir                       string
	SocketPath                    string
	LogLevel                      string // trace, debug, info, warn or error
	LogFormat                     string // text or json
	LogFile                       string
	AllowUnauthenticatedVerifiers bool

	// WorkloadAttestorTimeout bounds each workload attestor's Attest call,
	// so one slow source (a kubelet, a container engine) cannot hang every
	// fetch.
	WorkloadAttestorTimeout time.Duration

	// SPIRE Server upstream.
	ServerAddress     string
	ServerPort        int // DefaultServerPort when ServerAddress is set
	TrustBundlePath   string
	TrustBundleFormat string // pem or spiffe
	InsecureBootstrap bool
	JoinToken         string
	SyncInterval      time.Duration

	// AdminSocketPath, when set, serves SPIRE's admin API (Delegated
	// Identity) there; AuthorizedDelegates are the SPIFFE IDs, all in
	// TrustDomain, whose workloads may use it.
	AdminSocketPath     string
	AuthorizedDelegates []spiffeid.ID

	// Broker, when not nil, serves the SPIFFE Broker Endpoint
	// (experimental.broker, as in spire-agent).
	Broker *Broker

	// ProfilingPort, when not 0, serves net/http/pprof on localhost at
	// this port (spire-agent's profiling_enabled and profiling_port).
	ProfilingPort int

	// SDS names the Envoy SDS resources, as spire-agent's sds block does.
	SDS SDS

	Pos Pos // where the agent block starts

	top *Section // for positioned errors about the block's keys
}

// SDS is the agent.sds block. Empty names take spire-agent's defaults.
type SDS struct {
	DefaultSVIDName             string
	DefaultBundleName           string
	DefaultAllBundlesName       string
	DisableSPIFFECertValidation bool
}

// Errorf returns an error positioned at a key of the agent block, e.g.
// a.Errorf("trust_bundle_path", "cannot read it: %v", err), for checks that
// plugins make after parsing.
func (a *Agent) Errorf(key string, format string, args ...any) error {
	if a.top == nil {
		return fmt.Errorf("agent.%s: %s", key, fmt.Sprintf(format, args...))
	}
	return a.top.Errorf("agent."+key, format, args...)
}

// Pointers tell "left out" (take the default) from "set to the zero value".
type rawAgent struct {
	TrustDomain                   *string          `hcl:"trust_domain"`
	DataDir                       *string          `hcl:"data_dir"`
	SocketPath                    *string          `hcl:"socket_path"`
	LogLevel                      *string          `hcl:"log_level"`
	LogFormat                     *string          `hcl:"log_format"`
	LogFile                       string           `hcl:"log_file"`
	AllowUnauthenticatedVerifiers bool             `hcl:"allow_unauthenticated_verifiers"`
	ServerAddress                 *string          `hcl:"server_address"`
	ServerPort                    *int             `hcl:"server_port"`
	TrustBundlePath               *string          `hcl:"trust_bundle_path"`
	TrustBundleFormat             *string          `hcl:"trust_bundle_format"`
	InsecureBootstrap             bool             `hcl:"insecure_bootstrap"`
	JoinToken                     string           `hcl:"join_token"`
	SyncInterval                  *string          `hcl:"sync_interval"`
	WorkloadAttestorTimeout       *string          `hcl:"workload_attestor_timeout"`
	AdminSocketPath               *string          `hcl:"admin_socket_path"`
	AuthorizedDelegates           []string         `hcl:"authorized_delegates"`
	ProfilingEnabled              bool             `hcl:"profiling_enabled"`
	ProfilingPort                 *int             `hcl:"profiling_port"`
	SDS                           *rawSDS          `hcl:"sds"`
	Experimental                  *rawExperimental `hcl:"experimental"`
}

type rawSDS struct {
	DefaultSVIDName             string `hcl:"default_svid_name"`
	DefaultBundleName           string `hcl:"default_bundle_name"`
	DefaultAllBundlesName       string `hcl:"default_all_bundles_name"`
	DisableSPIFFECertValidation bool   `hcl:"disable_spiffe_cert_validation"`
}

var logLevels = []string{"trace", "debug", "info", "warn", "error"}

func buildAgent(top *Section, r *rawAgent, errs *errList) Agent {
	a := Agent{
		DataDir:           DefaultDataDir,
		SocketPath:        DefaultSocketPath,
		LogLevel:          DefaultLogLevel,
		LogFormat:         DefaultLogFormat,
		LogFile:           r.LogFile,
		TrustBundleFormat: DefaultBundleFormat,
		SyncInterval:      DefaultSyncInterval,

		WorkloadAttestorTimeout: DefaultWorkloadAttestorTimeout,
		JoinToken:               r.JoinToken,
		InsecureBootstrap:       r.InsecureBootstrap,

		AllowUnauthenticatedVerifiers: r.AllowUnauthenticatedVerifiers,

		Pos: top.lookup("agent"),
		top: top,
	}
	if r.SDS != nil {
		a.SDS = SDS(*r.SDS)
	}
	fail := func(key, format string, args ...any) {
		if !errs.has(key) {
			errs.addAll(top.Errorf(key, format, args...))
		}
	}

	switch {
	case r.TrustDomain == nil:
		fail("agent", "trust_domain is missing; add trust_domain = \"example.org\" to the agent block")
	default:
		td, err := spiffeid.TrustDomainFromString(*r.TrustDomain)
		if err != nil {
			fail("agent.trust_domain", "invalid trust domain %q: %v; write a name like \"example.org\"", *r.TrustDomain, err)
		}
		a.TrustDomain = td
	}
	if r.DataDir != nil && *r.DataDir != "" {
		a.DataDir = *r.DataDir
	}
	if r.SocketPath != nil {
		if *r.SocketPath == "" {
			fail("agent.socket_path", "socket_path is empty; remove it to use %s, or give a path", DefaultSocketPath)
		}
		a.SocketPath = *r.SocketPath
	}
	if r.LogLevel != nil {
		lvl := strings.ToLower(*r.LogLevel)
		if lvl == "warning" { // logrus, and so SPIRE, accepts it
			lvl = "warn"
		}
		if !contains(logLevels, lvl) {
			fail("agent.log_level", "unknown log level %q; use one of %s", *r.LogLevel, strings.Join(logLevels, ", "))
		}
		a.LogLevel = lvl
	}
	if r.LogFormat != nil {
		f := strings.ToLower(*r.LogFormat)
		if f != "text" && f != "json" {
			fail("agent.log_format", "unknown log format %q; use \"text\" or \"json\"", *r.LogFormat)
		}
		a.LogFormat = f
	}

	if r.ServerAddress != nil {
		a.ServerAddress = *r.ServerAddress
		a.ServerPort = DefaultServerPort
		if msg := checkServerAddress(a.ServerAddress); msg != "" {
			fail("agent.server_address", "%s", msg)
		}
	}
	if r.ServerPort != nil {
		a.ServerPort = *r.ServerPort
		if a.ServerPort < 1 || a.ServerPort > 65535 {
			fail("agent.server_port", "port %d is out of range; use 1 to 65535", a.ServerPort)
		}
	}
	switch {
	case r.ProfilingEnabled && r.ProfilingPort == nil:
		fail("agent.profiling_enabled", "profiling_port is missing; add profiling_port = 6060 (or another free port) to serve pprof on localhost")
	case r.ProfilingPort != nil && (*r.ProfilingPort < 1 || *r.ProfilingPort > 65535):
		fail("agent.profiling_port", "port %d is out of range; use 1 to 65535", *r.ProfilingPort)
	case r.ProfilingEnabled:
		a.ProfilingPort = *r.ProfilingPort
	}
	if r.TrustBundlePath != nil {
		a.TrustBundlePath = *r.TrustBundlePath
		if a.InsecureBootstrap {
			fail("agent.trust_bundle_path", "trust_bundle_path and insecure_bootstrap = true exclude each other: insecure bootstrap trusts any server, so drop one")
		}
	}
	if r.TrustBundleFormat != nil {
		f := strings.ToLower(*r.TrustBundleFormat)
		if f != "pem" && f != "spiffe" {
			fail("agent.trust_bundle_format", "unknown trust bundle format %q; use \"pem\" or \"spiffe\"", *r.TrustBundleFormat)
		}
		a.TrustBundleFormat = f
	}
	if r.SyncInterval != nil && !errs.has("agent.sync_interval") {
		d, err := top.Duration("agent.sync_interval", *r.SyncInterval)
		errs.addAll(err)
		a.SyncInterval = d
	}
	if r.WorkloadAttestorTimeout != nil && !errs.has("agent.workload_attestor_timeout") {
		d, err := top.Duration("agent.workload_attestor_timeout", *r.WorkloadAttestorTimeout)
		errs.addAll(err)
		if d > MaxWorkloadAttestorTimeout {
			fail("agent.workload_attestor_timeout", "workload_attestor_timeout %q is too long: a fetch would wait that long on a stuck attestor; use at most %q", *r.WorkloadAttestorTimeout, MaxWorkloadAttestorTimeout.String())
		}
		a.WorkloadAttestorTimeout = d
	}
	if r.AdminSocketPath != nil {
		a.AdminSocketPath = *r.AdminSocketPath
		switch {
		case a.AdminSocketPath == "":
			fail("agent.admin_socket_path", "admin_socket_path is empty; remove it to disable the admin API, or give a path")
		case sameOrBelow(filepath.Dir(a.AdminSocketPath), filepath.Dir(a.SocketPath)):
			// Workloads can reach the Workload API socket's directory; the
			// admin API must not be reachable from there.
			fail("agent.admin_socket_path", "admin socket %q is in the directory of socket_path %q (or below it); put it in a directory workloads cannot reach", a.AdminSocketPath, a.SocketPath)
		}
	}
	a.AuthorizedDelegates = buildDelegates(top, a.TrustDomain, r.AuthorizedDelegates, errs)
	if r.Experimental != nil && r.Experimental.Broker != nil {
		a.Broker = buildBroker(top, &a, r.Experimental.Broker, errs)
	}
	return a
}

// buildDelegates parses authorized_delegates: SPIFFE IDs in the agent's
// trust domain, as spire-agent requires. An unparsable trust domain was
// reported already; the IDs are then only parsed.
func buildDelegates(top *Section, td spiffeid.TrustDomain, raw []string, errs *errList) []spiffeid.ID {
	var ids []spiffeid.ID
	for i, s := range raw {
		key := fmt.Sprintf("agent.authorized_delegates[%d]", i)
		id, err := spiffeid.FromString(s)
		switch {
		case err != nil:
			errs.addAll(top.Errorf(key, "invalid SPIFFE ID %q: %v; write it like \"spiffe://%s/proxy\"", s, err, trustDomainName(td)))
		case !td.IsZero() && id.TrustDomain() != td:
			errs.addAll(top.Errorf(key, "delegate %q is not in the agent's trust domain %q: only workloads of this trust domain can be delegates", s, td.Name()))
		default:
			ids = append(ids, id)
		}
	}
	return ids
}

func trustDomainName(td spiffeid.TrustDomain) string {
	if td.IsZero() {
		return "example.org"
	}
	return td.Name()
}

// checkServerAddress returns why addr is not a bare host name or IP, or "".
func checkServerAddress(addr string) string {
	switch {
	case addr == "":
		return "server_address is empty; give the SPIRE Server's host name or IP, or remove the key"
	case strings.Contains(addr, "://"):
		return fmt.Sprintf("server_address %q has a scheme; give only the host name or IP", addr)
	}
	if _, port, err := net.SplitHostPort(addr); err == nil {
		return fmt.Sprintf("server_address %q includes a port; move %s to server_port", addr, port)
	}
	return ""
}

// sameOrBelow reports whether dir is base or inside it.
func sameOrBelow(dir, base string) bool {
	dir, base = filepath.Clean(dir), filepath.Clean(base)
	if absDir, err := filepath.Abs(dir); err == nil {
		dir = absDir
	}
	if absBase, err := filepath.Abs(base); err == nil {
		base = absBase
	}
	rel, err := filepath.Rel(base, dir)
	return err == nil && rel != ".." && !strings.HasPrefix(rel, "../")
}
