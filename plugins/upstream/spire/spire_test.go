package spire

import (
	"crypto/ecdsa"
	"crypto/x509"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/conf"
	"github.com/lanyard-dev/lanyard/internal/testkit"
	_ "github.com/lanyard-dev/lanyard/plugins/nodeattestor/join_token"
	_ "github.com/lanyard-dev/lanyard/plugins/nodeattestor/x509pop"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

var td = spiffeid.RequireTrustDomainFromString("example.org")

// agentID is the SPIFFE ID of the agent SVIDs the tests make.
var agentID = spiffeid.RequireFromPath(td, "/spire/agent/join_token/secret-token")

// newSVID signs an agent SVID for key, backdated 10s as the server does.
func newSVID(t *testing.T, ca *testkit.CA, key *ecdsa.PrivateKey, ttl time.Duration) *x509.Certificate {
	t.Helper()
	now := time.Now()
	c, err := ca.SignSVID(key.Public(), agentID.String(), now.Add(-10*time.Second), now.Add(ttl))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// newCreds is a new key and an agent SVID for it, valid for an hour.
func newCreds(t *testing.T, ca *testkit.CA) *credentials {
	t.Helper()
	key := testkit.NewKey(t)
	return &credentials{svid: []*x509.Certificate{newSVID(t, ca, key, time.Hour)}, key: key}
}

func writeBundle(t *testing.T, dir string, certs ...*x509.Certificate) string {
	t.Helper()
	var out []byte
	for _, c := range certs {
		out = append(out, testkit.PEM("CERTIFICATE", c.Raw)...)
	}
	path := filepath.Join(dir, "bundle.pem")
	if err := os.WriteFile(path, out, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// build parses an agent.conf and builds the upstream from it, as the agent does.
func build(t *testing.T, body string) (*Spire, error) {
	t.Helper()
	cfg, err := conf.Parse("agent.conf", []byte(body))
	if err != nil {
		t.Fatalf("the config does not parse: %v", err)
	}
	up, err := agent.BuildUpstream(cfg, hclog.NewNullLogger())
	if err != nil {
		return nil, err
	}
	return up.(*Spire), nil
}

// spireConf is an agent.conf as SPIRE's docs write it.
const spireConf = `
agent {
    data_dir = "%[1]s/data"
    log_level = "DEBUG"
    server_address = "spire-server.example"
    server_port = "8081"
    socket_path = "%[1]s/api.sock"
    trust_bundle_path = "%[2]s"
    trust_domain = "example.org"
    join_token = "abc"
}

plugins {
    NodeAttestor "join_token" {
        plugin_data {}
    }
    KeyManager "disk" {
        plugin_data {
            directory = "%[1]s/keys"
        }
    }
    WorkloadAttestor "unix" {
        plugin_data {}
    }
}
`

func TestSPIREAgentConfigLoads(t *testing.T) {
	dir := t.TempDir()
	ca := testkit.NewTrustDomainCA(t, td).Cert
	s, err := build(t, fmt.Sprintf(spireConf, dir, writeBundle(t, dir, ca)))
	if err != nil {
		t.Fatal(err)
	}
	if s.client.addr != "spire-server.example:8081" || s.identity.attestorName != "join_token" || s.syncer.interval() != 5*time.Second {
		t.Fatalf("addr %q attestor %q sync %s", s.client.addr, s.identity.attestorName, s.syncer.interval())
	}
	if s.identity.store.keyDir != filepath.Join(dir, "keys") || s.identity.store.statePath != filepath.Join(dir, "data", stateFileName) {
		t.Fatalf("key dir %q, state %q", s.identity.store.keyDir, s.identity.store.statePath)
	}
	if len(s.identity.bootstrap) != 1 || !s.identity.bootstrap[0].Equal(ca) {
		t.Fatal("the bootstrap bundle was not loaded")
	}
	if s.client.serverID.String() != "spiffe://example.org/spire/server" || s.syncer.serverID != s.client.serverID {
		t.Fatalf("server ID %s", s.client.serverID)
	}
}

func TestConfigErrors(t *testing.T) {
	dir := t.TempDir()
	ca := testkit.NewTrustDomainCA(t, td).Cert
	bundle := writeBundle(t, dir, ca)
	notPEM := filepath.Join(dir, "notpem")
	if err := os.WriteFile(notPEM, []byte("hello"), 0o600); err != nil {
		t.Fatal(err)
	}
	base := func(agentExtra, plugins string) string {
		return fmt.Sprintf(`agent {
  trust_domain = "example.org"
  data_dir = %q
  server_address = "127.0.0.1"
%s
}
plugins {
  WorkloadAttestor "unix" { plugin_data {} }
%s
}`, dir, agentExtra, plugins)
	}
	withBundle := fmt.Sprintf("trust_bundle_path = %q", bundle)
	joinToken := `NodeAttestor "join_token" { plugin_data {} }`
	for _, tc := range []struct {
		name, config, want string
	}{
		{"no bundle", base("", joinToken), "trust_bundle_path is not set"},
		{"missing bundle", base(fmt.Sprintf("trust_bundle_path = %q", filepath.Join(dir, "nope.pem")), joinToken), "nope.pem"},
		{"not PEM", base(fmt.Sprintf("trust_bundle_path = %q", notPEM), joinToken), "holds no PEM certificate"},
		{"not SPIFFE", base(fmt.Sprintf("trust_bundle_path = %q\ntrust_bundle_format = \"spiffe\"", bundle), joinToken), "is not a SPIFFE bundle"},
		{"no node attestor", base(withBundle, ""), "no NodeAttestor is configured"},
		{"unknown node attestor", base(withBundle, `NodeAttestor "aws_iid" { plugin_data {} }`), `NodeAttestor "aws_iid" is not supported by Lanyard`},
		{"two node attestors", base(withBundle, joinToken+"\n"+`NodeAttestor "x509pop" { plugin_data {} }`), "a second NodeAttestor"},
		{"unknown key manager", base(withBundle, joinToken+"\n"+`KeyManager "tpm" { plugin_data {} }`), `KeyManager "tpm" is not supported by Lanyard`},
		{"unknown disk key", base(withBundle, joinToken+"\n"+`KeyManager "disk" { plugin_data { keys_path = "/x" } }`), "keys_path"},
		{"memory takes no keys", base(withBundle, joinToken+"\n"+`KeyManager "memory" { plugin_data { directory = "/x" } }`), "directory"},
		{"disk directory is a file", base(withBundle, joinToken+"\n"+fmt.Sprintf(`KeyManager "disk" { plugin_data { directory = %q } }`, bundle)), "is not a directory"},
		{"join_token takes no keys", base(withBundle, `NodeAttestor "join_token" { plugin_data { token = "x" } }`), "token"},
		{"x509pop checks its files", base(withBundle, `NodeAttestor "x509pop" { plugin_data { private_key_path = "/nope.key" certificate_path = "/nope.pem" } }`), "nope"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := build(t, tc.config)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want it to contain %q", err, tc.want)
			}
		})
	}
}

func TestUpstreamAuthorityDataIsRefused(t *testing.T) {
	data, err := conf.NewSection("agent.conf", `server_address = "x"`)
	if err != nil {
		t.Fatal(err)
	}
	server := &agent.ServerConfig{ServerSettings: agent.ServerSettings{Address: "x:8081", SyncInterval: time.Second}, InsecureBootstrap: true, NodeAttestorName: "join_token"}
	_, err = New(agent.UpstreamConfig{Name: Name, Data: data, Server: server, Log: hclog.NewNullLogger(), TrustDomain: td, DataDir: t.TempDir()})
	if err == nil || !strings.Contains(err.Error(), "server_address") {
		t.Fatalf("err = %v, want plugin_data's key refused", err)
	}
}

func TestSPIFFEBundleAndInsecureBootstrap(t *testing.T) {
	dir := t.TempDir()
	ca := testkit.NewTrustDomainCA(t, td).Cert
	doc, err := spiffebundle.FromX509Authorities(td, []*x509.Certificate{ca}).Marshal()
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "bundle.json")
	if err := os.WriteFile(path, doc, 0o600); err != nil {
		t.Fatal(err)
	}
	s, err := build(t, fmt.Sprintf(`agent {
  trust_domain = "example.org"
  data_dir = %q
  server_address = "127.0.0.1"
  trust_bundle_path = %q
  trust_bundle_format = "spiffe"
}
plugins {
  NodeAttestor "join_token" { plugin_data {} }
  KeyManager "memory" { plugin_data {} }
  WorkloadAttestor "unix" { plugin_data {} }
}`, dir, path))
	if err != nil {
		t.Fatal(err)
	}
	if len(s.identity.bootstrap) != 1 || !s.identity.bootstrap[0].Equal(ca) || s.identity.store.persistsKeys() {
		t.Fatal("want the SPIFFE bundle loaded and keys kept in memory")
	}
	s, err = build(t, fmt.Sprintf(`agent {
  trust_domain = "example.org"
  data_dir = %q
  server_address = "127.0.0.1"
  server_port = 9000
  insecure_bootstrap = true
  join_token = "t"
}
plugins {
  NodeAttestor "x509pop" { plugin_data { private_key_path = "/nope" certificate_path = "/nope" } }
  WorkloadAttestor "unix" { plugin_data {} }
}`, dir))
	if err != nil {
		t.Fatal(err)
	}
	// A join token wins over the configured attestor, as in spire-agent;
	// with no KeyManager block the key is kept in data_dir.
	if s.identity.attestorName != "join_token" || !s.client.insecureBootstrap || s.client.addr != "127.0.0.1:9000" || s.identity.store.keyDir != dir {
		t.Fatalf("attestor %q insecure %v addr %q keydir %q", s.identity.attestorName, s.client.insecureBootstrap, s.client.addr, s.identity.store.keyDir)
	}
}
