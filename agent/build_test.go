package agent

import (
	"context"
	"crypto/x509"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/attestor"
	"github.com/lanyard-dev/lanyard/attestor/selector"
	"github.com/lanyard-dev/lanyard/conf"
	"github.com/lanyard-dev/lanyard/internal/testkit"
)

// The plugins these tests build: fakes registered under the names the
// agent picks, which record what they were built from.
var (
	registerBuildFakes sync.Once
	builtMu            sync.Mutex
	builtUpstream      UpstreamConfig
	builtNodeAttestor  NodeAttestorConfig
)

type builtFake struct{ Upstream } // only built and reconfigured, never run

func (builtFake) Reconfigure(*conf.Section) error { return nil }

type fakeNodeAttestor struct{}

func (fakeNodeAttestor) Attest(context.Context, AttestationStream) error { return nil }

type fakeWorkloadAttestor struct{}

func (fakeWorkloadAttestor) Attest(context.Context, attestor.Process) ([]selector.Selector, error) {
	return nil, nil
}

func registerFakes() {
	registerBuildFakes.Do(func() {
		for _, name := range []string{ServerUpstream, EmbeddedUpstream} {
			RegisterUpstream(name, func(cfg UpstreamConfig) (Upstream, error) {
				builtMu.Lock()
				defer builtMu.Unlock()
				builtUpstream = cfg
				return builtFake{}, nil
			})
		}
		for _, name := range []string{joinTokenAttestor, "fake_node"} {
			RegisterNodeAttestor(name, func(cfg NodeAttestorConfig) (NodeAttestor, error) {
				builtMu.Lock()
				defer builtMu.Unlock()
				builtNodeAttestor = cfg
				return fakeNodeAttestor{}, nil
			})
		}
		attestor.Register("build_test", func(attestor.PluginConfig) (attestor.WorkloadAttestor, error) {
			return fakeWorkloadAttestor{}, nil
		})
	})
}

func parseConfig(t *testing.T, body string) *conf.Config {
	t.Helper()
	registerFakes()
	cfg, err := conf.Parse("agent.conf", []byte(body))
	if err != nil {
		t.Fatalf("the config does not parse: %v", err)
	}
	return cfg
}

func writeCertPEM(t *testing.T, path string) *x509.Certificate {
	t.Helper()
	ca := testkit.NewCA(t, "")
	testkit.WritePEM(t, path, "CERTIFICATE", ca.Cert.Raw)
	return ca.Cert
}

// The SPIRE Server upstream gets typed settings and the node attestor the
// agent built, the join token going to the attestor alone.
func TestServerConfig(t *testing.T) {
	dir := t.TempDir()
	ca := writeCertPEM(t, filepath.Join(dir, "bundle.pem"))
	cfg := parseConfig(t, fmt.Sprintf(`agent {
  trust_domain = "example.org"
  data_dir = %[1]q
  server_address = "spire.example"
  server_port = 9000
  trust_bundle_path = "%[1]s/bundle.pem"
  join_token = "secret"
  sync_interval = "7s"
}
plugins {
  WorkloadAttestor "build_test" { plugin_data {} }
  NodeAttestor "fake_node" { plugin_data {} }
  KeyManager "disk" { plugin_data { directory = "%[1]s/keys" } }
}`, dir))
	if err := Check(cfg, hclog.NewNullLogger()); err != nil {
		t.Fatal(err)
	}
	builtMu.Lock()
	up, na := builtUpstream, builtNodeAttestor
	builtMu.Unlock()
	s := up.Server
	if up.Name != ServerUpstream || s == nil {
		t.Fatalf("built upstream %q with server settings %v", up.Name, s)
	}
	if s.Address != "spire.example:9000" || s.SyncInterval != 7*time.Second || s.InsecureBootstrap || s.KeyDir != filepath.Join(dir, "keys") {
		t.Fatalf("server settings %+v", s)
	}
	if len(s.Bootstrap) != 1 || !s.Bootstrap[0].Equal(ca) {
		t.Fatal("the bootstrap bundle was not loaded")
	}
	// A join token selects join_token over the configured attestor, as in spire-agent.
	if s.NodeAttestorName != joinTokenAttestor || s.NodeAttestor == nil || na.Name != joinTokenAttestor || na.JoinToken != "secret" {
		t.Fatalf("node attestor %q built from %+v", s.NodeAttestorName, na)
	}
}

// Check builds every part without touching data_dir; New opens it.
func TestCheckTouchesNoState(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	cfg := parseConfig(t, fmt.Sprintf(`agent {
  trust_domain = "example.org"
  data_dir = %q
}
plugins {
  WorkloadAttestor "build_test" { plugin_data {} }
}`, dir))
	if err := Check(cfg, hclog.NewNullLogger()); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("Check touched data_dir: %v", err)
	}
	builtMu.Lock()
	up := builtUpstream
	builtMu.Unlock()
	if up.Name != EmbeddedUpstream || up.Server != nil {
		t.Fatalf("built %q with server settings %v; want local without", up.Name, up.Server)
	}
	if _, err := New(cfg, hclog.NewNullLogger()); err != nil {
		t.Fatal(err)
	}
	if info, err := os.Stat(dir); err != nil || !info.IsDir() {
		t.Fatalf("New did not create data_dir: %v", err)
	}
}

func TestUnknownPluginsNameTheRegistered(t *testing.T) {
	const server = `server_address = "spire.example"
  insecure_bootstrap = true`
	for _, tc := range []struct{ agent, plugin, want string }{
		{"", `UpstreamAuthority "nope" { plugin_data {} }`, `unknown upstream "nope" (compiled in: `},
		{server, `NodeAttestor "nope" { plugin_data {} }`, `NodeAttestor "nope" is not supported by Lanyard (compiled in: `},
		{"", `WorkloadAttestor "nope" { plugin_data {} }`, `unknown workload attestor "nope" (compiled in: `},
	} {
		cfg := parseConfig(t, fmt.Sprintf(`agent {
  trust_domain = "example.org"
  %s
}
plugins {
  WorkloadAttestor "build_test" { plugin_data {} }
  %s
}`, tc.agent, tc.plugin))
		err := Check(cfg, hclog.NewNullLogger())
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err = %v, want it to contain %q", tc.plugin, err, tc.want)
		}
	}
}

// The admin socket and the broker endpoint are bound once, at start:
// SIGHUP refuses a change to them or to whom they serve by name rather
// than ignoring it.
func TestReloadRefusesAdminChanges(t *testing.T) {
	dir := t.TempDir()
	const brokerA = `"spiffe://example.org/broker-a"`
	body := func(admin, delegates, broker string) string {
		return fmt.Sprintf(`agent {
  trust_domain = "example.org"
  data_dir = %q
  socket_path = %q
  admin_socket_path = %q
  authorized_delegates = [%s]
  experimental {
    broker {
      socket_path = %q
      brokers = [ { id = %s, allowed_reference_types = [ { type_url = "type.googleapis.com/spiffe.broker.WorkloadPIDReference" } ] } ]
    }
  }
}
plugins {
  WorkloadAttestor "build_test" { plugin_data {} }
}`, filepath.Join(dir, "data"), filepath.Join(dir, "public", "api.sock"), admin, delegates, filepath.Join(dir, "broker", "broker.sock"), broker)
	}
	adminPath := filepath.Join(dir, "private", "admin.sock")
	const cilium = `"spiffe://example.org/cilium"`
	a, err := New(parseConfig(t, body(adminPath, cilium, brokerA)), hclog.NewNullLogger())
	if err != nil {
		t.Fatal(err)
	}
	for key, changed := range map[string]string{
		"admin_socket_path":    body(adminPath+"2", cilium, brokerA),
		"authorized_delegates": body(adminPath, cilium+`, "spiffe://example.org/ztunnel"`, brokerA),
		"experimental.broker":  body(adminPath, cilium, `"spiffe://example.org/broker-b"`),
	} {
		err := a.Reload(parseConfig(t, changed))
		if err == nil || !strings.Contains(err.Error(), key+" changed: that needs a restart") {
			t.Errorf("reload with a new %s: %v", key, err)
		}
	}
	if err := a.Reload(parseConfig(t, body(adminPath, cilium, brokerA))); err != nil {
		t.Errorf("reload with the same admin and broker settings: %v", err)
	}
}
