package k8s_test

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/lanyard-dev/lanyard/test/k8s/k8stest"
	"github.com/lanyard-dev/lanyard/test/spire/spiretest"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// psatAgentConfig is spire-agent's config for k8s_psat as SPIRE's docs
// write it: %[1]s dir, %[2]s server port, %[3]s socket, %[4]s token path.
const psatAgentConfig = `agent {
    data_dir = "%[1]s/data"
    server_address = "127.0.0.1"
    server_port = "%[2]s"
    socket_path = "%[3]s"
    trust_bundle_path = "%[1]s/bundle.pem"
    trust_domain = "example.org"
}
plugins {
    NodeAttestor "k8s_psat" {
        plugin_data {
            cluster = "lanyard-test"
            token_path = "%[4]s"
        }
    }
    KeyManager "memory" {
        plugin_data {}
    }
    WorkloadAttestor "unix" {
        plugin_data {}
    }
}
`

// TestK8sPSATNodeAttestation: Lanyard node-attests with the projected
// token of its pod to a real spire-server, whose k8s_psat plugin reviews it
// with the real kube-apiserver; a token of a service account the server
// does not allow is refused, and Lanyard exits with the server's reason.
func TestK8sPSATNodeAttestation(t *testing.T) {
	c := k8stest.Start(t)
	server := spiretest.StartServer(t, spiretest.WithNodeAttestor("k8s_psat", fmt.Sprintf(`
            clusters = {
                "lanyard-test" = {
                    service_account_allow_list = ["%s:%s"]
                    kube_config_file = %q
                }
            }`, k8stest.AgentNamespace, k8stest.AgentServiceAccount, c.KubeconfigFor(k8stest.AgentNamespace, k8stest.ServerServiceAccount))))
	agentID := "spiffe://example.org/spire/agent/k8s_psat/lanyard-test/" + c.NodeUID()
	server.CreateEntry(t, agentID, "spiffe://example.org/psat-workload", "unix:uid:0")

	// The pods the tokens are bound to, as a DaemonSet's pod would be.
	agentPod := c.CreatePod(k8stest.PodSpec{Name: "lanyard-agent", Namespace: k8stest.AgentNamespace,
		ServiceAccount: k8stest.AgentServiceAccount, Args: []string{"sleep"}}.Manifest())
	otherPod := c.CreatePod(k8stest.PodSpec{Name: "not-an-agent", ServiceAccount: "default", Args: []string{"sleep"}}.Manifest())
	c.WaitRunning(agentPod)
	c.WaitRunning(otherPod)

	start := func(t *testing.T, token string) (*testkit.Process, string) {
		dir := t.TempDir()
		if err := os.WriteFile(filepath.Join(dir, "bundle.pem"), server.BundlePEM(t), 0o600); err != nil {
			t.Fatal(err)
		}
		tokenPath := filepath.Join(dir, "token")
		if err := os.WriteFile(tokenPath, []byte(token), 0o600); err != nil {
			t.Fatal(err)
		}
		_, port, err := net.SplitHostPort(server.Addr)
		if err != nil {
			t.Fatal(err)
		}
		socket := filepath.Join(testkit.ShortDir(t, "psat"), "api.sock")
		conf := filepath.Join(dir, "agent.conf")
		if err := os.WriteFile(conf, []byte(fmt.Sprintf(psatAgentConfig, dir, port, socket, tokenPath)), 0o600); err != nil {
			t.Fatal(err)
		}
		p, err := testkit.Start(t, lanyardBin, "run", "-config", conf)
		if err != nil {
			t.Fatal(err)
		}
		return p, socket
	}

	t.Run("the agent's service account is attested", func(t *testing.T) {
		p, socket := start(t, c.Token(k8stest.AgentNamespace, k8stest.AgentServiceAccount, "spire-server", agentPod.Name))
		if err := p.WaitServing(socket, 60*time.Second); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		var got string
		testkit.WaitFor(t, 30*time.Second, "the entry parented to the k8s_psat agent ID", func() bool {
			svid, err := workloadapi.FetchX509SVID(ctx, workloadapi.WithAddr("unix://"+socket))
			if err == nil {
				got = svid.ID.String()
			}
			return err == nil
		})
		if got != "spiffe://example.org/psat-workload" {
			t.Errorf("got %s, want the entry of agent %s", got, agentID)
		}
		if !strings.Contains(p.Logs.String(), agentID) {
			t.Errorf("the log does not name the agent ID %s:\n%s", agentID, p.Logs.String())
		}

		// k8s_psat is re-attestable: evicted, the agent attests again with
		// its token instead of giving up.
		server.CLI(t, "agent", "evict", "-spiffeID", agentID)
		testkit.WaitFor(t, 60*time.Second, "the evicted agent to attest again", func() bool {
			return strings.Contains(p.Logs.String(), "Agent SVID re-attested")
		})
		if _, err := workloadapi.FetchX509SVID(ctx, workloadapi.WithAddr("unix://"+socket)); err != nil {
			t.Errorf("after re-attestation: %v", err)
		}
	})
	t.Run("another service account is refused", func(t *testing.T) {
		p, _ := start(t, c.Token("default", "default", "spire-server", otherPod.Name))
		select {
		case <-p.Exited:
		case <-time.After(60 * time.Second):
			t.Fatalf("lanyard kept running with a refused token:\n%s", p.Logs.String())
		}
		if p.ExitErr == nil {
			t.Errorf("lanyard exited 0 after the server refused its token")
		}
		if logs := p.Logs.String(); !strings.Contains(logs, "is not an allowed service account") {
			t.Errorf("lanyard's log does not carry the server's reason:\n%s", logs)
		}
	})
	c.DeletePod(agentPod)
	c.DeletePod(otherPod)
}
