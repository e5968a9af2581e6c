package conf

import (
	"strings"
	"testing"
)

// brokerConf is spire-agent's documented experimental.broker example, with
// Lanyard's socket paths.
const brokerConf = `agent {
  trust_domain = "example.org"
  socket_path = "/run/lanyard/public/api.sock"
  admin_socket_path = "/run/lanyard/private/admin.sock"
  experimental {
    broker {
      socket_path  = "/run/lanyard/broker/broker.sock"
      bind_address = "0.0.0.0:8443"
      brokers = [
        {
          id = "spiffe://example.org/some/broker"
          allowed_reference_types = [
            { type_url = "type.googleapis.com/spiffe.broker.WorkloadPIDReference" },
            {
              type_url = "type.googleapis.com/spiffe.broker.KubernetesObjectReference"
              allow_over_tcp = true
            },
          ]
        },
        {
          id = "spiffe://other.org/wildcard/broker"
          allowed_reference_types = [{ type_url = "*" }]
        },
      ]
    }
  }
}
`

func TestBrokerBlock(t *testing.T) {
	cfg, err := Parse("b.conf", []byte(brokerConf))
	if err != nil {
		t.Fatal(err)
	}
	b := cfg.Agent.Broker
	if b == nil {
		t.Fatal("no broker")
	}
	if b.SocketPath != "/run/lanyard/broker/broker.sock" || b.BindAddress != "0.0.0.0:8443" || len(b.Brokers) != 2 {
		t.Fatalf("broker = %+v", b)
	}
	first := b.Brokers[0]
	want := []AllowedReferenceType{{TypeURL: PIDReferenceType}, {TypeURL: KubernetesReferenceType, AllowOverTCP: true}}
	if first.ID.String() != "spiffe://example.org/some/broker" || len(first.AllowedReferenceTypes) != 2 ||
		first.AllowedReferenceTypes[0] != want[0] || first.AllowedReferenceTypes[1] != want[1] {
		t.Errorf("first broker = %+v", first)
	}
	// Brokers of another trust domain are allowed, as in SPIRE.
	if second := b.Brokers[1]; second.ID.TrustDomain().Name() != "other.org" || second.AllowedReferenceTypes[0].TypeURL != AnyReferenceType {
		t.Errorf("second broker = %+v", second)
	}

	for _, text := range []string{
		"agent {\n  trust_domain = \"example.org\"\n}",
		"agent {\n  trust_domain = \"example.org\"\n  experimental {}\n}",
	} {
		cfg, err := Parse("b.conf", []byte(text))
		if err != nil || cfg.Agent.Broker != nil {
			t.Errorf("%q: broker %+v, %v; want none", text, cfg.Agent.Broker, err)
		}
	}
	// One transport is enough.
	cfg, err = Parse("b.conf", []byte(brokerBody(`bind_address = "127.0.0.1:8443"`, okBrokers)))
	if err != nil || cfg.Agent.Broker.SocketPath != "" {
		t.Errorf("TCP only: %+v, %v", cfg.Agent.Broker, err)
	}
}

const okBrokers = `brokers = [{ id = "spiffe://example.org/b", allowed_reference_types = [{ type_url = "*" }] }]`

// brokerBody is an agent block whose broker block has lines.
func brokerBody(lines ...string) string {
	return "agent {\n  trust_domain = \"example.org\"\n  socket_path = \"/run/lanyard/public/api.sock\"\n  admin_socket_path = \"/run/lanyard/private/admin.sock\"\n  experimental {\n    broker {\n      " +
		strings.Join(lines, "\n      ") + "\n    }\n  }\n}"
}

func TestBrokerBlockErrors(t *testing.T) {
	const sock = `socket_path = "/run/lanyard/broker/b.sock"`
	tests := []struct {
		name string
		text string
		want string
	}{
		{"no transport", brokerBody(okBrokers), "b.conf:6:5: agent.experimental.broker: the broker endpoint needs socket_path, bind_address, or both"},
		{"no brokers", brokerBody(sock), "b.conf:6:5: agent.experimental.broker: brokers is missing: list at least one broker"},
		{"empty brokers", brokerBody(sock, `brokers = []`), "b.conf:6:5: agent.experimental.broker: brokers is missing"},
		{"socket beside the Workload API's", brokerBody(`socket_path = "/run/lanyard/public/broker.sock"`, okBrokers), "b.conf:7:7: agent.experimental.broker.socket_path: broker socket \"/run/lanyard/public/broker.sock\" is in the directory of socket_path"},
		{"socket below the Workload API's", brokerBody(`socket_path = "/run/lanyard/public/b/broker.sock"`, okBrokers), "b.conf:7:7: agent.experimental.broker.socket_path: broker socket \"/run/lanyard/public/b/broker.sock\" is in the directory of socket_path"},
		{"socket is the admin socket", brokerBody(`socket_path = "/run/lanyard/private/../private/admin.sock"`, okBrokers), "b.conf:7:7: agent.experimental.broker.socket_path: broker socket \"/run/lanyard/private/../private/admin.sock\" is the admin socket"},
		{"bind address without port", brokerBody(`bind_address = "127.0.0.1"`, okBrokers), "b.conf:7:7: agent.experimental.broker.bind_address: bind_address \"127.0.0.1\" is not host:port"},
		{"bind address port 0", brokerBody(`bind_address = "127.0.0.1:0"`, okBrokers), "b.conf:7:7: agent.experimental.broker.bind_address: bind_address \"127.0.0.1:0\" has port \"0\"; use a number from 1 to 65535"},
		{"bind address named port", brokerBody(`bind_address = ":https"`, okBrokers), "has port \"https\""},
		{"broker without id", brokerBody(sock, `brokers = [{ allowed_reference_types = [{ type_url = "*" }] }]`), "b.conf:8:18: agent.experimental.broker.brokers[0]: id is missing"},
		{"broker id not a SPIFFE ID", brokerBody(sock, `brokers = [{ id = "example.org/b", allowed_reference_types = [{ type_url = "*" }] }]`), "b.conf:8:20: agent.experimental.broker.brokers[0].id: invalid SPIFFE ID \"example.org/b\""},
		{"broker listed twice", brokerBody(sock, `brokers = [`, `  { id = "spiffe://example.org/b", allowed_reference_types = [{ type_url = "*" }] },`, `  { id = "spiffe://example.org/b", allowed_reference_types = [{ type_url = "*" }] },`, `]`), "b.conf:10:11: agent.experimental.broker.brokers[1].id: broker \"spiffe://example.org/b\" is listed twice (first as brokers[0])"},
		{"no allowed types", brokerBody(sock, `brokers = [{ id = "spiffe://example.org/b" }]`), "b.conf:8:18: agent.experimental.broker.brokers[0]: allowed_reference_types is missing: list at least one"},
		{"empty allowed types", brokerBody(sock, `brokers = [{ id = "spiffe://example.org/b", allowed_reference_types = [] }]`), "agent.experimental.broker.brokers[0]: allowed_reference_types is missing"},
		{"type without url", brokerBody(sock, `brokers = [{ id = "spiffe://example.org/b", allowed_reference_types = [{ allow_over_tcp = true }] }]`), "b.conf:8:78: agent.experimental.broker.brokers[0].allowed_reference_types[0]: type_url is missing"},
		{"wildcard not alone", brokerBody(sock, `brokers = [{ id = "spiffe://example.org/b", allowed_reference_types = [`, `  { type_url = "type.googleapis.com/spiffe.broker.WorkloadPIDReference" },`, `  { type_url = "*" },`, `] }]`), "b.conf:10:11: agent.experimental.broker.brokers[0].allowed_reference_types[1].type_url: the wildcard \"*\" must be the only allowed reference type"},
		{"unknown type", brokerBody(sock, `brokers = [{ id = "spiffe://example.org/b", allowed_reference_types = [{ type_url = "type.googleapis.com/spiffe.broker.WorkloadPidReference" }] }]`), "agent.experimental.broker.brokers[0].allowed_reference_types[0].type_url: unknown reference type \"type.googleapis.com/spiffe.broker.WorkloadPidReference\""},
		{"type listed twice", brokerBody(sock, `brokers = [{ id = "spiffe://example.org/b", allowed_reference_types = [`, `  { type_url = "type.googleapis.com/spiffe.broker.WorkloadPIDReference" },`, `  { type_url = "type.googleapis.com/spiffe.broker.WorkloadPIDReference", allow_over_tcp = true },`, `] }]`), "b.conf:10:11: agent.experimental.broker.brokers[0].allowed_reference_types[1].type_url: reference type \"type.googleapis.com/spiffe.broker.WorkloadPIDReference\" is listed twice"},
		{"allow_over_tcp not bool", brokerBody(sock, `brokers = [{ id = "spiffe://example.org/b", allowed_reference_types = [{ type_url = "*", allow_over_tcp = "yes" }] }]`), "allowed_reference_types[0].allow_over_tcp: want true or false"},
		{"unknown broker key", brokerBody(sock, okBrokers, `socket_pth = "x"`), "b.conf:9:7: agent.experimental.broker.socket_pth: unknown key; did you mean \"socket_path\"?"},
		{"unknown broker entry key", brokerBody(sock, `brokers = [{ id = "spiffe://example.org/b", allowed_types = [] }]`), "agent.experimental.broker.brokers[0].allowed_types: unknown key"},
		{"other spire experimental key", "agent {\n  trust_domain = \"example.org\"\n  experimental {\n    require_pq_kem = true\n  }\n}", "b.conf:4:5: agent.experimental.require_pq_kem: spire-agent key experimental.require_pq_kem is not supported by Lanyard (of experimental, only broker is)"},
		{"unknown experimental key", "agent {\n  trust_domain = \"example.org\"\n  experimental {\n    brokr {}\n  }\n}", "b.conf:4:5: agent.experimental.brokr: unknown key; did you mean \"broker\"?"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse("b.conf", []byte(tt.text))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("config:\n%s\ngot  %v\nwant %s", tt.text, err, tt.want)
			}
		})
	}
}
