package conf

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// writeConfig writes text to a file in a fresh temporary directory.
func writeConfig(t *testing.T, name, text string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

const spireAgentConf = `# A spire-agent agent.conf as SPIRE's docs write it.
agent {
    data_dir = "/run/spire"
    log_level = "DEBUG"
    log_format = "JSON"
    server_address = "spire-server"
    server_port = "8443"
    socket_path = "/run/spire/sockets/agent.sock"
    trust_bundle_path = "/run/spire/bundle/bundle.crt"
    trust_domain = "example.org"
    join_token = "8c4c0b3a-6ec0-4e1b-9d7c-4f0f1b8ad1c7"
    admin_socket_path = "/run/spire/private/admin.sock"
    authorized_delegates = ["spiffe://example.org/cilium"]
}

plugins {
    NodeAttestor "join_token" {
        plugin_data {
        }
    }
    KeyManager "disk" {
        plugin_data {
            directory = "/run/spire"
        }
    }
    WorkloadAttestor "unix" {
        plugin_data {
        }
    }
}

health_checks {
    listener_enabled = true
    bind_address = "0.0.0.0"
    bind_port = "8080"
    live_path = "/live"
    ready_path = "/ready"
}

telemetry {
    Prometheus {
        port = 9988
    }
}
`

func TestLoadSPIREAgentConf(t *testing.T) {
	path := writeConfig(t, "agent.conf", spireAgentConf)
	cfg, err := Load(path, false)
	if err != nil {
		t.Fatal(err)
	}
	a := cfg.Agent
	if cfg.File != path {
		t.Errorf("File = %q, want %q", cfg.File, path)
	}
	if got := a.TrustDomain.Name(); got != "example.org" {
		t.Errorf("TrustDomain = %q", got)
	}
	checks := []struct{ name, got, want string }{
		{"DataDir", a.DataDir, "/run/spire"},
		{"LogLevel", a.LogLevel, "debug"},
		{"LogFormat", a.LogFormat, "json"},
		{"ServerAddress", a.ServerAddress, "spire-server"},
		{"SocketPath", a.SocketPath, "/run/spire/sockets/agent.sock"},
		{"TrustBundlePath", a.TrustBundlePath, "/run/spire/bundle/bundle.crt"},
		{"TrustBundleFormat", a.TrustBundleFormat, "pem"},
		{"JoinToken", a.JoinToken, "8c4c0b3a-6ec0-4e1b-9d7c-4f0f1b8ad1c7"},
		{"AdminSocketPath", a.AdminSocketPath, "/run/spire/private/admin.sock"},
		{"AuthorizedDelegates", fmt.Sprint(a.AuthorizedDelegates), "[spiffe://example.org/cilium]"},
		{"Pos", a.Pos.String(), path + ":2:1"},
	}
	for _, c := range checks {
		if c.got != c.want {
			t.Errorf("%s = %q, want %q", c.name, c.got, c.want)
		}
	}
	if a.ServerPort != 8443 {
		t.Errorf("ServerPort = %d, want 8443", a.ServerPort)
	}
	if a.SyncInterval != 5*time.Second {
		t.Errorf("SyncInterval = %v, want 5s", a.SyncInterval)
	}

	var got []string
	for _, p := range cfg.Plugins {
		got = append(got, p.Type+"/"+p.Name+"@"+p.Pos.String())
		if !p.Enabled || p.Data == nil {
			t.Errorf("%s/%s: Enabled=%v Data=%v", p.Type, p.Name, p.Enabled, p.Data)
		}
	}
	want := []string{
		"NodeAttestor/join_token@" + path + ":17:5",
		"KeyManager/disk@" + path + ":21:5",
		"WorkloadAttestor/unix@" + path + ":26:5",
	}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("plugins = %v, want %v", got, want)
	}
	var disk struct {
		Directory string `hcl:"directory"`
	}
	if err := cfg.Plugins[1].Data.Decode(&disk); err != nil {
		t.Fatal(err)
	}
	if disk.Directory != "/run/spire" {
		t.Errorf("disk directory = %q", disk.Directory)
	}
	if !cfg.Plugins[0].Data.Empty() || cfg.Plugins[1].Data.Empty() {
		t.Errorf("Empty: join_token %v, disk %v", cfg.Plugins[0].Data.Empty(), cfg.Plugins[1].Data.Empty())
	}

	h := cfg.HealthChecks
	if !h.ListenerEnabled || h.BindAddress != "0.0.0.0" || h.BindPort != 8080 || h.LivePath != "/live" || h.ReadyPath != "/ready" {
		t.Errorf("HealthChecks = %+v", h)
	}
	if tm := cfg.Telemetry; !tm.PrometheusEnabled || tm.PrometheusHost != "localhost" || tm.PrometheusPort != 9988 {
		t.Errorf("Telemetry = %+v", tm)
	}
}

func TestParseDefaults(t *testing.T) {
	cfg, err := Parse("min.conf", []byte(`agent { trust_domain = "example.org" }`))
	if err != nil {
		t.Fatal(err)
	}
	a := cfg.Agent
	if a.DataDir != DefaultDataDir || a.SocketPath != DefaultSocketPath || a.LogLevel != "info" ||
		a.LogFormat != "text" || a.TrustBundleFormat != "pem" || a.SyncInterval != 5*time.Second ||
		a.ServerAddress != "" || a.ServerPort != 0 || a.AllowUnauthenticatedVerifiers || a.InsecureBootstrap {
		t.Errorf("agent defaults = %+v", a)
	}
	if h := cfg.HealthChecks; h != (HealthChecks{BindAddress: "localhost", BindPort: 80, LivePath: "/live", ReadyPath: "/ready"}) {
		t.Errorf("health defaults = %+v", h)
	}
	if cfg.Telemetry != (Telemetry{}) || len(cfg.Plugins) != 0 {
		t.Errorf("telemetry %+v, plugins %v", cfg.Telemetry, cfg.Plugins)
	}

	cfg, err = Parse("server.conf", []byte(`agent {
  trust_domain = "spiffe://example.org"
  server_address = "10.0.0.1"
  sync_interval = "1m30s"
  insecure_bootstrap = true
  allow_unauthenticated_verifiers = true
  trust_bundle_format = "SPIFFE"
  log_level = "WARNING"
}`))
	if err != nil {
		t.Fatal(err)
	}
	a = cfg.Agent
	if a.TrustDomain.Name() != "example.org" || a.ServerPort != 8081 || a.SyncInterval != 90*time.Second ||
		!a.InsecureBootstrap || !a.AllowUnauthenticatedVerifiers || a.TrustBundleFormat != "spiffe" || a.LogLevel != "warn" {
		t.Errorf("agent = %+v", a)
	}
}

func TestLoadExpandEnv(t *testing.T) {
	t.Setenv("LANYARD_TEST_TD", "env.example.org")
	t.Setenv("LANYARD_TEST_DIR", "/srv/lanyard")
	path := writeConfig(t, "env.conf", `agent {
  trust_domain = "${LANYARD_TEST_TD}"
  data_dir = "$LANYARD_TEST_DIR/data"
}`)
	cfg, err := Load(path, true)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Agent.TrustDomain.Name() != "env.example.org" || cfg.Agent.DataDir != "/srv/lanyard/data" {
		t.Errorf("agent = %+v", cfg.Agent)
	}

	// Without -expandEnv the text is taken as written.
	_, err = Load(path, false)
	if err == nil || !strings.Contains(err.Error(), path+":2:3: agent.trust_domain: invalid trust domain \"${LANYARD_TEST_TD}\"") {
		t.Errorf("without expansion: %v", err)
	}

	if _, err := Load(filepath.Join(t.TempDir(), "missing.conf"), false); err == nil || !strings.Contains(err.Error(), "missing.conf") {
		t.Errorf("missing file: %v", err)
	}
}

// TestExampleLocalConf checks the file `make run` uses.
func TestExampleLocalConf(t *testing.T) {
	t.Setenv("LANYARD_UID", "1000")
	cfg, err := Load("examples/local.conf", true)
	if err != nil {
		t.Fatal(err)
	}
	a := cfg.Agent
	if a.TrustDomain.Name() != "example.org" || a.DataDir != "./.data" || a.SocketPath != "/tmp/lanyard/public/api.sock" || a.LogLevel != "info" {
		t.Errorf("agent = %+v", a)
	}
	if len(cfg.Plugins) != 2 || cfg.Plugins[0].Type != "WorkloadAttestor" || cfg.Plugins[0].Name != "unix" ||
		cfg.Plugins[1].Type != "UpstreamAuthority" || cfg.Plugins[1].Name != "local" {
		t.Fatalf("plugins = %+v", cfg.Plugins)
	}
	var unix struct {
		DiscoverWorkloadPath bool `hcl:"discover_workload_path"`
	}
	if err := cfg.Plugins[0].Data.Decode(&unix); err != nil || !unix.DiscoverWorkloadPath {
		t.Errorf("unix plugin_data: %+v, %v", unix, err)
	}
	var local struct {
		X509SVIDTTL string `hcl:"x509_svid_ttl"`
		JWTSVIDTTL  string `hcl:"jwt_svid_ttl"`
		Entries     []struct {
			SPIFFEID  string   `hcl:"spiffe_id"`
			Selectors []string `hcl:"selectors"`
		} `hcl:"entry"`
	}
	if err := cfg.Plugins[1].Data.Decode(&local); err != nil {
		t.Fatal(err)
	}
	if local.X509SVIDTTL != "1h" || local.JWTSVIDTTL != "5m" || len(local.Entries) != 1 ||
		local.Entries[0].SPIFFEID != "spiffe://example.org/user/1000" ||
		strings.Join(local.Entries[0].Selectors, ",") != "unix:uid:1000" {
		t.Errorf("local plugin_data = %+v", local)
	}
	for _, key := range []string{"x509_svid_ttl", "jwt_svid_ttl"} {
		if _, err := cfg.Plugins[1].Data.Duration(key, map[string]string{"x509_svid_ttl": local.X509SVIDTTL, "jwt_svid_ttl": local.JWTSVIDTTL}[key]); err != nil {
			t.Error(err)
		}
	}
}

func TestParseErrors(t *testing.T) {
	const td = "agent {\n  trust_domain = \"example.org\"\n}\n"
	tests := []struct {
		name string
		text string
		want []string // each must appear in the error text
		not  string   // must not appear
	}{
		{name: "empty", text: "", want: []string{"t.conf:1:1: ", "empty"}},
		{name: "whitespace", text: " \n\t\n", want: []string{"t.conf:1:1: ", "empty"}},
		{name: "comments only", text: "# nothing\n", want: []string{"t.conf:1:1: agent: the agent block is missing"}},
		{name: "unterminated string", text: "agent {\n  trust_domain = \"x\n}\n", want: []string{"t.conf:2:", "syntax error", "literal not terminated"}},
		{name: "missing brace", text: "agent {\n  trust_domain = \"x\"\n", want: []string{"t.conf:3:", "syntax error"}},
		{name: "bad token", text: "agent {\n  trust_domain = \"x\" ]\n}", want: []string{"t.conf:2:", "syntax error"}},
		// hcl's own token.Value panics on these (hashicorp/hcl#129).
		{name: "bad escape in key", text: "t\"\\400n\"{}", want: []string{"t.conf:1:2: bad key \"\\400n\": invalid syntax"}},
		{name: "bad escape in value", text: "agent {\n  trust_domain = \"\\400\"\n}", want: []string{"t.conf:2:18: agent.trust_domain: bad string: invalid syntax"}},
		{name: "json syntax", text: "{\n \"agent\": {\n  \"trust_domain\": \"x\",,\n }\n}", want: []string{"t.conf:3:23: syntax error"}},
		{name: "json trailing", text: "{\"agent\": {\"trust_domain\": \"example.org\"}}\n{}", want: []string{"t.conf:2:1: syntax error: unexpected data"}},
		{name: "missing trust domain", text: "\n\nagent {\n  data_dir = \"/x\"\n}\n", want: []string{"t.conf:3:1: agent: trust_domain is missing"}},
		{name: "uppercase trust domain", text: "agent {\n  trust_domain = \"Example.org\"\n}", want: []string{"t.conf:2:3: agent.trust_domain: invalid trust domain \"Example.org\"", "lowercase"}},
		{name: "trust domain wrong type", text: "agent {\n  trust_domain = true\n}", want: []string{"t.conf:2:18: agent.trust_domain: want a string, got true"}, not: "missing"},
		{name: "unknown top-level key", text: td + "agnet {}\n", want: []string{"t.conf:4:1: agnet: unknown key; did you mean \"agent\"?", "known keys: agent, plugins, health_checks, telemetry"}},
		{name: "server block", text: td + "server {}\n", want: []string{"t.conf:4:1: server: this is a spire-server block"}},
		{name: "unknown agent key", text: "agent {\n  trust_domain = \"example.org\"\n  log_levle = \"debug\"\n}", want: []string{"t.conf:3:3: agent.log_levle: unknown key; did you mean \"log_level\"?", "known keys: trust_domain, data_dir"}},
		{name: "unknown agent key no suggestion", text: "agent {\n  trust_domain = \"example.org\"\n  colour = \"red\"\n}", want: []string{"t.conf:3:3: agent.colour: unknown key (known keys:"}, not: "did you mean"},
		{name: "spire key experimental", text: "agent {\n  trust_domain = \"example.org\"\n  experimental {\n    sync_interval = \"1s\"\n  }\n}", want: []string{"t.conf:4:5: agent.experimental.sync_interval: spire-agent key experimental.sync_interval is not supported by Lanyard", "set sync_interval in the agent block"}},
		{name: "sds unknown key", text: "agent {\n  trust_domain = \"example.org\"\n  sds { default_svid_nam = \"x\" }\n}", want: []string{"t.conf:3:9: agent.sds.default_svid_nam: unknown key"}},
		{name: "spire key key type", text: "agent {\n  trust_domain = \"example.org\"\n  workload_x509_svid_key_type = \"ec-p256\"\n}", want: []string{"t.conf:3:3: agent.workload_x509_svid_key_type: spire-agent key workload_x509_svid_key_type is not supported by Lanyard"}},
		{name: "spire key retry_bootstrap", text: "agent {\n  trust_domain = \"example.org\"\n  retry_bootstrap = true\n}", want: []string{"t.conf:3:3: agent.retry_bootstrap: spire-agent key retry_bootstrap is not supported by Lanyard"}},
		{name: "spire key rebootstrap", text: "agent {\n  trust_domain = \"example.org\"\n  rebootstrap_mode = \"auto\"\n  rebootstrap_delay = \"10m\"\n}", want: []string{"t.conf:3:3: agent.rebootstrap_mode: spire-agent key rebootstrap_mode is not supported", "t.conf:4:3: agent.rebootstrap_delay: spire-agent key rebootstrap_delay is not supported"}},
		{name: "spire key caches", text: "agent {\n  trust_domain = \"example.org\"\n  availability_target = \"24h\"\n  x509_svid_cache_max_size = 10\n  jwt_svid_cache_max_size = 10\n}", want: []string{"t.conf:3:3: agent.availability_target: spire-agent key", "t.conf:4:3: agent.x509_svid_cache_max_size: spire-agent key", "t.conf:5:3: agent.jwt_svid_cache_max_size: spire-agent key"}},
		{name: "spire key profiling_freq", text: "agent {\n  trust_domain = \"example.org\"\n  profiling_freq = 5\n}", want: []string{"t.conf:3:3: agent.profiling_freq: spire-agent key profiling_freq is not supported"}},
		{name: "profiling without a port", text: "agent {\n  trust_domain = \"example.org\"\n  profiling_enabled = true\n}", want: []string{"t.conf:3:3: agent.profiling_enabled: profiling_port is missing"}},
		{name: "profiling port out of range", text: "agent {\n  trust_domain = \"example.org\"\n  profiling_enabled = true\n  profiling_port = 70000\n}", want: []string{"t.conf:4:3: agent.profiling_port: port 70000 is out of range"}},
		{name: "bool as string", text: "agent {\n  trust_domain = \"example.org\"\n  insecure_bootstrap = \"true\"\n}", want: []string{"t.conf:3:24: agent.insecure_bootstrap: want true or false, got the string \"true\": drop the quotes"}},
		{name: "port not a number", text: "agent {\n  trust_domain = \"example.org\"\n  server_address = \"s\"\n  server_port = \"eighty\"\n}", want: []string{"t.conf:4:17: agent.server_port: want a whole number, got the string \"eighty\""}, not: "out of range"},
		{name: "block for string", text: "agent {\n  trust_domain = \"example.org\"\n  data_dir {\n  }\n}", want: []string{"t.conf:3:12: agent.data_dir: want a string, got a block"}},
		{name: "list for string", text: "agent {\n  trust_domain = \"example.org\"\n  data_dir = [\"a\"]\n}", want: []string{"t.conf:3:14: agent.data_dir: want a string, got a list"}},
		{name: "scalar for block", text: "agent = \"x\"\n", want: []string{"t.conf:1:9: agent: want a block like agent { ... }, got the string \"x\""}},
		{name: "set twice", text: "agent {\n  trust_domain = \"example.org\"\n  data_dir = \"/a\"\n  data_dir = \"/b\"\n}", want: []string{"t.conf:4:3: agent.data_dir: set more than once (first at t.conf:3:3)"}},
		{name: "set twice in two agent blocks", text: "agent {\n  trust_domain = \"example.org\"\n}\nagent {\n  trust_domain = \"example.org\"\n}", want: []string{"t.conf:5:3: agent.trust_domain: set more than once (first at t.conf:2:3)"}},
		{name: "bad log level", text: "agent {\n  trust_domain = \"example.org\"\n  log_level = \"loud\"\n}", want: []string{"t.conf:3:3: agent.log_level: unknown log level \"loud\"; use one of trace, debug, info, warn, error"}},
		{name: "bad log format", text: "agent {\n  trust_domain = \"example.org\"\n  log_format = \"xml\"\n}", want: []string{"t.conf:3:3: agent.log_format: unknown log format \"xml\""}},
		{name: "bad bundle format", text: "agent {\n  trust_domain = \"example.org\"\n  trust_bundle_format = \"der\"\n}", want: []string{"t.conf:3:3: agent.trust_bundle_format: unknown trust bundle format \"der\""}},
		{name: "server port range", text: "agent {\n  trust_domain = \"example.org\"\n  server_address = \"s\"\n  server_port = 70000\n}", want: []string{"t.conf:4:3: agent.server_port: port 70000 is out of range"}},
		{name: "server address with port", text: "agent {\n  trust_domain = \"example.org\"\n  server_address = \"spire:8081\"\n}", want: []string{"t.conf:3:3: agent.server_address: server_address \"spire:8081\" includes a port; move 8081 to server_port"}},
		{name: "server address with scheme", text: "agent {\n  trust_domain = \"example.org\"\n  server_address = \"https://spire\"\n}", want: []string{"t.conf:3:3: agent.server_address:", "has a scheme"}},
		{name: "bad sync interval", text: "agent {\n  trust_domain = \"example.org\"\n  sync_interval = \"5\"\n}", want: []string{"t.conf:3:3: agent.sync_interval: bad duration \"5\": write it like \"1h\" or \"90s\""}},
		{name: "zero sync interval", text: "agent {\n  trust_domain = \"example.org\"\n  sync_interval = \"0s\"\n}", want: []string{"t.conf:3:3: agent.sync_interval: bad duration \"0s\": it must be more than zero"}},
		{name: "insecure bootstrap with bundle", text: "agent {\n  trust_domain = \"example.org\"\n  insecure_bootstrap = true\n  trust_bundle_path = \"/b.pem\"\n}", want: []string{"t.conf:4:3: agent.trust_bundle_path: trust_bundle_path and insecure_bootstrap = true exclude each other"}},
		{name: "admin socket beside public socket", text: "agent {\n  trust_domain = \"example.org\"\n  socket_path = \"/run/lanyard/public/api.sock\"\n  admin_socket_path = \"/run/lanyard/public/admin/admin.sock\"\n}", want: []string{"t.conf:4:3: agent.admin_socket_path: admin socket \"/run/lanyard/public/admin/admin.sock\" is in the directory of socket_path"}},
		{name: "admin socket is the public socket's directory", text: "agent {\n  trust_domain = \"example.org\"\n  socket_path = \"/run/lanyard/api.sock\"\n  admin_socket_path = \"/run/lanyard/admin.sock\"\n}", want: []string{"t.conf:4:3: agent.admin_socket_path: admin socket \"/run/lanyard/admin.sock\" is in the directory of socket_path"}},
		{name: "admin socket empty", text: "agent {\n  trust_domain = \"example.org\"\n  admin_socket_path = \"\"\n}", want: []string{"t.conf:3:3: agent.admin_socket_path: admin_socket_path is empty"}},
		{name: "delegate not a SPIFFE ID", text: "agent {\n  trust_domain = \"example.org\"\n  authorized_delegates = [\n    \"spiffe://example.org/ok\",\n    \"example.org/cilium\",\n  ]\n}", want: []string{"t.conf:5:5: agent.authorized_delegates[1]: invalid SPIFFE ID \"example.org/cilium\"", "spiffe://example.org/proxy"}},
		{name: "delegate in another trust domain", text: "agent {\n  trust_domain = \"example.org\"\n  authorized_delegates = [\"spiffe://other.org/cilium\"]\n}", want: []string{"t.conf:3:27: agent.authorized_delegates[0]: delegate \"spiffe://other.org/cilium\" is not in the agent's trust domain \"example.org\""}},
		{name: "empty socket path", text: "agent {\n  trust_domain = \"example.org\"\n  socket_path = \"\"\n}", want: []string{"t.conf:3:3: agent.socket_path: socket_path is empty"}},
		{name: "plugins scalar", text: td + "plugins = 5\n", want: []string{"t.conf:4:11: plugins: want a block like plugins {", "got the number 5"}},
		{name: "unknown plugin type", text: td + "plugins {\n  WorkloadAttestr \"unix\" {}\n}", want: []string{"t.conf:5:3: plugins.WorkloadAttestr: unknown plugin type; did you mean \"WorkloadAttestor\"?", "known types: WorkloadAttestor, UpstreamAuthority, NodeAttestor, KeyManager"}},
		{name: "lower-case plugin type", text: td + "plugins {\n  keymanager \"disk\" {}\n}", want: []string{"t.conf:5:3: plugins.keymanager: unknown plugin type; did you mean \"KeyManager\"? (plugin types are case-sensitive)"}},
		{name: "SVIDStore", text: td + "plugins {\n  SVIDStore \"aws_secretsmanager\" {}\n}", want: []string{"t.conf:5:3: plugins.SVIDStore: plugin type SVIDStore is not supported by Lanyard"}},
		{name: "plugin_cmd", text: td + "plugins {\n  NodeAttestor \"x\" {\n    plugin_cmd = \"/bin/x\"\n    plugin_checksum = \"ab\"\n  }\n}", want: []string{"t.conf:6:5: plugins.NodeAttestor \"x\".plugin_cmd: external plugins are not supported; Lanyard's plugins are built in", "t.conf:7:5: plugins.NodeAttestor \"x\".plugin_checksum: external plugins are not supported"}},
		{name: "plugin_data_file", text: td + "plugins {\n  KeyManager \"disk\" {\n    plugin_data_file = \"/etc/km.conf\"\n  }\n}", want: []string{"t.conf:6:5: plugins.KeyManager \"disk\".plugin_data_file: external plugins are not supported"}},
		{name: "plugin_args", text: td + "plugins {\n  KeyManager \"disk\" {\n    plugin_args = [\"-v\"]\n  }\n}", want: []string{"t.conf:6:5: plugins.KeyManager \"disk\".plugin_args: external plugins are not supported"}},
		{name: "duplicate plugin", text: td + "plugins {\n  KeyManager \"disk\" {}\n  KeyManager \"disk\" {}\n}", want: []string{"t.conf:6:3: plugins.KeyManager \"disk\": declared more than once (first at t.conf:5:3)"}},
		{name: "duplicate plugin across forms", text: td + "plugins {\n  WorkloadAttestor \"unix\" {}\n  WorkloadAttestor {\n    unix {}\n  }\n}", want: []string{"t.conf:7:5: plugins.WorkloadAttestor \"unix\": declared more than once (first at t.conf:5:3)"}},
		{name: "plugin without name", text: td + "plugins {\n  WorkloadAttestor {\n    plugin_data {}\n  }\n}", want: []string{"t.conf:6:5: plugins.WorkloadAttestor: the plugin has no name; write WorkloadAttestor \"name\" { plugin_data ... }"}},
		{name: "plugin body scalar", text: td + "plugins {\n  WorkloadAttestor {\n    unix = 1\n  }\n}", want: []string{"t.conf:6:5: plugins.WorkloadAttestor \"unix\": want a block like WorkloadAttestor \"unix\" { plugin_data { } }, got the number 1"}},
		{name: "plugin type scalar", text: td + "plugins {\n  WorkloadAttestor = \"unix\"\n}", want: []string{"t.conf:5:3: plugins.WorkloadAttestor: want a block like WorkloadAttestor \"name\" { plugin_data { } }, got the string \"unix\""}},
		{name: "unknown plugin body key", text: td + "plugins {\n  WorkloadAttestor \"unix\" {\n    plugin_dat {}\n  }\n}", want: []string{"t.conf:6:5: plugins.WorkloadAttestor \"unix\".plugin_dat: unknown key; did you mean \"plugin_data\"? (known keys: plugin_data, enabled)"}},
		{name: "enabled not bool", text: td + "plugins {\n  WorkloadAttestor \"unix\" {\n    enabled = 1\n  }\n}", want: []string{"t.conf:6:15: plugins.WorkloadAttestor \"unix\".enabled: want true or false, got the number 1"}},
		{name: "plugin_data scalar", text: td + "plugins {\n  WorkloadAttestor \"unix\" {\n    plugin_data = \"x\"\n  }\n}", want: []string{"t.conf:6:5: plugins.WorkloadAttestor \"unix\".plugin_data: want a block like plugin_data {"}},
		{name: "plugin_data twice", text: td + "plugins {\n  WorkloadAttestor \"unix\" {\n    plugin_data {}\n    plugin_data {}\n  }\n}", want: []string{"t.conf:7:5: plugins.WorkloadAttestor \"unix\".plugin_data: plugin_data is given more than once (first at t.conf:6:5)"}},
		{name: "telemetry DogStatsd", text: td + "telemetry {\n  DogStatsd = [{ address = \"localhost:8125\" }]\n}", want: []string{"t.conf:5:3: telemetry.DogStatsd: telemetry sink DogStatsd is not supported by Lanyard; only Prometheus is"}},
		{name: "telemetry other sinks", text: td + "telemetry {\n  Statsd { address = \"x\" }\n  M3 { address = \"x\" }\n  InMem {}\n}", want: []string{"t.conf:5:3: telemetry.Statsd: telemetry sink Statsd", "t.conf:6:3: telemetry.M3: telemetry sink M3", "t.conf:7:3: telemetry.InMem: telemetry sink InMem"}},
		{name: "telemetry key", text: td + "telemetry {\n  MetricPrefix = \"x\"\n}", want: []string{"t.conf:5:3: telemetry.MetricPrefix: spire-agent telemetry key MetricPrefix is not supported by Lanyard"}},
		{name: "prometheus port missing", text: td + "telemetry {\n  Prometheus {\n    host = \"0.0.0.0\"\n  }\n}", want: []string{"t.conf:5:3: telemetry.Prometheus: port is missing"}},
		{name: "prometheus port range", text: td + "telemetry {\n  Prometheus {\n    port = 0\n  }\n}", want: []string{"t.conf:6:5: telemetry.Prometheus.port: port 0 is out of range"}},
		{name: "prometheus unknown key", text: td + "telemetry {\n  Prometheus {\n    prot = 9\n  }\n}", want: []string{"t.conf:6:5: telemetry.Prometheus.prot: unknown key; did you mean \"port\"?"}},
		{name: "health port", text: td + "health_checks {\n  bind_port = \"0\"\n}", want: []string{"t.conf:5:3: health_checks.bind_port: port 0 is out of range"}},
		{name: "health path", text: td + "health_checks {\n  live_path = \"live\"\n}", want: []string{"t.conf:5:3: health_checks.live_path: path \"live\" must start with /"}},
		{name: "health same paths", text: td + "health_checks {\n  live_path = \"/ready\"\n}", want: []string{"t.conf:4:1: health_checks: live_path and ready_path are both \"/ready\""}},
		{name: "health unknown key", text: td + "health_checks {\n  listener_enable = true\n}", want: []string{"t.conf:5:3: health_checks.listener_enable: unknown key; did you mean \"listener_enabled\"?"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := Parse("t.conf", []byte(tt.text))
			if err == nil {
				t.Fatalf("no error; config %+v", cfg)
			}
			if cfg != nil {
				t.Errorf("config returned with an error")
			}
			msg := err.Error()
			for _, w := range tt.want {
				if !strings.Contains(msg, w) {
					t.Errorf("error does not contain %q:\n%s", w, msg)
				}
			}
			if tt.not != "" && strings.Contains(msg, tt.not) {
				t.Errorf("error contains %q:\n%s", tt.not, msg)
			}
			var e *Error
			if !errors.As(err, &e) || e.Pos.File != "t.conf" || e.Pos.Line < 1 || e.Pos.Column < 1 {
				t.Errorf("errors.As *Error: %#v", e)
			}
		})
	}
}

func TestParseReportsAllErrorsInFileOrder(t *testing.T) {
	text := `telemetry {
  InMem {}
}
agent {
  trust_domain = "Bad"
  log_level = "loud"
  sds { bogus = 1 }
}
plugins {
  SVIDStore "x" {}
  KeyManager "disk" { plugin_cmd = "x" }
}
`
	_, err := Parse("all.conf", []byte(text))
	var errs Errors
	if !errors.As(err, &errs) {
		t.Fatalf("want Errors, got %T: %v", err, err)
	}
	var got []string
	for _, e := range errs {
		got = append(got, e.Pos.String()+" "+e.Key)
	}
	want := []string{
		"all.conf:2:3 telemetry.InMem",
		"all.conf:5:3 agent.trust_domain",
		"all.conf:6:3 agent.log_level",
		"all.conf:7:9 agent.sds.bogus",
		"all.conf:10:3 plugins.SVIDStore",
		`all.conf:11:23 plugins.KeyManager "disk".plugin_cmd`,
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("errors:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if lines := strings.Count(err.Error(), "\n") + 1; lines != len(want) {
		t.Errorf("Error() has %d lines, want %d", lines, len(want))
	}
}

func TestPluginForms(t *testing.T) {
	text := `agent { trust_domain = "example.org" }
plugins {
  WorkloadAttestor {
    unix {
      plugin_data { discover_workload_path = true }
    }
    "docker" {
      enabled = false
    }
  }
  KeyManager "memory" {}
}
plugins {
  NodeAttestor "join_token" {}
}
`
	cfg, err := Parse("forms.conf", []byte(text))
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, p := range cfg.Plugins {
		got = append(got, p.Type+"/"+p.Name+"@"+p.Pos.String()+" enabled="+map[bool]string{true: "yes", false: "no"}[p.Enabled])
	}
	want := []string{
		"WorkloadAttestor/unix@forms.conf:4:5 enabled=yes",
		"WorkloadAttestor/docker@forms.conf:7:5 enabled=no",
		"KeyManager/memory@forms.conf:11:3 enabled=yes",
		"NodeAttestor/join_token@forms.conf:14:3 enabled=yes",
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("plugins:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}

	docker := cfg.Plugins[1]
	if !docker.Data.Empty() {
		t.Error("absent plugin_data is not empty")
	}
	// An absent plugin_data reports at the plugin.
	if err := docker.Data.Errorf("x", "bad"); err.Error() != `forms.conf:7:5: plugins.WorkloadAttestor "docker".plugin_data.x: bad` {
		t.Errorf("Errorf on absent plugin_data = %q", err)
	}
	if err := docker.Errorf("no plugin named %q", "docker"); err.Error() != `forms.conf:7:5: plugins.WorkloadAttestor "docker": no plugin named "docker"` {
		t.Errorf("Plugin.Errorf = %q", err)
	}
	if err := cfg.Plugins[0].Data.Errorf("discover_workload_path", "nope"); err.Error() != `forms.conf:5:21: plugins.WorkloadAttestor "unix".plugin_data.discover_workload_path: nope` {
		t.Errorf("Section.Errorf = %q", err)
	}
}

func TestParseJSON(t *testing.T) {
	text := `{
  "agent": {
    "trust_domain": "example.org",
    "server_address": "spire-server",
    "server_port": 443
  },
  "plugins": {
    "KeyManager": [{"memory": [{"plugin_data": [{}]}]}],
    "WorkloadAttestor": {
      "unix": {"plugin_data": {"discover_workload_path": true}},
      "k8s": {"plugin_data": {"entry": [{"a": "1"}, {"a": "2"}]}}
    }
  },
  "health_checks": {"listener_enabled": true, "bind_port": "9982"}
}`
	cfg, err := Parse("agent.json", []byte(text))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Agent.ServerPort != 443 || cfg.Agent.Pos.String() != "agent.json:2:3" || cfg.HealthChecks.BindPort != 9982 {
		t.Errorf("agent %+v health %+v", cfg.Agent, cfg.HealthChecks)
	}
	var got []string
	for _, p := range cfg.Plugins {
		got = append(got, p.Type+"/"+p.Name+"@"+p.Pos.String())
	}
	if want := "KeyManager/memory@agent.json:8:21 WorkloadAttestor/unix@agent.json:10:7 WorkloadAttestor/k8s@agent.json:11:7"; strings.Join(got, " ") != want {
		t.Errorf("plugins = %s, want %s", strings.Join(got, " "), want)
	}
	var k8s struct {
		Entry []struct {
			A string `hcl:"a"`
		} `hcl:"entry"`
	}
	k8sData := cfg.Plugins[2].Data
	if err := k8sData.Decode(&k8s); err != nil || len(k8s.Entry) != 2 || k8s.Entry[1].A != "2" {
		t.Errorf("k8s = %+v, %v", k8s, err)
	}
	if err := k8sData.Errorf("entry[1].a", "bad"); !strings.HasPrefix(err.Error(), "agent.json:11:54: ") {
		t.Errorf("Errorf = %q", err)
	}

	_, err = Parse("agent.json", []byte(`{"agent": {"trust_domain": "example.org", "bogus": 1}}`))
	if err == nil || !strings.Contains(err.Error(), "agent.json:1:43: agent.bogus: unknown key") {
		t.Errorf("unknown JSON key: %v", err)
	}
	_, err = Parse("agent.json", []byte(`{"agent": ["x"]}`))
	if err == nil || !strings.Contains(err.Error(), "agent.json:1:12: agent: want a block") {
		t.Errorf("JSON agent list of string: %v", err)
	}
}
