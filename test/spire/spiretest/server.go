package spiretest

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testkit"
)

// Server is a running spire-server. Fields are fixed for its lifetime,
// including across Stop and Start.
type Server struct {
	Dir         string // data dir (config, datastore, keys, log)
	BinDir      string // holds spire-server and spire-agent
	TrustDomain string // e.g. "example.org"
	Addr        string // 127.0.0.1:port of the agent-facing API
	SocketPath  string // admin API Unix socket
	ConfigPath  string
	LogPath     string // stdout and stderr of every run, appended

	t    testing.TB
	mu   sync.Mutex
	proc *process
}

type serverConfig struct {
	trustDomain         string
	caTTL               time.Duration
	x509SVIDTTL         time.Duration
	jwtSVIDTTL          time.Duration
	cacheReloadInterval time.Duration
	logLevel            string
	nodeAttestors       []string // extra NodeAttestor blocks
}

// ServerOption configures StartServer.
type ServerOption func(*serverConfig)

// WithTrustDomain sets the trust domain (default "example.org").
func WithTrustDomain(td string) ServerOption {
	return func(c *serverConfig) { c.trustDomain = td }
}

// WithCATTL sets ca_ttl (SPIRE's default is 24h).
func WithCATTL(d time.Duration) ServerOption {
	return func(c *serverConfig) { c.caTTL = d }
}

// WithX509SVIDTTL sets default_x509_svid_ttl (SPIRE's default is 1h).
func WithX509SVIDTTL(d time.Duration) ServerOption {
	return func(c *serverConfig) { c.x509SVIDTTL = d }
}

// WithJWTSVIDTTL sets default_jwt_svid_ttl (SPIRE's default is 5m).
func WithJWTSVIDTTL(d time.Duration) ServerOption {
	return func(c *serverConfig) { c.jwtSVIDTTL = d }
}

// WithCacheReloadInterval sets experimental.cache_reload_interval, how often
// the server refreshes its entry cache (SPIRE's default is 5s).
func WithCacheReloadInterval(d time.Duration) ServerOption {
	return func(c *serverConfig) { c.cacheReloadInterval = d }
}

// WithServerLogLevel sets log_level (default "DEBUG").
func WithServerLogLevel(level string) ServerOption {
	return func(c *serverConfig) { c.logLevel = level }
}

// WithNodeAttestor adds NodeAttestor name with pluginData (HCL, the body of
// its plugin_data block) beside join_token.
func WithNodeAttestor(name, pluginData string) ServerOption {
	return func(c *serverConfig) {
		c.nodeAttestors = append(c.nodeAttestors, fmt.Sprintf("    NodeAttestor %q {\n        plugin_data {\n%s\n        }\n    }\n", name, pluginData))
	}
}

// StartServer starts spire-server on 127.0.0.1 with a free port, a sqlite
// datastore, the disk key manager and the join_token node attestor, in
// t.TempDir(). It returns once the server reports healthy and stops it in
// t.Cleanup.
func StartServer(t testing.TB, opts ...ServerOption) *Server {
	t.Helper()
	cfg := serverConfig{trustDomain: "example.org", logLevel: "DEBUG"}
	for _, o := range opts {
		o(&cfg)
	}
	binDir := Binaries(t)
	dir := t.TempDir()
	sockDir := testkit.ShortDir(t, "spt")
	port := freePort(t)

	s := &Server{
		Dir:         dir,
		BinDir:      binDir,
		TrustDomain: cfg.trustDomain,
		Addr:        net.JoinHostPort("127.0.0.1", strconv.Itoa(port)),
		SocketPath:  filepath.Join(sockDir, "server.sock"),
		ConfigPath:  filepath.Join(dir, "server.conf"),
		LogPath:     filepath.Join(dir, "server.log"),
		t:           t,
	}

	var extra strings.Builder
	for _, kv := range []struct {
		key string
		d   time.Duration
	}{
		{"ca_ttl", cfg.caTTL},
		{"default_x509_svid_ttl", cfg.x509SVIDTTL},
		{"default_jwt_svid_ttl", cfg.jwtSVIDTTL},
	} {
		if kv.d > 0 {
			fmt.Fprintf(&extra, "    %s = %q\n", kv.key, kv.d.String())
		}
	}
	if cfg.cacheReloadInterval > 0 {
		fmt.Fprintf(&extra, "    experimental {\n        cache_reload_interval = %q\n    }\n", cfg.cacheReloadInterval.String())
	}
	conf := fmt.Sprintf(`server {
    bind_address = "127.0.0.1"
    bind_port = %d
    socket_path = %q
    trust_domain = %q
    data_dir = %q
    log_level = %q
%s}

plugins {
    DataStore "sql" {
        plugin_data {
            database_type = "sqlite3"
            connection_string = %q
        }
    }
    KeyManager "disk" {
        plugin_data {
            keys_path = %q
        }
    }
    NodeAttestor "join_token" {
        plugin_data {}
    }
%s}
`, port, s.SocketPath, s.TrustDomain, filepath.Join(dir, "data"), cfg.logLevel, extra.String(),
		filepath.Join(dir, "data", "datastore.sqlite3"), filepath.Join(dir, "data", "keys.json"), strings.Join(cfg.nodeAttestors, ""))
	if err := os.WriteFile(s.ConfigPath, []byte(conf), 0o600); err != nil {
		t.Fatalf("writing spire-server config: %v", err)
	}

	t.Cleanup(func() {
		s.mu.Lock()
		p := s.proc
		s.proc = nil
		s.mu.Unlock()
		if p != nil {
			if err := p.kill(); err != nil {
				t.Errorf("stopping spire-server: %v", err)
			}
		}
		if t.Failed() {
			logTail(t, "spire-server", s.LogPath)
		}
	})
	s.Start()
	return s
}

// Start starts the server process again after Stop, with the same config,
// data dir, port and socket, and waits until it is healthy. Call it from
// the test goroutine.
func (s *Server) Start() {
	s.t.Helper()
	s.mu.Lock()
	if s.proc != nil {
		s.mu.Unlock()
		s.t.Fatalf("spire-server is already running")
	}
	p, err := startProcess(filepath.Join(s.BinDir, "spire-server"), s.LogPath, "run", "-config", s.ConfigPath)
	if err != nil {
		s.mu.Unlock()
		s.t.Fatalf("starting spire-server: %v", err)
	}
	s.proc = p
	s.mu.Unlock()

	err = waitHealthy(p, func(ctx context.Context) error {
		_, err := s.run(ctx, "healthcheck")
		return err
	})
	if err != nil {
		s.t.Fatalf("spire-server did not become healthy: %v\n%s", err, readTail(s.LogPath))
	}
}

// Stop kills the server process (SIGKILL, like a crash) and waits for it to
// exit. Its data stays, so Start brings the same server back.
func (s *Server) Stop() {
	s.t.Helper()
	s.mu.Lock()
	p := s.proc
	s.proc = nil
	s.mu.Unlock()
	if p == nil {
		s.t.Fatalf("spire-server is not running")
	}
	if err := p.kill(); err != nil {
		s.t.Fatalf("stopping spire-server: %v", err)
	}
}

// CLI runs `spire-server <args> -socketPath s.SocketPath` and returns its
// stdout, failing the test with the output on error.
func (s *Server) CLI(t testing.TB, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), cliTimeout)
	defer cancel()
	out, err := s.run(ctx, args...)
	if err != nil {
		t.Fatalf("spire-server %s: %v", strings.Join(args, " "), err)
	}
	return out
}

func (s *Server) run(ctx context.Context, args ...string) (string, error) {
	args = append(append([]string(nil), args...), "-socketPath", s.SocketPath)
	return runCLI(ctx, filepath.Join(s.BinDir, "spire-server"), args...)
}
