// Package conf parses Lanyard's configuration file: HCL (hashicorp/hcl v1,
// or its JSON form) in the shape of spire-agent's agent.conf, so an existing
// SPIRE agent config works where Lanyard supports what it asks for and is
// refused, key by key, where Lanyard does not. Every error names the
// file:line:col and the key path.
package conf

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Defaults for keys left out of the file.
const (
	DefaultDataDir      = "/var/lib/lanyard"
	DefaultSocketPath   = "/tmp/spire-agent/public/api.sock" // spire-agent's, so workloads find us unchanged
	DefaultLogLevel     = "info"
	DefaultLogFormat    = "text"
	DefaultServerPort   = 8081
	DefaultSyncInterval = 5 * time.Second
	DefaultBundleFormat = "pem"

	DefaultHealthBindAddress = "localhost"
	DefaultHealthBindPort    = 80 // SPIRE's default
	DefaultHealthLivePath    = "/live"
	DefaultHealthReadyPath   = "/ready"

	DefaultPrometheusHost = "localhost"
)

// Config is a parsed and validated config file.
type Config struct {
	File         string
	Agent        Agent
	Plugins      []*Plugin // in file order
	HealthChecks HealthChecks
	Telemetry    Telemetry
}

// Agent is the agent block.
type Agent struct {
	TrustDomain                   spiffeid.TrustDomain
	DataDir                       string
	SocketPath                    string
	LogLevel                      string // trace, debug, info, warn or error
	LogFormat                     string // text or json
	LogFile                       string
	AllowUnauthenticatedVerifiers bool

	// SPIRE Server upstream.
	ServerAddress     string
	ServerPort        int // DefaultServerPort when ServerAddress is set
	TrustBundlePath   string
	TrustBundleFormat string // pem or spiffe
	InsecureBootstrap bool
	JoinToken         string
	SyncInterval      time.Duration
	AdminSocketPath   string

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

// HealthChecks is the health_checks block.
type HealthChecks struct {
	ListenerEnabled bool
	BindAddress     string
	BindPort        int
	LivePath        string
	ReadyPath       string
}

// Telemetry is the telemetry block; Prometheus is the only sink.
type Telemetry struct {
	PrometheusEnabled bool
	PrometheusHost    string
	PrometheusPort    int
}

// Load reads and parses a config file. expandEnv expands $VAR and ${VAR}
// (os.ExpandEnv: unset variables become empty) before parsing, like
// spire-agent -expandEnv.
func Load(path string, expandEnv bool) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("cannot read config file: %w", err)
	}
	if expandEnv {
		data = []byte(os.ExpandEnv(string(data)))
	}
	return Parse(path, data)
}

// Parse parses data; file is used in error messages. It reports every error
// it finds, as Errors.
func Parse(file string, data []byte) (*Config, error) {
	data = trimBOM(data)
	start := Pos{File: file, Line: 1, Column: 1}
	if strings.TrimSpace(string(data)) == "" {
		return nil, Errors{{Pos: start, Msg: "the config file is empty; it needs at least agent { trust_domain = \"example.org\" }"}}
	}
	root, err := parseTree(file, data)
	if err != nil {
		return nil, asErrors(err)
	}
	top := &Section{file: file, pos: start, body: root, refuse: refusedKeys}

	var raw rawConfig
	var errs errList
	errs.addAll(top.Decode(&raw))

	cfg := &Config{File: file}
	if raw.Agent == nil {
		errs.add(start, "agent", "the agent block is missing; add agent { trust_domain = \"example.org\" }")
	} else {
		cfg.Agent = buildAgent(top, raw.Agent, &errs)
	}
	cfg.Plugins = buildPlugins(top, raw.Plugins, &errs)
	cfg.HealthChecks = buildHealthChecks(top, raw.HealthChecks, &errs)
	cfg.Telemetry = buildTelemetry(top, raw.Telemetry, &errs)

	if err := errs.err(); err != nil {
		return nil, err
	}
	return cfg, nil
}

func asErrors(err error) error {
	if e, ok := err.(*Error); ok {
		return Errors{e}
	}
	return err
}

type rawConfig struct {
	Agent        *rawAgent        `hcl:"agent"`
	Plugins      rawValues        `hcl:"plugins"`
	HealthChecks *rawHealthChecks `hcl:"health_checks"`
	Telemetry    *rawTelemetry    `hcl:"telemetry"`
}

// Pointers tell "left out" (take the default) from "set to the zero value".
type rawAgent struct {
	TrustDomain                   *string `hcl:"trust_domain"`
	DataDir                       *string `hcl:"data_dir"`
	SocketPath                    *string `hcl:"socket_path"`
	LogLevel                      *string `hcl:"log_level"`
	LogFormat                     *string `hcl:"log_format"`
	LogFile                       string  `hcl:"log_file"`
	AllowUnauthenticatedVerifiers bool    `hcl:"allow_unauthenticated_verifiers"`
	ServerAddress                 *string `hcl:"server_address"`
	ServerPort                    *int    `hcl:"server_port"`
	TrustBundlePath               *string `hcl:"trust_bundle_path"`
	TrustBundleFormat             *string `hcl:"trust_bundle_format"`
	InsecureBootstrap             bool    `hcl:"insecure_bootstrap"`
	JoinToken                     string  `hcl:"join_token"`
	SyncInterval                  *string `hcl:"sync_interval"`
	AdminSocketPath               *string `hcl:"admin_socket_path"`
	ProfilingEnabled              bool    `hcl:"profiling_enabled"`
	ProfilingPort                 *int    `hcl:"profiling_port"`
	SDS                           *rawSDS `hcl:"sds"`
}

type rawSDS struct {
	DefaultSVIDName             string `hcl:"default_svid_name"`
	DefaultBundleName           string `hcl:"default_bundle_name"`
	DefaultAllBundlesName       string `hcl:"default_all_bundles_name"`
	DisableSPIFFECertValidation bool   `hcl:"disable_spiffe_cert_validation"`
}

type rawHealthChecks struct {
	ListenerEnabled bool    `hcl:"listener_enabled"`
	BindAddress     *string `hcl:"bind_address"`
	BindPort        *int    `hcl:"bind_port"` // SPIRE writes it as a string; both decode
	LivePath        *string `hcl:"live_path"`
	ReadyPath       *string `hcl:"ready_path"`
}

type rawTelemetry struct {
	Prometheus *rawPrometheus `hcl:"Prometheus"`
}

type rawPrometheus struct {
	Host *string `hcl:"host"`
	Port *int    `hcl:"port"`
}

// refusedKeys gives SPIRE's keys that Lanyard does not implement a message
// of their own, so a SPIRE user learns it is a gap and not a typo.
var refusedKeys = func() map[string]map[string]string {
	notSupported := func(what string, keys ...string) map[string]string {
		m := map[string]string{}
		for _, k := range keys {
			m[strings.ToLower(k)] = fmt.Sprintf("%s %s is not supported by Lanyard", what, k)
		}
		return m
	}
	// From spire-agent's cmd/spire-agent/cli/run (current and older releases).
	agent := notSupported("spire-agent key",
		"rebootstrap_mode", "rebootstrap_delay", "retry_bootstrap", "join_token_file",
		"log_source_location", "workload_x509_svid_key_type",
		"trust_bundle_url", "trust_bundle_unix_socket", "allowed_foreign_jwt_claims",
		"availability_target", "x509_svid_cache_max_size", "jwt_svid_cache_max_size",
		"authorized_delegates", "profiling_freq", "profiling_names", "experimental",
		"umask", "plugin_dir")
	for _, k := range []string{"profiling_freq", "profiling_names"} {
		agent[k] += " (it writes profiles to files; take them from the profiling_port endpoint instead)"
	}
	agent["experimental"] += " (for experimental.sync_interval, set sync_interval in the agent block)"

	telemetry := notSupported("spire-agent telemetry key",
		"MetricPrefix", "EnableTaggedMetrics", "EnableHostnameLabel",
		"AllowedPrefixes", "BlockedPrefixes", "AllowedLabels", "BlockedLabels")
	for _, sink := range []string{"DogStatsd", "Statsd", "M3", "InMem"} {
		telemetry[strings.ToLower(sink)] = fmt.Sprintf("telemetry sink %s is not supported by Lanyard; only Prometheus is", sink)
	}
	return map[string]map[string]string{
		"": {
			"server": "this is a spire-server block; Lanyard is an agent and reads spire-agent's config (agent, plugins, health_checks, telemetry)",
		},
		"agent":     agent,
		"telemetry": telemetry,
	}
}()

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
		JoinToken:         r.JoinToken,
		InsecureBootstrap: r.InsecureBootstrap,

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
		// Parsed and checked above for when the admin API comes; until
		// then an agent that accepted the key would leave proxies that
		// rely on it (Cilium, Istio's ztunnel) waiting on a socket nobody
		// serves.
		if !errs.has("agent.admin_socket_path") {
			fail("agent.admin_socket_path", "admin_socket_path is not supported yet: this agent does not serve SPIRE's admin API (Delegated Identity); remove admin_socket_path")
		}
	}
	return a
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

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

func buildHealthChecks(top *Section, r *rawHealthChecks, errs *errList) HealthChecks {
	h := HealthChecks{
		BindAddress: DefaultHealthBindAddress,
		BindPort:    DefaultHealthBindPort,
		LivePath:    DefaultHealthLivePath,
		ReadyPath:   DefaultHealthReadyPath,
	}
	if r == nil {
		return h
	}
	fail := func(key, format string, args ...any) {
		if !errs.has(key) {
			errs.addAll(top.Errorf(key, format, args...))
		}
	}
	h.ListenerEnabled = r.ListenerEnabled
	if r.BindAddress != nil && *r.BindAddress != "" {
		h.BindAddress = *r.BindAddress
	}
	if r.BindPort != nil {
		h.BindPort = *r.BindPort
		if h.BindPort < 1 || h.BindPort > 65535 {
			fail("health_checks.bind_port", "port %d is out of range; use 1 to 65535", h.BindPort)
		}
	}
	if r.LivePath != nil {
		h.LivePath = *r.LivePath
		if !strings.HasPrefix(h.LivePath, "/") {
			fail("health_checks.live_path", "path %q must start with /", h.LivePath)
		}
	}
	if r.ReadyPath != nil {
		h.ReadyPath = *r.ReadyPath
		if !strings.HasPrefix(h.ReadyPath, "/") {
			fail("health_checks.ready_path", "path %q must start with /", h.ReadyPath)
		}
	}
	if h.LivePath == h.ReadyPath {
		fail("health_checks", "live_path and ready_path are both %q; they must differ", h.LivePath)
	}
	return h
}

func buildTelemetry(top *Section, r *rawTelemetry, errs *errList) Telemetry {
	var t Telemetry
	if r == nil || r.Prometheus == nil {
		return t
	}
	t.PrometheusEnabled = true
	t.PrometheusHost = DefaultPrometheusHost
	if r.Prometheus.Host != nil && *r.Prometheus.Host != "" {
		t.PrometheusHost = *r.Prometheus.Host
	}
	switch {
	case errs.has("telemetry.Prometheus.port"):
	case r.Prometheus.Port == nil:
		errs.addAll(top.Errorf("telemetry.Prometheus", "port is missing; add port = 9988 (or another free port)"))
	case *r.Prometheus.Port < 1 || *r.Prometheus.Port > 65535:
		errs.addAll(top.Errorf("telemetry.Prometheus.port", "port %d is out of range; use 1 to 65535", *r.Prometheus.Port))
	default:
		t.PrometheusPort = *r.Prometheus.Port
	}
	return t
}
