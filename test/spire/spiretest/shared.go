package spiretest

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testkit"
)

// SharedServer configures one of several spire-servers behind one name:
// they share a PostgreSQL datastore and sign under one upstream root, each
// with its own keys.
type SharedServer struct {
	BindIP string // e.g. 127.0.0.2; every server has its own
	Port   int    // the same for every server
	// Postgres is DataStore "sql"'s connection_string (database_type
	// "postgres").
	Postgres string
	// UpstreamCert and UpstreamKey are UpstreamAuthority "disk"'s root
	// (PEM files), which every server's CA chains to.
	UpstreamCert, UpstreamKey string
	AgentTTL                  time.Duration // agent_ttl (SPIRE's default is 1h)
}

// StartSharedServer starts spire-server as cfg says, with the join_token
// node attestor and its own disk key manager, in t.TempDir(). It returns
// once the server reports healthy and stops it in t.Cleanup. Start the
// servers of one datastore one at a time: the first creates its schema.
func StartSharedServer(t testing.TB, cfg SharedServer) *Server {
	t.Helper()
	dir := t.TempDir()
	s := &Server{
		Dir:         dir,
		BinDir:      Binaries(t),
		TrustDomain: "example.org",
		Addr:        net.JoinHostPort(cfg.BindIP, strconv.Itoa(cfg.Port)),
		SocketPath:  filepath.Join(testkit.ShortDir(t, "spt"), "server.sock"),
		ConfigPath:  filepath.Join(dir, "server.conf"),
		LogPath:     filepath.Join(dir, "server.log"),
		t:           t,
	}
	agentTTL := ""
	if cfg.AgentTTL > 0 {
		agentTTL = fmt.Sprintf("    agent_ttl = %q\n", cfg.AgentTTL.String())
	}
	conf := fmt.Sprintf(`server {
    bind_address = %q
    bind_port = %d
    socket_path = %q
    trust_domain = %q
    data_dir = %q
    log_level = "DEBUG"
%s}

plugins {
    DataStore "sql" {
        plugin_data {
            database_type = "postgres"
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
    UpstreamAuthority "disk" {
        plugin_data {
            cert_file_path = %q
            key_file_path = %q
        }
    }
}
`, cfg.BindIP, cfg.Port, s.SocketPath, s.TrustDomain, filepath.Join(dir, "data"), agentTTL,
		cfg.Postgres, filepath.Join(dir, "data", "keys.json"), cfg.UpstreamCert, cfg.UpstreamKey)
	if err := os.WriteFile(s.ConfigPath, []byte(conf), 0o600); err != nil {
		t.Fatalf("writing spire-server config: %v", err)
	}
	t.Cleanup(func() {
		if s.Running() {
			s.Stop()
		}
		if t.Failed() {
			logTail(t, "spire-server "+cfg.BindIP, s.LogPath)
		}
	})
	s.Start()
	return s
}

// Running reports whether the server process runs (between Start and
// Stop).
func (s *Server) Running() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.proc != nil
}
