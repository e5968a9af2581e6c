package spire

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/conf"
	"github.com/lanyard-dev/lanyard/internal/testkit"
	_ "github.com/lanyard-dev/lanyard/plugins/workloadattestor/unix"
)

// SIGHUP takes a new server address, port and sync_interval; what is read
// only at start is refused by name, and nothing changes then.
func TestReloadServerSettings(t *testing.T) {
	dir := t.TempDir()
	bundle := writeBundle(t, dir, testkit.NewTrustDomainCA(t, td).Cert)
	body := func(addr, port, interval, token string) *conf.Config {
		cfg, err := conf.Parse("agent.conf", []byte(fmt.Sprintf(`agent {
  trust_domain = "example.org"
  data_dir = %q
  socket_path = %q
  server_address = %q
  server_port = %s
  sync_interval = %q
  trust_bundle_path = %q
  join_token = %q
}
plugins {
  NodeAttestor "join_token" { plugin_data {} }
  KeyManager "memory" { plugin_data {} }
  WorkloadAttestor "unix" { plugin_data {} }
}`, dir+"/data", dir+"/api.sock", addr, port, interval, bundle, token)))
		if err != nil {
			t.Fatal(err)
		}
		return cfg
	}
	a, err := agent.New(body("spire-server.example", "8081", "5s", "abc"), hclog.NewNullLogger())
	if err != nil {
		t.Fatal(err)
	}
	s := a.SelfIdentity().(*Spire)
	conn, _, err := s.client.acquire() // a connection in use, never dialed
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Reload(body("spire-ha.example", "9081", "2s", "abc")); err != nil {
		t.Fatalf("reload with a new server_address, server_port and sync_interval: %v", err)
	}
	if s.client.address() != "spire-ha.example:9081" || s.syncer.interval() != 2*time.Second {
		t.Fatalf("after the reload: address %s, sync_interval %s", s.client.address(), s.syncer.interval())
	}
	if !conn.retired {
		t.Fatal("the connection to the old address was not retired")
	}
	s.client.release(conn)
	// A join token is read only to attest at start.
	err = a.Reload(body("spire-other.example", "9081", "3s", "def"))
	if err == nil || !strings.Contains(err.Error(), "join_token changed: that needs a restart") {
		t.Errorf("reload with a new join_token: %v", err)
	}
	if s.client.address() != "spire-ha.example:9081" || s.syncer.interval() != 2*time.Second {
		t.Fatalf("a refused reload changed the settings: address %s, sync_interval %s", s.client.address(), s.syncer.interval())
	}
}
