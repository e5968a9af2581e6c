// Package ha runs the lanyard binary against two real spire-servers on one
// PostgreSQL database behind one host name, as production SPIRE runs in
// high availability, and kills them under a workload that fetches every
// 100 ms.
package ha

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/lanyard-dev/lanyard/telemetry/metrictest"
	"github.com/lanyard-dev/lanyard/test/spire/spiretest"
)

// lanyardBin is the binary under test, built once by TestMain.
var lanyardBin string

func TestMain(m *testing.M) {
	if os.Getenv(spiretest.SkipEnv) == "1" {
		os.Exit(m.Run()) // the test skips itself
	}
	os.Exit(testkit.RunWithLanyard(m, func(bin string) error {
		lanyardBin = bin
		return nil
	}))
}

const (
	nodeID = "spiffe://example.org/ha/node"
	webID  = "spiffe://example.org/ha/web"
	web2ID = "spiffe://example.org/ha/web2"
	// SVID lifetimes: renewed at half-life, so each phase sees a renewal
	// within 50 s; long enough that SVIDs renewed just before the 20 s
	// outage outlive it, and the join-token agent, which cannot attest
	// again, never expires.
	svidTTL  = 90 * time.Second
	agentTTL = 90 * time.Second
	// outage is how long both servers stay down.
	outage = 20 * time.Second
	// syncInterval is the agent's. An entry made when a server returns
	// reaches the agent after the server's next entry cache reload (5 s)
	// and the agent's next sync: with spire-agent's default of 5 s that is
	// 10 s at worst without any outage, the whole bound; 2 s leaves room
	// for the outage's own cost, reconnecting (at most 2 s apart then).
	syncInterval = 2 * time.Second
)

// cluster is the servers by address, the agent and the workload.
type cluster struct {
	port    int
	servers map[string]*spiretest.Server
	agent   *agentNode
	web     *fetcher
}

// TestServersBehindOneName: the agent holds one connection, to one of the
// servers; killing that one costs the workload no fetch, and new entries,
// workload SVIDs and the agent SVID come through the other; then the same
// the other way round; then both are down for 20 s, no fetch fails, and
// within 10 s of one's return new entries reach workloads again. Last, a
// SIGHUP with a new server_address moves the agent to that server.
func TestServersBehindOneName(t *testing.T) {
	spiretest.Binaries(t) // skips with LANYARD_SKIP_INTEROP=1
	testkit.RequireRoot(t, "the agent runs in a mount namespace of its own; PostgreSQL runs as nobody")
	began := time.Now()
	c := startCluster(t)
	first := c.connectedServer(t, 60*time.Second)
	t.Logf("the agent uses %s; its connections to the servers: %v", first, c.agent.serverConns(t, c.port))
	second := c.other(first)

	c.survive(t, first, second, 10001)
	c.servers[first].Start()
	c.survive(t, second, first, 10002)

	// Both down.
	c.servers[first].Stop()
	down := time.Now()
	for time.Since(down) < outage {
		if _, failures, _ := c.web.state(); len(failures) > 0 {
			t.Fatalf("fetches failed with both servers down: %v", failures)
		}
		time.Sleep(time.Second)
	}
	c.servers[second].Start()
	back := time.Now()
	// A new entry for the running workload, which asks for nothing: only
	// the agent's own syncs bring it. Then a new workload's.
	c.servers[second].CreateEntry(t, nodeID, web2ID, "unix:uid:0")
	c.createEntry(t, second, 10003)
	testkit.WaitFor(t, 10*time.Second-time.Since(back), "a new entry to reach the running workload", func() bool { return c.web.has(web2ID) })
	t.Logf("both servers down for %s; %s returned, and a new entry reached the running workload %s later",
		back.Sub(down).Round(time.Second), second, time.Since(back).Round(100*time.Millisecond))
	c.agent.fetchAs(t, 10003, 10*time.Second-time.Since(back))
	t.Logf("and another reached a new workload %s after the return", time.Since(back).Round(100*time.Millisecond))
	c.waitConnectedTo(t, second, 10*time.Second)

	// SIGHUP with a server_address that names the server the agent does
	// not use: it moves there, no restart.
	c.servers[first].Start()
	c.agent.reload(t, hostName(first))
	reloaded := time.Now()
	c.waitConnectedTo(t, first, 15*time.Second)
	c.createEntry(t, first, 10004)
	c.agent.fetchAs(t, 10004, 15*time.Second)
	t.Logf("SIGHUP with server_address = %s: the agent moved to %s and served a new entry %s later", hostName(first), first, time.Since(reloaded).Round(100*time.Millisecond))

	ok, failures, _ := c.web.state()
	if len(failures) > 0 {
		t.Fatalf("%d of %d fetches failed: %v", len(failures), ok+len(failures), failures)
	}
	if logs := c.agent.proc.Logs.String(); strings.Contains(logs, "left the bundle") {
		t.Error("the agent took its SVID's CA, a root made moments before, for one that left the bundle")
	}
	// What an operator sees: the failovers counted, one connection, to the
	// server in use, and the server's answers.
	f := metrictest.Scrape(t, fmt.Sprintf("http://127.0.0.1:%d/metrics", c.agent.metrics))
	if v, _ := f.Value("lanyard_upstream_failovers_total", nil); v < 2 {
		t.Errorf("lanyard_upstream_failovers_total = %v after two servers were killed under the agent, want at least 2", v)
	}
	if v, ok := f.Value("lanyard_upstream_server_connections", map[string]string{"address": fmt.Sprintf("%s:%d", first, c.port)}); !ok || v != 1 {
		t.Errorf("lanyard_upstream_server_connections for %s = %v (%v), want 1; series: %s", first, v, ok, f.Labels("lanyard_upstream_server_connections"))
	}
	if v, _ := f.Value("lanyard_upstream_rpc_handled_total", map[string]string{"code": "OK"}); v == 0 {
		t.Errorf("no upstream call counted as OK; series: %s", f.Labels("lanyard_upstream_rpc_handled_total"))
	}
	t.Logf("%d fetches, none failed; the test took %s", ok, time.Since(began).Round(time.Second))
}

func startCluster(t *testing.T) *cluster {
	t.Helper()
	postgres := spiretest.StartPostgres(t).Database(t, "spire")
	certPath, keyPath, bundle := spiretest.WriteUpstreamRoot(t, "example.org")
	c := &cluster{servers: map[string]*spiretest.Server{}}
	ips := []string{"127.0.0.2", "127.0.0.3"}
	c.port = spiretest.SharedPort(t, ips)
	// One at a time: the first creates the datastore's schema.
	for _, ip := range ips {
		c.servers[ip] = spiretest.StartSharedServer(t, spiretest.SharedServer{
			BindIP: ip, Port: c.port, Postgres: postgres,
			UpstreamCert: certPath, UpstreamKey: keyPath, AgentTTL: agentTTL,
		})
	}
	s := c.servers[ips[0]]
	token := s.JoinToken(t, nodeID)
	s.CLI(t, "entry", "create", "-parentID", nodeID, "-spiffeID", webID, "-selector", "unix:uid:0", "-x509SVIDTTL", strconv.Itoa(int(svidTTL.Seconds())))
	c.agent = startAgent(t, ips, c.port, bundle, token)
	// The server learns the node alias at its next entry cache reload (5 s).
	c.agent.fetchAs(t, 0, 30*time.Second)
	c.web = startFetcher(t, c.agent.socket)
	return c
}

func (c *cluster) other(ip string) string {
	for o := range c.servers {
		if o != ip {
			return o
		}
	}
	return ""
}

// connectedServer waits until the agent holds exactly one connection to
// the servers, and returns that server's address.
func (c *cluster) connectedServer(t *testing.T, bound time.Duration) string {
	t.Helper()
	var used string
	testkit.WaitFor(t, bound, "the agent to hold one server connection", func() bool {
		conns := c.agent.serverConns(t, c.port)
		used = ""
		total := 0
		for ip, n := range conns {
			used, total = ip, total+n
		}
		return total == 1
	})
	return used
}

func (c *cluster) waitConnectedTo(t *testing.T, ip string, bound time.Duration) {
	t.Helper()
	if got := c.connectedServer(t, bound); got != ip {
		t.Fatalf("the agent is connected to %s, want %s", got, ip)
	}
}

// createEntry creates an entry for uid on server ip and returns its ID.
func (c *cluster) createEntry(t *testing.T, ip string, uid int) string {
	t.Helper()
	return c.servers[ip].CreateEntry(t, nodeID, fmt.Sprintf("spiffe://example.org/ha/new/%d", uid), fmt.Sprintf("unix:uid:%d", uid))
}

// survive kills the server the agent uses and checks that the workload
// never fails a fetch, that an entry made on the survivor reaches a new
// workload (uid) within 15 s, and that the workload's and the agent's
// SVIDs are renewed through the survivor.
func (c *cluster) survive(t *testing.T, dead, survivor string, uid int) {
	t.Helper()
	_, _, serial := c.web.state()
	renewals := strings.Count(c.agent.proc.Logs.String(), "Agent SVID renewed")
	c.servers[dead].Stop()
	killed := time.Now()
	c.createEntry(t, survivor, uid)
	created := time.Now()
	// The agent moves at its next call: a sync, at most sync_interval on.
	c.waitConnectedTo(t, survivor, 15*time.Second)
	t.Logf("killed %s: the agent connected to %s %s later", dead, survivor, time.Since(killed).Round(100*time.Millisecond))
	c.agent.fetchAs(t, uid, 15*time.Second-time.Since(created))
	t.Logf("a new entry made on %s reached a new workload within %s", survivor, time.Since(created).Round(100*time.Millisecond))

	testkit.WaitFor(t, agentTTL*6/10, "the workload's and the agent's SVIDs to be renewed", func() bool {
		_, _, now := c.web.state()
		return now != serial && strings.Count(c.agent.proc.Logs.String(), "Agent SVID renewed") > renewals
	})
	if got := c.connectedServer(t, 10*time.Second); got != survivor {
		t.Fatalf("the agent is connected to %s, want %s", got, survivor)
	}
	if _, failures, _ := c.web.state(); len(failures) > 0 {
		t.Fatalf("fetches failed after %s was killed: %v", dead, failures)
	}
	t.Logf("the workload's and the agent's SVIDs were renewed through %s %s after the kill", survivor, time.Since(killed).Round(time.Second))
}
