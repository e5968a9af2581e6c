package k8s

import (
	"maps"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// experimental.broker is validated as SPIRE validates it, each error at
// its key.
func TestConfigBroker(t *testing.T) {
	a := spiffeid.RequireFromString("spiffe://example.org/a")
	b := spiffeid.RequireFromString("spiffe://example.org/b")
	for _, tc := range []struct {
		name, hcl string
		want      *brokerPolicy
		errs      []string
	}{
		{name: "no block", hcl: ""},
		{name: "empty experimental", hcl: "experimental {}"},
		{name: "enforced, scopes", hcl: `experimental { broker {
			access_policy = "enforced"
			brokers = [
				{ id = "spiffe://example.org/a" },
				{ id = "spiffe://example.org/b", pod_reference_scope = "cluster" },
			]
		} }`, want: &brokerPolicy{enforced: true, scopes: map[spiffeid.ID]string{a: scopeAgentNode, b: scopeCluster}}},
		{name: "permissive, repeated blocks", hcl: `experimental { broker {
			access_policy = "permissive"
			brokers { id = "spiffe://example.org/a"
				pod_reference_scope = "agent_node" }
			brokers { id = "spiffe://example.org/b" }
		} }`, want: &brokerPolicy{scopes: map[spiffeid.ID]string{a: scopeAgentNode, b: scopeAgentNode}}},
		{name: "empty block", hcl: "experimental {\n  broker {}\n}", errs: []string{
			"agent.conf:2:3: experimental.broker.access_policy: missing: set access_policy = \"enforced\"",
			"agent.conf:2:3: experimental.broker.brokers: missing or empty",
		}},
		{name: "bad policy", hcl: "experimental { broker {\n  access_policy = \"Enforced\"\n  brokers = [{ id = \"spiffe://example.org/a\" }]\n} }", errs: []string{
			`agent.conf:2:3: experimental.broker.access_policy: "Enforced" is not an access policy: use "enforced" or "permissive"`,
		}},
		{name: "empty list", hcl: "experimental { broker {\n  access_policy = \"permissive\"\n  brokers = []\n} }", errs: []string{
			// An empty list has no element to point at: the block it is in.
			"agent.conf:1:16: experimental.broker.brokers: missing or empty",
		}},
		{name: "bad entries", hcl: `experimental { broker {
  access_policy = "permissive"
  brokers = [
    { pod_reference_scope = "cluster" },
    { id = "spiffe://example.org/a" },
    { id = "spiffe://example.org/a", pod_reference_scope = "cluster" },
    { id = "example.org/c" },
    { id = "spiffe://example.org/d", pod_reference_scope = "node" },
    { id = "spiffe://example.org/e", scope = "cluster" },
  ]
} }`, errs: []string{
			"agent.conf:4:5: experimental.broker.brokers[0].id: missing",
			"agent.conf:6:7: experimental.broker.brokers[2].id: broker spiffe://example.org/a is listed twice",
			`agent.conf:7:7: experimental.broker.brokers[3].id: "example.org/c" is not a SPIFFE ID: scheme is missing or invalid`,
			`agent.conf:8:38: experimental.broker.brokers[4].pod_reference_scope: "node" is not a pod reference scope`,
			`agent.conf:9:38: experimental.broker.brokers[5].scope: unknown key`,
		}},
		{name: "unknown key", hcl: "experimental { broker {\n  access_policy = \"permissive\"\n  policy = 1\n  brokers = [{ id = \"spiffe://example.org/a\" }]\n} }", errs: []string{
			"agent.conf:3:3: experimental.broker.policy: unknown key",
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			att, _, err := buildAttestor(tc.hcl, map[string]string{}, nil)
			if len(tc.errs) > 0 {
				if err == nil {
					t.Fatalf("no error; want %q", tc.errs)
				}
				for _, want := range tc.errs {
					if !strings.Contains(err.Error(), want) {
						t.Errorf("error\n%v\nlacks %q", err, want)
					}
				}
				if n := strings.Count(err.Error(), "\n") + 1; n != len(tc.errs) {
					t.Errorf("%d errors, want %d:\n%v", n, len(tc.errs), err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			got := att.s.broker
			if (got == nil) != (tc.want == nil) || got != nil && (got.enforced != tc.want.enforced || !maps.Equal(got.scopes, tc.want.scopes)) {
				t.Errorf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}

// The API server is needed for "enforced" or a "cluster" broker; outside
// a pod the config loads and says that those references will fail.
func TestConfigBrokerOutsideAPod(t *testing.T) {
	for _, tc := range []struct {
		policy, scope string
		warn          bool
	}{{"permissive", "agent_node", false}, {"permissive", "cluster", true}, {"enforced", "agent_node", true}} {
		hcl := `experimental { broker {
			access_policy = "` + tc.policy + `"
			brokers = [{ id = "spiffe://example.org/a", pod_reference_scope = "` + tc.scope + `" }]
		} }`
		_, logs, err := buildAttestor(hcl, map[string]string{}, nil)
		if err != nil {
			t.Fatal(err)
		}
		if got := strings.Contains(logs.String(), "KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are not set"); got != tc.warn {
			t.Errorf("%s/%s: warned %v, want %v:\n%s", tc.policy, tc.scope, got, tc.warn, logs)
		}
	}
}

// disable_kubelet_client refuses every kubelet setting and a broker of
// scope agent_node, as SPIRE does.
func TestConfigDisableKubeletClient(t *testing.T) {
	att, _, err := buildAttestor(`disable_kubelet_client = true
		experimental { broker {
			access_policy = "permissive"
			brokers = [{ id = "spiffe://example.org/a", pod_reference_scope = "cluster" }]
		} }`, map[string]string{}, nil)
	if err != nil || !att.s.noKubelet {
		t.Fatalf("%v, noKubelet %v", err, att != nil && att.s.noKubelet)
	}
	_, _, err = buildAttestor(`disable_kubelet_client = true
kubelet_secure_port = 10250
token_path = "/t"
reload_interval = "1m"
experimental { broker {
  access_policy = "permissive"
  brokers = [
    { id = "spiffe://example.org/a" },
    { id = "spiffe://example.org/b", pod_reference_scope = "cluster" },
  ]
} }`, map[string]string{}, nil)
	want := []string{
		"agent.conf:2:1: kubelet_secure_port: cannot be used with disable_kubelet_client = true",
		"agent.conf:3:1: token_path: cannot be used with disable_kubelet_client = true",
		"agent.conf:4:1: reload_interval: cannot be used with disable_kubelet_client = true",
		`agent.conf:8:5: experimental.broker.brokers[0].pod_reference_scope: must be "cluster" with disable_kubelet_client = true`,
	}
	if err == nil {
		t.Fatal("no error")
	}
	for _, w := range want {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error\n%v\nlacks %q", err, w)
		}
	}
	if n := strings.Count(err.Error(), "\n") + 1; n != len(want) {
		t.Errorf("%d errors, want %d:\n%v", n, len(want), err)
	}
}
