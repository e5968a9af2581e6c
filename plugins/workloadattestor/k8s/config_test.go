package k8s

import (
	"strings"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/attestor"
	"github.com/lanyard-dev/lanyard/conf"
)

func TestConfigDefaults(t *testing.T) {
	// The default paths do not exist here: the constructor reads nothing.
	a, _, err := buildAttestor("", map[string]string{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	s := a.s
	want := settings{
		secure: true, port: 10250, caPath: defaultKubeletCAPath, tokenPath: defaultTokenPath, auth: authToken,
		pollInterval: 500 * time.Millisecond, reloadInterval: time.Minute, maxPodListSize: 64 << 20,
		apiCAPath: defaultKubeletCAPath,
	}
	if s != want {
		t.Errorf("defaults:\n got %+v\nwant %+v", s, want)
	}
	if u := a.kubelet.url; u != "https://127.0.0.1:10250/pods" {
		t.Errorf("URL %s", u)
	}
	if a.procRoot != "/proc" {
		t.Errorf("proc root %s", a.procRoot)
	}
}

func TestConfigEveryKey(t *testing.T) {
	a, logs, err := buildAttestor(`
		kubelet_secure_port = "10443"
		kubelet_ca_path = "/etc/k/ca.pem"
		skip_kubelet_verification = false
		certificate_path = "/etc/k/cert.pem"
		private_key_path = "/etc/k/key.pem"
		node_name_env = "NODE"
		disable_container_selectors = true
		poll_retry_interval = "250ms"
		max_poll_attempts = 8
		reload_interval = "5m"
		use_new_container_locator = true
		verbose_container_locator_logs = true
		max_pod_list_size = 1048576
		api_server_ca_path = "/etc/k/api-ca.pem"
	`, map[string]string{"NODE": "node-7.example", "HOST_PROC": "/host/proc", "KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	want := settings{
		secure: true, port: 10443, nodeName: "node-7.example", caPath: "/etc/k/ca.pem", tokenPath: defaultTokenPath,
		auth: authCertificate, certPath: "/etc/k/cert.pem", keyPath: "/etc/k/key.pem",
		pollInterval: 250 * time.Millisecond, maxPolls: 8, reloadInterval: 5 * time.Minute, maxPodListSize: 1 << 20,
		disableContainerSelectors: true, verboseLocatorLogs: true,
		apiCAPath: "/etc/k/api-ca.pem", apiServer: "https://[fd00::1]:443",
	}
	if a.s != want {
		t.Errorf("settings:\n got %+v\nwant %+v", a.s, want)
	}
	if a.kubelet.url != "https://node-7.example:10443/pods" || a.procRoot != "/host/proc" {
		t.Errorf("URL %s, proc root %s", a.kubelet.url, a.procRoot)
	}
	if logs.String() != "" && strings.Contains(logs.String(), "[WARN]") {
		t.Errorf("warnings for a clean config:\n%s", logs)
	}
}

func TestConfigErrors(t *testing.T) {
	for _, tc := range []struct {
		name, hcl string
		env       map[string]string
		want      string
	}{
		{"both ports", "kubelet_read_only_port = 10255\nkubelet_secure_port = 10250", nil, "agent.conf:1:1: kubelet_read_only_port: cannot use both the read-only and the secure port"},
		{"port too large", "kubelet_secure_port = 70000", nil, "agent.conf:1:1: kubelet_secure_port: port 70000 is out of range"},
		{"negative port", "kubelet_read_only_port = -1", nil, "kubelet_read_only_port: port -1 is out of range"},
		{"certificate without key", `certificate_path = "/c"`, nil, "certificate_path: the private key path is required"},
		{"key without certificate", "\nprivate_key_path = \"/k\"", nil, "agent.conf:2:1: private_key_path: the certificate path is required"},
		{"bad interval", `poll_retry_interval = "fast"`, nil, `poll_retry_interval: bad duration "fast"`},
		{"zero interval", `poll_retry_interval = "0s"`, nil, "it must be more than zero"},
		{"bad reload", `reload_interval = "-1m"`, nil, "reload_interval: bad duration"},
		{"negative polls", "max_poll_attempts = -3", nil, "max_poll_attempts: -3 is negative"},
		{"negative size", "max_pod_list_size = -1", nil, "max_pod_list_size: -1 is negative"},
		{"bad node name", `node_name = "node a/b"`, nil, `node_name: "node a/b" is not a node name`},
		{"bad node name variable", "", map[string]string{"MY_NODE_NAME": "x y"}, `node_name_env: environment variable MY_NODE_NAME holds "x y"`},
		{"a typo", "kubelet_secure_prot = 1", nil, `kubelet_secure_prot: unknown key; did you mean "kubelet_secure_port"?`},
		{"a wrong type", `skip_kubelet_verification = "maybe"`, nil, "skip_kubelet_verification"},
		{"sigstore", "experimental {\n  sigstore {\n    rekor_url = \"https://rekor.example\"\n  }\n}", nil, "agent.conf:2:3: experimental.sigstore: sigstore image signature verification is not supported by Lanyard"},
		{"namespace labels", "\n\nenable_namespace_labels = true", nil, "agent.conf:3:1: enable_namespace_labels: enable_namespace_labels (k8s:ns-label selectors, from a SPIRE release after 1.13) is not supported"},
		{"broker outside experimental", "broker {}", nil, "agent.conf:1:1: broker: the broker block belongs inside the experimental block"},
		{"api_server cache", "experimental {\n  api_server {\n    cache { enabled = true }\n  }\n}", nil, "agent.conf:2:3: experimental.api_server: the api_server block (a controller-runtime cache for object references) is not supported by Lanyard"},
		{"unknown experimental key", "experimental {\n  brokr {}\n}", nil, `agent.conf:2:3: experimental.brokr: unknown key; did you mean "broker"?`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := tc.env
			if env == nil {
				env = map[string]string{}
			}
			_, _, err := buildAttestor(tc.hcl, env, nil)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("err = %v; want it to say %q", err, tc.want)
			}
		})
	}
	// Every error at once, one a line.
	_, _, err := buildAttestor("max_poll_attempts = -1\nmax_pod_list_size = -1\nexperimental {}", map[string]string{}, nil)
	if err == nil || strings.Count(err.Error(), "\n") < 1 {
		t.Errorf("want every error: %v", err)
	}
}

// SPIRE ignores these silently; Lanyard loads the config and says so.
func TestConfigWarnings(t *testing.T) {
	for _, tc := range []struct{ hcl, want string }{
		{"kubelet_read_only_port = 10255\ntoken_path = \"/t\"", "has no effect with kubelet_read_only_port: the read-only port is plain HTTP on 127.0.0.1 without authentication: key=token_path"},
		{"use_anonymous_authentication = true\ntoken_path = \"/t\"", "use_anonymous_authentication is set"},
		{"skip_kubelet_verification = true\nkubelet_ca_path = \"/ca\"", "kubelet_ca_path is not used"},
		{"use_new_container_locator = false", "use_new_container_locator = false has no effect"},
	} {
		_, logs, err := buildAttestor(tc.hcl, map[string]string{}, nil)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(logs.String(), tc.want) {
			t.Errorf("%q: log\n%s\nwant %q", tc.hcl, logs, tc.want)
		}
	}
}

func TestRegistered(t *testing.T) {
	reg, ok := attestor.Lookup(PluginName)
	if !ok || reg.InProcess {
		t.Fatalf("k8s is registered: %v, in process: %v; want a worker-goroutine attestor", ok, reg.InProcess)
	}
	sec, err := conf.NewSection("agent.conf", "")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := reg.New(attestor.PluginConfig{Name: PluginName, Data: sec}); err != nil {
		t.Fatal(err)
	}
}
