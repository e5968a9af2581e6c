package docker

import (
	"strings"
	"testing"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/attestor"
	"github.com/lanyard-dev/lanyard/conf"
	"github.com/lanyard-dev/lanyard/internal/testkit"
)

// build makes the attestor from plugin_data text; env stands for the
// environment (HOST_PROC).
func build(t *testing.T, body string, env map[string]string) (*Attestor, *testkit.Buffer, error) {
	t.Helper()
	sec, err := conf.NewSection("agent.conf", body)
	if err != nil {
		t.Fatal(err)
	}
	log, logs := testkit.NewLogger(hclog.Debug)
	a, err := newAttestor(attestor.PluginConfig{Name: PluginName, Data: sec, Log: log}, func(k string) string { return env[k] })
	return a, logs, err
}

func TestConfigDefaults(t *testing.T) {
	// No engine listens at the default socket here: New connects nothing.
	a, _, err := build(t, "", nil)
	if err != nil {
		t.Fatal(err)
	}
	if a.s.endpoint() != defaultSocketPath || a.s.apiVersion != "" || a.s.matchers != nil || a.s.verboseLog {
		t.Errorf("defaults: %+v", a.s)
	}
	if a.procRoot != "/proc" {
		t.Errorf("proc root %s", a.procRoot)
	}
}

func TestConfigEveryKey(t *testing.T) {
	a, _, err := build(t, `
		docker_socket_path = "unix:///run/podman/podman.sock"
		docker_version = "1.41"
		use_new_container_locator = true
		verbose_container_locator_logs = true
	`, map[string]string{"HOST_PROC": "/host/proc"})
	if err != nil {
		t.Fatal(err)
	}
	if a.s.socketPath != "/run/podman/podman.sock" || a.s.apiVersion != "1.41" || !a.s.verboseLog || a.procRoot != "/host/proc" {
		t.Errorf("settings %+v, proc root %s", a.s, a.procRoot)
	}
}

func TestConfigLegacyMatchers(t *testing.T) {
	a, logs, err := build(t, `
		use_new_container_locator = false
		container_id_cgroup_matchers = ["/docker/<id>", "/my.slice/*/<id>/*"]
	`, nil)
	if err != nil {
		t.Fatal(err)
	}
	if a.s.matchers == nil || len(a.s.matchers.patterns) != 2 {
		t.Fatalf("matchers %+v", a.s.matchers)
	}
	if !strings.Contains(logs.String(), "legacy container locator") {
		t.Errorf("no warning about the legacy locator:\n%s", logs)
	}
	a, logs, err = build(t, `use_new_container_locator = false`, nil)
	if err != nil || a.s.matchers != nil || !strings.Contains(logs.String(), "using the new container locator") {
		t.Errorf("use_new_container_locator = false alone: err %v, matchers %v, logs:\n%s", err, a.s.matchers, logs)
	}
}

func TestConfigErrors(t *testing.T) {
	for _, tc := range []struct{ body, want string }{
		{`container_id_cgroup_matchers = ["/docker/<id>"]`, `agent.conf:1:1: container_id_cgroup_matchers: the new container locator (the default) and custom cgroup matchers cannot both be used`},
		{"use_new_container_locator = true\ncontainer_id_cgroup_matchers = [\"/docker/<id>\"]", "cannot both be used"},
		{"use_new_container_locator = false\ncontainer_id_cgroup_matchers = [\"/a/b/<id>\", \"/*/b/<id>\"]", "ambiguous"},
		{"use_new_container_locator = false\ncontainer_id_cgroup_matchers = [\"/docker/x\"]", `must contain the container ID token "<id>" exactly once`},
		{"experimental {\n  sigstore {\n    ignore_tlog = true\n  }\n}", "agent.conf:1:1: experimental: the experimental block (sigstore image signature verification) is not supported by Lanyard"},
		{`docker_host = "npipe:////./pipe/docker_engine"`, "docker_host is SPIRE's Windows-only key"},
		{`docker_socket_path = "tcp://127.0.0.1:2375"`, "tcp:// is not supported"},
		{`docker_socket_path = "unix://var/run/docker.sock"`, "three slashes"},
		{`docker_socket_path = "docker.sock"`, "want unix:///path/to/engine.sock"},
		{`docker_version = "latest"`, `"latest" is not an Engine API version`},
		{`docker_sock = "/x"`, "unknown key"},
	} {
		_, _, err := build(t, tc.body, nil)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s:\n got %v\nwant %q", tc.body, err, tc.want)
		}
	}
}

func TestConfigBareSocketPath(t *testing.T) {
	a, _, err := build(t, `docker_socket_path = "/run/docker.sock"`, nil)
	if err != nil || a.s.socketPath != "/run/docker.sock" {
		t.Fatalf("err %v, settings %+v", err, a.s)
	}
}
