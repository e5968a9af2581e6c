// Package interop runs the lanyard binary as the node agent of a real
// spire-server (built by test/spire) and checks, with go-spiffe's client
// and with spire-agent's CLI, that workloads cannot tell it from
// spire-agent.
package interop

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/lanyard-dev/lanyard/test/spire/spiretest"
)

// lanyardBin is the binary under test, built once by TestMain.
var lanyardBin string

func TestMain(m *testing.M) {
	os.Exit(runTests(m))
}

func runTests(m *testing.M) int {
	if os.Getenv(spiretest.SkipEnv) == "1" {
		// Every test here needs SPIRE; they skip themselves.
		return m.Run()
	}
	return testkit.RunWithLanyard(m, func(bin string) error {
		lanyardBin = bin
		return nil
	})
}

// node is a lanyard agent's files: its config, data and socket.
type node struct {
	t      *testing.T
	dir    string
	config string
	socket string
	data   string
	bundle string
}

// agentConf is a spire-agent config as SPIRE's docs write it; Lanyard must
// run it unchanged. %[1]s is the node's dir, %[2]s the server's port,
// %[3]s the socket, %[4]s extra agent keys, %[5]s the key manager.
const agentConf = `agent {
    data_dir = "%[1]s/data"
    log_level = "DEBUG"
    server_address = "127.0.0.1"
    server_port = "%[2]s"
    socket_path = "%[3]s"
    trust_bundle_path = "%[1]s/bundle.pem"
    trust_domain = "example.org"
%[4]s}

plugins {
    NodeAttestor "join_token" {
        plugin_data {}
    }
    KeyManager %[5]s
    WorkloadAttestor "unix" {
        plugin_data {}
    }
}
`

const (
	diskKeys   = `"disk" { plugin_data { directory = "./keys" } }`
	memoryKeys = `"memory" { plugin_data {} }`
)

// newNode writes an agent.conf for server s. extra goes into the agent
// block; keys is the KeyManager block.
func newNode(t *testing.T, s *spiretest.Server, extra, keys string) *node {
	t.Helper()
	dir := testkit.ShortDir(t, "lyi-")
	n := &node{t: t, dir: dir, config: filepath.Join(dir, "agent.conf"), socket: filepath.Join(dir, "api.sock"),
		data: filepath.Join(dir, "data"), bundle: filepath.Join(dir, "bundle.pem")}
	if err := os.WriteFile(n.bundle, s.BundlePEM(t), 0o600); err != nil {
		t.Fatal(err)
	}
	_, port, err := net.SplitHostPort(s.Addr)
	if err != nil {
		t.Fatal(err)
	}
	keys = strings.ReplaceAll(keys, "./keys", filepath.Join(dir, "keys"))
	body := fmt.Sprintf(agentConf, dir, port, n.socket, extra, keys)
	if err := os.WriteFile(n.config, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return n
}

// lanyard is a running lanyard process.
type lanyard struct {
	*testkit.Process
	logs *testkit.Buffer
}

// start runs `lanyard run -config <n.config> args...` and waits until it
// serves, failing the test if it does not within the bound.
func (n *node) start(args ...string) *lanyard {
	n.t.Helper()
	l, err := n.run(args...)
	if err != nil {
		n.t.Fatal(err)
	}
	if err := l.WaitServing(n.socket, 60*time.Second); err != nil {
		n.t.Fatal(err)
	}
	return l
}

// run starts lanyard without waiting for it.
func (n *node) run(args ...string) (*lanyard, error) {
	p, err := testkit.Start(n.t, lanyardBin, append([]string{"run", "-config", n.config}, args...)...)
	if err != nil {
		return nil, err
	}
	return &lanyard{Process: p, logs: p.Logs}, nil
}

func (l *lanyard) stop() { l.Stop() }

// startServing starts a server that reloads its entry cache every second
// with an entry for id, and a lanyard node on it (fast sync, keys on disk)
// that serves id.
func startServing(t *testing.T, id string, opts ...spiretest.ServerOption) (*spiretest.Server, *node, *lanyard) {
	t.Helper()
	s := spiretest.StartServer(t, append(opts, spiretest.WithCacheReloadInterval(time.Second))...)
	createEntry(t, s, id)
	n := newNode(t, s, fastSync, diskKeys)
	l := n.start("-joinToken", s.JoinToken(t, nodeID))
	fetchID(t, n.socket, id)
	return s, n, l
}

var (
	waitFor     = testkit.WaitFor
	testContext = testkit.Context
)
