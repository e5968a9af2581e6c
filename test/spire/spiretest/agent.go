package spiretest

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testkit"
)

// AgentPlugins is the plugins block of the agent.conf StartAgent writes:
// join_token attestation, keys in memory, the unix workload attestor.
// Lanyard runs it unchanged.
const AgentPlugins = `plugins {
    NodeAttestor "join_token" {
        plugin_data {}
    }
    KeyManager "memory" {
        plugin_data {}
    }
    WorkloadAttestor "unix" {
        plugin_data {}
    }
}
`

type agentConfig struct {
	syncInterval time.Duration
	logLevel     string
	plugins      string
	keys         string
}

// AgentOption configures StartAgent.
type AgentOption func(*agentConfig)

// WithAgentPlugins replaces AgentPlugins, the plugins block of the agent's
// config.
func WithAgentPlugins(plugins string) AgentOption {
	return func(c *agentConfig) { c.plugins = plugins }
}

// WithSyncInterval sets experimental.sync_interval, how often the agent
// pulls entries and SVIDs from the server (SPIRE's default is 5s).
func WithSyncInterval(d time.Duration) AgentOption {
	return func(c *agentConfig) { c.syncInterval = d }
}

// WithAgentKeys adds keys (HCL lines) to the agent block, such as
// admin_socket_path.
func WithAgentKeys(keys string) AgentOption {
	return func(c *agentConfig) { c.keys += keys }
}

// WithAgentLogLevel sets log_level (default "DEBUG").
func WithAgentLogLevel(level string) AgentOption {
	return func(c *agentConfig) { c.logLevel = level }
}

// StartAgent runs a real spire-agent against the server, attesting with
// joinToken, with the unix workload attestor and an in-memory key manager.
// It returns the Workload API socket path once the agent is healthy, and
// stops the agent in t.Cleanup.
func (s *Server) StartAgent(t testing.TB, joinToken string, opts ...AgentOption) (socketPath string) {
	t.Helper()
	cfg := agentConfig{logLevel: "DEBUG", plugins: AgentPlugins}
	for _, o := range opts {
		o(&cfg)
	}
	dir := t.TempDir()
	socketPath = filepath.Join(testkit.ShortDir(t, "spt"), "agent.sock")
	bundlePath := filepath.Join(dir, "bundle.pem")
	if err := os.WriteFile(bundlePath, s.BundlePEM(t), 0o600); err != nil {
		t.Fatalf("writing spire-agent trust bundle: %v", err)
	}
	host, port, err := net.SplitHostPort(s.Addr)
	if err != nil {
		t.Fatalf("splitting server address %q: %v", s.Addr, err)
	}
	extra := cfg.keys
	if cfg.syncInterval > 0 {
		extra += fmt.Sprintf("    experimental {\n        sync_interval = %q\n    }\n", cfg.syncInterval.String())
	}
	conf := fmt.Sprintf(`agent {
    data_dir = %q
    log_level = %q
    server_address = %q
    server_port = %s
    socket_path = %q
    trust_bundle_path = %q
    trust_domain = %q
%s}

%s`, filepath.Join(dir, "data"), cfg.logLevel, host, port, socketPath, bundlePath, s.TrustDomain, extra, cfg.plugins)
	confPath := filepath.Join(dir, "agent.conf")
	if err := os.WriteFile(confPath, []byte(conf), 0o600); err != nil {
		t.Fatalf("writing spire-agent config: %v", err)
	}
	logPath := filepath.Join(dir, "agent.log")
	bin := filepath.Join(s.BinDir, "spire-agent")
	p, err := startProcess(bin, logPath, "run", "-config", confPath, "-joinToken", joinToken)
	if err != nil {
		t.Fatalf("starting spire-agent: %v", err)
	}
	t.Cleanup(func() {
		if err := p.kill(); err != nil {
			t.Errorf("stopping spire-agent: %v", err)
		}
		if t.Failed() {
			logTail(t, "spire-agent", logPath)
		}
	})
	// The agent serves its socket (with gRPC health) only after attesting.
	err = waitHealthy(p, func(ctx context.Context) error {
		_, err := runCLI(ctx, bin, "healthcheck", "-socketPath", socketPath)
		return err
	})
	if err != nil {
		t.Fatalf("spire-agent did not become healthy: %v\n%s", err, readTail(logPath))
	}
	return socketPath
}
