package filedelivery

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// readmeExample is the configuration example of spiffe-helper's README,
// byte for byte: an existing config must work without an edit.
const readmeExample = `agent_address = "/tmp/spire-agent/public/api.sock"
cmd = "ghostunnel"
cmd_args = "server --listen localhost:8002 --target localhost:8001 --keystore certs/svid_key.pem --cacert certs/svid_bundle.pem --allow-uri-san spiffe://example.org/Database"
cert_dir = "certs"
renew_signal = "SIGUSR1"
svid_file_name = "svid.pem"
svid_key_file_name = "svid_key.pem"
svid_bundle_file_name = "svid_bundle.pem"
jwt_svids = [{jwt_audience="your-audience",jwt_extra_audiences=["your-extra-audience-1", "your-extra-audience-2"], jwt_svid_file_name="jwt_svid.token"}]
jwt_bundle_file_name = "bundle.json"
cert_file_mode = 0444
key_file_mode = 0444
jwt_bundle_file_mode = 0444
jwt_svid_file_mode = 0444
`

// postgresExample is spiffe-helper's examples/postgresql/helper.conf
// without its comments.
const postgresExample = `agent_address = "/tmp/spire-agent/public/api.sock"
cmd = "/usr/bin/psql"
cmd_args = "-p 5432 -c \"SELECT pg_reload_conf();\""
cert_dir = "certs"
renew_signal = ""
svid_file_name = "svid.pem"
svid_key_file_name = "svid.key"
svid_bundle_file_name = "svid_bundle.pem"
`

func noEnv(string) string { return "" }

func TestParseSpiffeHelperExamples(t *testing.T) {
	t.Chdir(t.TempDir())
	if err := os.Mkdir("certs", 0o755); err != nil {
		t.Fatal(err)
	}
	c, err := Parse("helper.conf", []byte(readmeExample), nil, noEnv)
	if err != nil {
		t.Fatal(err)
	}
	want := &Config{
		AgentAddress: "/tmp/spire-agent/public/api.sock",
		DaemonMode:   true,
		Cmd:          "ghostunnel",
		CmdArgs: []string{"server", "--listen", "localhost:8002", "--target", "localhost:8001", "--keystore",
			"certs/svid_key.pem", "--cacert", "certs/svid_bundle.pem", "--allow-uri-san", "spiffe://example.org/Database"},
		RenewSignal:    unix.SIGUSR1,
		CertDir:        "certs",
		SVIDFile:       "certs/svid.pem",
		SVIDKeyFile:    "certs/svid_key.pem",
		SVIDBundleFile: "certs/svid_bundle.pem",
		CertFileMode:   0o444,
		KeyFileMode:    0o444,
		JWTSVIDs: []JWTSVID{{Audience: "your-audience", ExtraAudiences: []string{"your-extra-audience-1", "your-extra-audience-2"},
			FileName: "certs/jwt_svid.token"}},
		JWTBundleFile:     "certs/bundle.json",
		JWTSVIDFileMode:   0o444,
		JWTBundleFileMode: 0o444,
	}
	if !reflect.DeepEqual(c, want) {
		t.Fatalf("got\n%+v\nwant\n%+v", c, want)
	}

	c, err = Parse("helper.conf", []byte(postgresExample), nil, noEnv)
	if err != nil {
		t.Fatal(err)
	}
	if got := c.CmdArgs; !reflect.DeepEqual(got, []string{"-p", "5432", "-c", "SELECT pg_reload_conf();"}) {
		t.Fatalf("cmd_args = %q", got)
	}
	if c.RenewSignal != 0 || c.CertFileMode != 0o644 || c.KeyFileMode != 0o600 || c.JWTSVIDFileMode != 0o600 || c.JWTBundleFileMode != 0o600 {
		t.Fatalf("defaults: %+v", c)
	}
}

func TestParseErrors(t *testing.T) {
	dir := t.TempDir()
	x509 := `cert_dir = "` + dir + `"
svid_file_name = "a.pem"
svid_key_file_name = "a.key"
svid_bundle_file_name = "b.pem"
`
	for _, tc := range []struct {
		name, body string
		daemon     *bool
		want       string // substring of the error
	}{
		{"unknown key", x509 + "renew_signl = \"SIGHUP\"\n", nil, "helper.conf:5:1: renew_signl: unknown key"},
		{"unknown key in jwt_svids", `cert_dir = "` + dir + `"
jwt_svids = [{jwt_audience = "a", jwt_svid_file_name = "t", audience = "b"}]
`, nil, "helper.conf:2:"},
		{"jwt_svids without a file", `jwt_svids = [{jwt_audience = "a"}]`, nil, "jwt_svid_file_name is required"},
		{"jwt_svids without an audience", `jwt_svids = [{jwt_svid_file_name = "t"}]`, nil, "jwt_audience is required"},
		{"two of three x509 names", `svid_file_name = "a"
svid_key_file_name = "b"`, nil, "all or none"},
		{"nothing to write", `cert_dir = "` + dir + `"`, nil, "nothing to write"},
		{"pid file without signal", x509 + `pid_file_name = "/run/x.pid"`, nil, "helper.conf:5:1: pid_file_name: pid_file_name needs renew_signal"},
		{"pid file in one-shot mode", x509 + "pid_file_name = \"/run/x.pid\"\nrenew_signal = \"SIGHUP\"\ndaemon_mode = false\n", nil, "only used in daemon mode"},
		{"pid file with -daemon-mode=false", x509 + "pid_file_name = \"/run/x.pid\"\nrenew_signal = \"SIGHUP\"\n", new(bool), "only used in daemon mode"},
		{"unknown signal", x509 + `renew_signal = "SIGFOO"`, nil, "helper.conf:5:1: renew_signal: unknown signal"},
		{"negative mode", x509 + `cert_file_mode = -1`, nil, "cert_file_mode: a file mode must be positive"},
		{"mode beyond permissions", x509 + `key_file_mode = 01600`, nil, "key_file_mode: 01600 has bits"},
		{"missing cert_dir", strings.Replace(x509, dir, dir+"/nope", 1), nil, "helper.conf:1:1: cert_dir:"},
		{"credential_folder is a file", `credential_folder = "` + dir + `/a.pem"`, nil, "credential_folder:"},
		{"unclosed quote", x509 + `cmd_args = "-c \"x"`, nil, "cmd_args: a double quote is not closed"},
		{"bad port", x509 + "health_checks {\n listener_enabled = true\n bind_port = 70000\n}\n", nil, "helper.conf:7:2: health_checks.bind_port"},
		{"string for a bool", x509 + `daemon_mode = "false"`, nil, "drop the quotes"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.name == "credential_folder is a file" {
				if err := os.WriteFile(filepath.Join(dir, "a.pem"), nil, 0o600); err != nil {
					t.Fatal(err)
				}
			}
			_, err := Parse("helper.conf", []byte(tc.body), tc.daemon, noEnv)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want it to contain %q", err, tc.want)
			}
		})
	}
}

func TestParseDefaultsAndOverrides(t *testing.T) {
	dir := t.TempDir()
	base := `cert_dir = "` + dir + `"
jwt_bundle_file_name = "b.json"
`
	yes, no := true, false
	for _, tc := range []struct {
		name, body string
		flag       *bool
		env        string
		check      func(*Config) bool
	}{
		{"daemon by default", base, nil, "", func(c *Config) bool { return c.DaemonMode }},
		{"daemon_mode false", base + "daemon_mode = false\n", nil, "", func(c *Config) bool { return !c.DaemonMode }},
		{"flag false wins", base + "daemon_mode = true\n", &no, "", func(c *Config) bool { return !c.DaemonMode }},
		{"flag true wins", base + "daemon_mode = false\n", &yes, "", func(c *Config) bool { return c.DaemonMode }},
		{"default socket", base, nil, "", func(c *Config) bool { return c.AgentAddress == DefaultAgentAddress }},
		{"socket from the environment", base, nil, "/run/x.sock", func(c *Config) bool { return c.AgentAddress == "/run/x.sock" }},
		{"a URI from the environment", base, nil, "unix:///run/x.sock", func(c *Config) bool { return c.AgentAddress == "/run/x.sock" }},
		{"one-shot ignores cmd", base + "daemon_mode = false\ncmd = \"x\"\nrenew_signal = \"SIGHUP\"\n", nil, "", func(c *Config) bool {
			return strings.Join(c.Ignored(), ",") == "cmd,renew_signal"
		}},
		{"agent_address wins", base + "agent_address = \"/a.sock\"\n", nil, "/run/x.sock", func(c *Config) bool { return c.AgentAddress == "/a.sock" }},
		{"health defaults", base + "health_checks {\n listener_enabled = true\n}\n", nil, "", func(c *Config) bool {
			return c.HealthChecks == HealthChecks{ListenerEnabled: true, BindPort: 8081, LivenessPath: "/live", ReadinessPath: "/ready"}
		}},
		{"credential folder alone", `credential_folder = "` + dir + `"`, nil, "", func(c *Config) bool {
			return c.X509Enabled() && c.SVIDFile == "" && c.CredentialFolder == dir
		}},
		{"mode as a string", base + `jwt_bundle_file_mode = "0640"`, nil, "", func(c *Config) bool { return c.JWTBundleFileMode == 0o640 }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := Parse("helper.conf", []byte(tc.body), tc.flag, func(k string) string {
				if k == "SPIFFE_ENDPOINT_SOCKET" {
					return tc.env
				}
				return ""
			})
			if err != nil {
				t.Fatal(err)
			}
			if !tc.check(c) {
				t.Fatalf("unexpected config %+v", c)
			}
		})
	}
}
