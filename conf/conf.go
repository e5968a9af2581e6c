// Package conf parses Lanyard's configuration file: HCL (hashicorp/hcl v1,
// or its JSON form) in the shape of spire-agent's agent.conf, so an existing
// SPIRE agent config works where Lanyard supports what it asks for and is
// refused, key by key, where Lanyard does not. Every error names the
// file:line:col and the key path.
package conf

import (
	"fmt"
	"os"
	"strings"
	"time"
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
		"profiling_freq", "profiling_names",
		"umask", "plugin_dir")
	for _, k := range []string{"profiling_freq", "profiling_names"} {
		agent[k] += " (it writes profiles to files; take them from the profiling_port endpoint instead)"
	}

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
		"agent":              agent,
		"agent.experimental": refusedExperimentalKeys,
		"telemetry":          telemetry,
	}
}()

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
