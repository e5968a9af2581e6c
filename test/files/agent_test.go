package files

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// appID is the SPIFFE ID the agent gives every process of the test's uid:
// the helper, and the test's own clients.
var appID = spiffeid.RequireFromString("spiffe://example.org/app")

// svidTTL is short so that the agent renews SVIDs (at about half their
// life) every few seconds: three rotations fit in a test.
const svidTTL = "6s"

// agentConfig is an agent on its embedded CA that gives appID to uid %[3]d:
// %[1]s data dir, %[2]s socket.
const agentConfig = `agent {
    trust_domain = "example.org"
    data_dir = %[1]q
    socket_path = %[2]q
}
plugins {
    WorkloadAttestor "unix" {
        plugin_data {}
    }
    UpstreamAuthority "local" {
        plugin_data {
            x509_svid_ttl = %[4]q
            jwt_svid_ttl = %[4]q
            entry {
                spiffe_id = %[5]q
                selectors = ["unix:uid:%[3]d"]
                dns_names = ["localhost"]
            }
        }
    }
}
`

// startAgent runs a lanyard agent until it serves and returns its socket.
func startAgent(t *testing.T) string {
	t.Helper()
	dir := testkit.ShortDir(t, "ly-files-")
	socket := filepath.Join(dir, "api.sock")
	conf := filepath.Join(dir, "agent.conf")
	body := fmt.Sprintf(agentConfig, filepath.Join(dir, "data"), socket, os.Getuid(), svidTTL, appID)
	if err := os.WriteFile(conf, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	p, err := testkit.Start(t, lanyardBin, "run", "-config", conf)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.WaitServing(socket, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	return socket
}
