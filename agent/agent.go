package agent

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/attestor"
	"github.com/lanyard-dev/lanyard/attestor/selector"
	"github.com/lanyard-dev/lanyard/conf"
	"github.com/lanyard-dev/lanyard/telemetry"
)

// Plugin types as written in the config.
const (
	typeWorkloadAttestor  = "WorkloadAttestor"
	typeUpstreamAuthority = "UpstreamAuthority"
	typeNodeAttestor      = "NodeAttestor"
	typeKeyManager        = "KeyManager"
)

// restartPlugins names the enabled plugins that are only read at start.
func restartPlugins(cfg *conf.Config) string {
	var names []string
	for _, p := range cfg.Plugins {
		if p.Enabled && (p.Type == typeNodeAttestor || p.Type == typeKeyManager) {
			names = append(names, p.Type+" "+p.Name)
		}
	}
	return strings.Join(names, ", ")
}

// Agent is the node agent's state: its attestors, its upstream and the
// SVID manager that holds what the upstream delivered. The Workload API server is built on
// top of it (see workloadapi and cmd/lanyard).
type Agent struct {
	log          hclog.Logger
	svids        *SVIDManager
	upstream     Upstream
	upstreamName string
	attestors    atomic.Pointer[attestor.MultiAttestor]
	metrics      *telemetry.Metrics // nil without a telemetry block

	reloadMu sync.Mutex
	cfg      *conf.Config
}

// New builds the agent from a parsed config, as Check does, then opens its
// data directory: it creates it, removes what interrupted writes left and
// loads the saved cache.
func New(cfg *conf.Config, log hclog.Logger) (*Agent, error) {
	a, err := build(cfg, log)
	if err != nil {
		return nil, err
	}
	if err := a.openDataDir(); err != nil {
		return nil, err
	}
	return a, nil
}

// Check builds every part of the agent from cfg, so that a bad plugin_data
// fails with its file and line, without touching the data directory or the
// network: `lanyard validate` runs it.
func Check(cfg *conf.Config, log hclog.Logger) error {
	_, err := build(cfg, log)
	return err
}

func build(cfg *conf.Config, log hclog.Logger) (*Agent, error) {
	var metrics *telemetry.Metrics
	if cfg.Telemetry.PrometheusEnabled {
		metrics = telemetry.New()
	}
	set, err := buildAttestors(cfg, log)
	if err != nil {
		return nil, err
	}
	set.Observe(metrics)
	name, up, err := buildUpstream(cfg, log, metrics)
	if err != nil {
		return nil, err
	}
	a := &Agent{log: log, upstream: up, upstreamName: name, cfg: cfg, metrics: metrics}
	a.svids = NewSVIDManager(log.Named("cache"), up)
	a.svids.observe(metrics)
	a.attestors.Store(set)
	metrics.Register(a.newCollectors()...)
	return a, nil
}

// Metrics returns what the agent records into and the metrics endpoint
// serves; nil when the config has no telemetry block. The Workload API
// and the admin socket record into it too (their Config.Metrics).
func (a *Agent) Metrics() *telemetry.Metrics { return a.metrics }

func (a *Agent) openDataDir() error {
	dir := a.cfg.Agent.DataDir
	if err := EnsureDataDir(dir); err != nil {
		return err
	}
	// Writes cut short by a crash leave temporary files, with private
	// keys in them, that nothing else would ever remove.
	removed, err := RemoveStaleTempFiles(dir)
	if len(removed) > 0 {
		a.log.Warn("Removed temporary files that interrupted writes left in the data directory", "data_dir", dir, "count", len(removed))
	}
	if err != nil {
		return err
	}
	a.svids.PersistTo(dir, a.cfg.Agent.TrustDomain)
	return nil
}

// BuildUpstream builds the upstream cfg names, as New does; for the
// upstreams' tests.
func BuildUpstream(cfg *conf.Config, log hclog.Logger) (Upstream, error) {
	_, up, err := buildUpstream(cfg, log, nil)
	return up, err
}

func buildUpstream(cfg *conf.Config, log hclog.Logger, metrics *telemetry.Metrics) (string, Upstream, error) {
	name, plugin, err := upstreamPlugin(cfg)
	if err != nil {
		return "", nil, err
	}
	var server *ServerConfig
	if name == ServerUpstream {
		if server, err = serverConfig(cfg, log.Named("upstream."+name)); err != nil {
			return "", nil, err
		}
	} else {
		// Node attestation and key management are for a SPIRE Server:
		// silently ignoring them would hide a config mistake.
		for _, p := range cfg.Plugins {
			if p.Enabled && (p.Type == typeNodeAttestor || p.Type == typeKeyManager) {
				return "", nil, p.Errorf("%s is only used with a SPIRE Server upstream; set agent.server_address, or remove this block to use the %s upstream", p.Type, name)
			}
		}
	}
	factory, ok := upstreams.Lookup(name)
	if !ok {
		msg := fmt.Sprintf("unknown upstream %q (compiled in: %s)", name, strings.Join(upstreams.Names(), ", "))
		if plugin != nil {
			return "", nil, plugin.Errorf("%s", msg)
		}
		return "", nil, errors.New(msg)
	}
	up, err := factory(UpstreamConfig{
		Name:        name,
		Data:        pluginData(plugin),
		Log:         log.Named("upstream." + name),
		TrustDomain: cfg.Agent.TrustDomain,
		DataDir:     cfg.Agent.DataDir,
		Server:      server,
		Metrics:     metrics,
	})
	if err != nil {
		return "", nil, err
	}
	return name, up, nil
}

// pluginData is p's plugin_data, or an empty one for no plugin block.
func pluginData(p *conf.Plugin) *conf.Section {
	if p != nil {
		return p.Data
	}
	return emptySection()
}

func emptySection() *conf.Section {
	s, err := conf.NewSection("", "")
	if err != nil {
		panic(err) // an empty body always parses
	}
	return s
}

// upstreamPlugin picks the upstream: the configured UpstreamAuthority, the
// SPIRE Server when server_address is set, or else the embedded CA.
func upstreamPlugin(cfg *conf.Config) (string, *conf.Plugin, error) {
	found, err := onePlugin(cfg, typeUpstreamAuthority, "the agent has one upstream CA")
	if err != nil {
		return "", nil, err
	}
	switch {
	case found != nil && cfg.Agent.ServerAddress != "" && found.Name != ServerUpstream:
		return "", nil, found.Errorf("server_address is set, so the upstream is the SPIRE Server: remove UpstreamAuthority %q or server_address", found.Name)
	case found != nil:
		return found.Name, found, nil
	case cfg.Agent.ServerAddress != "":
		return ServerUpstream, nil, nil
	default:
		return EmbeddedUpstream, nil, nil
	}
}

func buildAttestors(cfg *conf.Config, log hclog.Logger) (*attestor.MultiAttestor, error) {
	var named []attestor.Plugin
	for _, p := range cfg.Plugins {
		if p.Type != typeWorkloadAttestor || !p.Enabled {
			continue
		}
		reg, ok := attestor.Lookup(p.Name)
		if !ok {
			return nil, p.Errorf("unknown workload attestor %q (compiled in: %s)", p.Name, strings.Join(attestor.Registered(), ", "))
		}
		wa, err := reg.New(attestor.PluginConfig{
			Name:        p.Name,
			Data:        p.Data,
			Log:         log.Named("attestor." + p.Name),
			TrustDomain: cfg.Agent.TrustDomain,
			DataDir:     cfg.Agent.DataDir,
		})
		if err != nil {
			return nil, err
		}
		named = append(named, attestor.Plugin{Name: p.Name, Attestor: wa, InProcess: reg.InProcess})
	}
	if len(named) == 0 {
		return nil, fmt.Errorf("%s: no WorkloadAttestor is configured: add one to the plugins block, e.g. WorkloadAttestor \"unix\" { plugin_data {} }", cfg.File)
	}
	return attestor.NewMultiAttestor(log.Named("attestor"), cfg.Agent.WorkloadAttestorTimeout, named...), nil
}

// SVIDManager returns the agent's SVID manager, which the Workload API reads.
func (a *Agent) SVIDManager() *SVIDManager { return a.svids }

// SelfIdentity returns the agent's own identity, or nil when its upstream
// gives it none.
func (a *Agent) SelfIdentity() SelfIdentity {
	id, _ := a.upstream.(SelfIdentity)
	return id
}

// brokerText is the broker block as text, which == can compare.
func brokerText(b *conf.Broker) string {
	if b == nil {
		return ""
	}
	return fmt.Sprintf("%+v", *b)
}

// UpstreamInUse names the upstream and, for one that talks to a server,
// the server's address.
func (a *Agent) UpstreamInUse() (name, server string) {
	if c, ok := a.upstream.(ServerConnection); ok {
		server = c.ServerAddress()
	}
	return a.upstreamName, server
}

// WorkloadAttestor returns the workload attestor configured now under
// name, or nil; a reload may replace it, so callers ask each time.
func (a *Agent) WorkloadAttestor(name string) attestor.WorkloadAttestor {
	return a.attestors.Load().Plugin(name)
}

// Attest runs the configured workload attestors.
func (a *Agent) Attest(ctx context.Context, p attestor.Process) ([]selector.Selector, error) {
	return a.attestors.Load().Attest(ctx, p)
}

// Reload applies a new config (on SIGHUP): workload attestors and the
// upstream's plugin_data. Settings that need a restart must be unchanged.
// On any error nothing changes and the old config stays in force.
func (a *Agent) Reload(cfg *conf.Config) error {
	a.reloadMu.Lock()
	defer a.reloadMu.Unlock()
	old := a.cfg.Agent
	if cfg.Agent.TrustDomain != old.TrustDomain {
		return fmt.Errorf("%s: trust_domain changed from %s to %s: that needs a restart", cfg.File, old.TrustDomain, cfg.Agent.TrustDomain)
	}
	for _, k := range []struct {
		key     string
		was, is any
	}{
		{"socket_path", old.SocketPath, cfg.Agent.SocketPath},
		{"data_dir", old.DataDir, cfg.Agent.DataDir},
		{"trust_bundle_path", old.TrustBundlePath, cfg.Agent.TrustBundlePath},
		{"trust_bundle_format", old.TrustBundleFormat, cfg.Agent.TrustBundleFormat},
		{"insecure_bootstrap", old.InsecureBootstrap, cfg.Agent.InsecureBootstrap},
		{"join_token", old.JoinToken, cfg.Agent.JoinToken},
		{"sds", old.SDS, cfg.Agent.SDS},
		{"profiling_port (or profiling_enabled)", old.ProfilingPort, cfg.Agent.ProfilingPort},
		{"admin_socket_path", old.AdminSocketPath, cfg.Agent.AdminSocketPath},
		// A list, which == cannot compare: its text can.
		{"authorized_delegates", fmt.Sprint(old.AuthorizedDelegates), fmt.Sprint(cfg.Agent.AuthorizedDelegates)},
		{"experimental.broker", brokerText(old.Broker), brokerText(cfg.Agent.Broker)},
		{"NodeAttestor and KeyManager plugins", restartPlugins(a.cfg), restartPlugins(cfg)},
	} {
		if k.was != k.is {
			return cfg.Agent.Errorf(strings.Fields(k.key)[0], "%s changed: that needs a restart; nothing was reloaded", k.key)
		}
	}
	set, err := buildAttestors(cfg, a.log)
	if err != nil {
		return err
	}
	set.Observe(a.metrics)
	name, plugin, err := upstreamPlugin(cfg)
	if err != nil {
		return err
	}
	if name != a.upstreamName {
		return fmt.Errorf("%s: the upstream changed from %s to %s: that needs a restart", cfg.File, a.upstreamName, name)
	}
	if err := a.upstream.Reconfigure(pluginData(plugin)); err != nil {
		return err
	}
	// server_address, server_port and sync_interval: the SPIRE Server
	// upstream reconnects or re-times its syncs.
	if server, ok := a.upstream.(ServerReloader); ok {
		server.ReloadServer(serverSettings(&cfg.Agent))
	}
	a.attestors.Store(set)
	a.cfg = cfg
	return nil
}
