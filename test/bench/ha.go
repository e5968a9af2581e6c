package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/lanyard-dev/lanyard/test/spire/spiretest"
	"golang.org/x/sync/errgroup"
)

// The SPIRE-HA section: two spire-servers on one PostgreSQL database
// behind one host name, as production SPIRE runs in high availability.
// Agents of one kind at a time attest to a fresh pair (a fresh database),
// so that the servers' connections and RSS are theirs alone; then one
// agent of each kind rides through kills of the server Lanyard uses.
// Agents resolve the name to both servers through a private /etc/hosts:
// each runs in a mount namespace of its own (unshare -m) where it is
// bind-mounted, and the rest of the machine is untouched.

const (
	haServerName = "spire-ha.test"
	haNodeID     = "spiffe://example.org/bench/ha-node"
	haWorkloadID = "spiffe://example.org/bench/ha-workload"
	// haSyncInterval is both agents' default sync_interval (SPIRE's and
	// Lanyard's), which the section keeps: it bounds how soon an agent
	// notices a dead server.
	haSyncInterval = 5 * time.Second
	// haSettle is how long the agents run after the last one has its
	// SVID, before connections and RSS are read: two syncs each.
	haSettle = 2 * haSyncInterval
	// haTokenWorkers generate join tokens at once (CLI processes).
	haTokenWorkers = 4
)

// haServerIPs are the servers' addresses, on one port.
var haServerIPs = []string{"127.0.0.2", "127.0.0.3"}

// haAgentConf is the agent.conf of both kinds (Lanyard runs spire-agent's
// config unchanged): %[1]s the agent's dir, %[2]d the servers' port, %[3]s
// the join token, %[4]s the plugins block, %[5]s the log level.
const haAgentConf = `agent {
    data_dir = "%[1]s/data"
    log_level = "%[5]s"
    log_format = "json"
    server_address = "` + haServerName + `"
    server_port = "%[2]d"
    socket_path = "%[1]s/api.sock"
    trust_bundle_path = "%[1]s/bundle.pem"
    trust_domain = "example.org"
    join_token = "%[3]s"
}

%[4]s`

// haCluster is a pair of spire-servers on one database.
type haCluster struct {
	tb      testing.TB
	port    int
	servers map[string]*spiretest.Server // by IP
	bundle  []byte
	dnsDir  string // the agents' hosts and resolv.conf
	binDir  string // spire-agent's
}

// haShared is what every cluster of the section shares.
type haShared struct {
	pg                 *spiretest.Postgres
	rootCert, rootKey  string
	bundle             []byte
	dnsDir             string
	databases          int
	lanyardBin, binDir string
}

func (r *run) newHAShared() *haShared {
	tb := r.tb
	r.logf("HA: starting PostgreSQL")
	h := &haShared{pg: spiretest.StartPostgres(tb), lanyardBin: r.cfg.LanyardBin, binDir: spiretest.Binaries(tb)}
	h.rootCert, h.rootKey, h.bundle = spiretest.WriteUpstreamRoot(tb, "example.org")
	h.dnsDir = testkit.ShortDir(tb, "lyhabdns-")
	hosts := "127.0.0.1 localhost\n"
	for _, ip := range haServerIPs {
		hosts += ip + " " + haServerName + "\n"
	}
	writeFile(tb, filepath.Join(h.dnsDir, "hosts"), hosts)
	// Nothing listens there: a lookup that reaches DNS fails at once.
	writeFile(tb, filepath.Join(h.dnsDir, "resolv.conf"), "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
	return h
}

// cluster starts two servers on a new database, one at a time (the first
// creates the schema), and the workload entry every agent serves.
func (h *haShared) cluster(tb testing.TB) *haCluster {
	h.databases++
	db := h.pg.Database(tb, fmt.Sprintf("spire%d", h.databases))
	c := &haCluster{tb: tb, port: spiretest.SharedPort(tb, haServerIPs), servers: map[string]*spiretest.Server{},
		bundle: h.bundle, dnsDir: h.dnsDir, binDir: h.binDir}
	for _, ip := range haServerIPs {
		c.servers[ip] = spiretest.StartSharedServer(tb, spiretest.SharedServer{
			BindIP: ip, Port: c.port, Postgres: db, UpstreamCert: h.rootCert, UpstreamKey: h.rootKey,
		})
	}
	c.servers[haServerIPs[0]].CreateEntry(tb, haNodeID, haWorkloadID, fmt.Sprintf("unix:uid:%d", os.Getuid()))
	return c
}

// stop kills the servers that still run.
func (c *haCluster) stop() {
	for _, s := range c.servers {
		if s.Running() {
			s.Stop()
		}
	}
}

// serverProc is the running server at ip.
func (c *haCluster) serverProc(ip string) (Proc, error) {
	pid, err := SocketOwner(c.servers[ip].SocketPath)
	return Proc{PID: pid}, err
}

// joinTokens makes n join tokens for haNodeID, several CLI calls at once.
func (c *haCluster) joinTokens(n int) ([]string, error) {
	s := c.servers[haServerIPs[0]]
	tokens := make([]string, n)
	var g errgroup.Group
	g.SetLimit(haTokenWorkers)
	for i := range tokens {
		g.Go(func() error {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			out, err := exec.CommandContext(ctx, filepath.Join(s.BinDir, "spire-server"), "token", "generate",
				"-output", "json", "-spiffeID", haNodeID, "-socketPath", s.SocketPath).Output()
			if err != nil {
				return fmt.Errorf("spire-server token generate: %w", err)
			}
			var resp struct {
				Value string `json:"value"`
			}
			if err := json.Unmarshal(out, &resp); err != nil || resp.Value == "" {
				return fmt.Errorf("spire-server token generate answered %q: %v", out, err)
			}
			tokens[i] = resp.Value
			return nil
		})
	}
	return tokens, g.Wait()
}

// haAgent is a running agent of either kind.
type haAgent struct {
	kind    string // NameLanyard or NameSpire
	socket  string
	logPath string
	proc    Proc
	exited  chan struct{}
	stop    func()
}

// startAgent starts an agent of kind attesting with token, in a mount
// namespace where haServerName resolves to both servers. unshare execs sh,
// which execs the agent: one pid throughout.
func (c *haCluster) startAgent(kind, lanyardBin, token, logLevel string) (*haAgent, error) {
	dir, err := os.MkdirTemp("", "lyhab-")
	if err != nil {
		return nil, err
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		return nil, err
	}
	c.tb.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.WriteFile(filepath.Join(dir, "bundle.pem"), c.bundle, 0o600); err != nil {
		return nil, err
	}
	conf := filepath.Join(dir, "agent.conf")
	if err := os.WriteFile(conf, fmt.Appendf(nil, haAgentConf, dir, c.port, token, spiretest.AgentPlugins, logLevel), 0o600); err != nil {
		return nil, err
	}
	bin := lanyardBin
	if kind == NameSpire {
		bin = filepath.Join(c.binDir, "spire-agent")
	}
	a := &haAgent{kind: kind, socket: filepath.Join(dir, "api.sock"), logPath: filepath.Join(dir, kind+".log"), exited: make(chan struct{})}
	logFile, err := os.Create(a.logPath)
	if err != nil {
		return nil, err
	}
	defer logFile.Close()
	const script = `mount --bind "$1/hosts" /etc/hosts && mount --bind "$1/resolv.conf" /etc/resolv.conf && shift && exec "$@"`
	cmd := exec.Command("unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", c.dnsDir, bin, "run", "-config", conf)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %s: %w", kind, err)
	}
	a.proc = Proc{PID: cmd.Process.Pid}
	go func() {
		_ = cmd.Wait()
		close(a.exited)
	}()
	var once sync.Once
	a.stop = func() {
		once.Do(func() {
			_ = cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-a.exited:
			case <-time.After(10 * time.Second):
				_ = cmd.Process.Kill()
				<-a.exited
			}
		})
	}
	c.tb.Cleanup(a.stop)
	return a, nil
}

// waitServing waits until the agent serves the harness an X509-SVID.
func (a *haAgent) waitServing() error {
	exited := make(chan error, 1)
	go func() {
		<-a.exited
		exited <- fmt.Errorf("%s exited", a.kind)
	}()
	if err := waitSVID(a.socket, startupBound, exited); err != nil {
		b, _ := os.ReadFile(a.logPath)
		return fmt.Errorf("%s: %w\n%s", a.kind, err, tail(b))
	}
	return nil
}

// startAgents starts n agents of kind and waits until every one serves an
// SVID; it returns them and when the first started.
func (c *haCluster) startAgents(kind, lanyardBin string, n int, logLevel string) ([]*haAgent, time.Time) {
	tokens, err := c.joinTokens(n)
	if err != nil {
		c.tb.Fatal(err)
	}
	launched := time.Now()
	agents := make([]*haAgent, n)
	for i, tok := range tokens {
		if agents[i], err = c.startAgent(kind, lanyardBin, tok, logLevel); err != nil {
			c.tb.Fatal(err)
		}
	}
	var g errgroup.Group
	for _, a := range agents {
		g.Go(a.waitServing)
	}
	if err := g.Wait(); err != nil {
		c.tb.Fatal(err)
	}
	return agents, launched
}

func stopAgents(agents []*haAgent) {
	var wg sync.WaitGroup
	for _, a := range agents {
		wg.Go(a.stop)
	}
	wg.Wait()
}

// conns counts the agents' established connections to each server, and
// how many agents hold one to it.
func (c *haCluster) conns(agents []*haAgent) (conns, agentsOn map[string]int, err error) {
	table, err := readTCPTable()
	if err != nil {
		return nil, nil, err
	}
	conns, agentsOn = map[string]int{}, map[string]int{}
	for _, a := range agents {
		inodes, err := socketInodes(a.proc.PID)
		if err != nil {
			return nil, nil, fmt.Errorf("%s pid %d: %w", a.kind, a.proc.PID, err)
		}
		for ip, n := range serverConns(table, inodes, c.port) {
			conns[ip] += n
			agentsOn[ip]++
		}
	}
	return conns, agentsOn, nil
}

// haLoad attests n agents of kind to a fresh pair of servers and reads the
// connections each server holds and the servers' RSS. It returns the
// cluster, still running, and the agents.
func (r *run) haLoad(h *haShared, kind string, n int) (*haCluster, []*haAgent) {
	tb := r.tb
	c := h.cluster(tb)
	load := &HALoad{Agents: n, Conns: map[string]int{}, AgentsOn: map[string]int{}, ServerIdleRSS: map[string]uint64{}, ServerRSS: map[string]uint64{}, ServerCPU: map[string]float64{}}
	r.report.HA.Load[kind] = load
	// The servers' RSS before any agent, after their start-up settled.
	time.Sleep(idleSettle)
	for ip := range c.servers {
		load.ServerIdleRSS[ip] = c.serverRSS(ip)
	}
	r.logf("HA: attesting %d %s agents to the servers on a fresh database", n, kind)
	agents, launched := c.startAgents(kind, h.lanyardBin, n, "INFO")
	load.AttestedIn = time.Since(launched)
	r.logf("HA: %d %s agents serve SVIDs %s after they started; letting them sync for %s", n, kind, load.AttestedIn.Round(100*time.Millisecond), haSettle)
	cpu0 := c.serverCPU()
	time.Sleep(haSettle)
	for ip, after := range c.serverCPU() {
		load.ServerCPU[ip] = after - cpu0[ip]
	}
	var err error
	if load.Conns, load.AgentsOn, err = c.conns(agents); err != nil {
		tb.Fatal(err)
	}
	var rss []uint64
	for _, a := range agents {
		v, err := a.proc.RSS()
		if err != nil {
			tb.Fatalf("%s: %v", kind, err)
		}
		rss = append(rss, v)
	}
	slices.Sort(rss)
	load.AgentRSS = rss[len(rss)/2]
	for ip := range c.servers {
		load.ServerRSS[ip] = c.serverRSS(ip)
	}
	r.logf("HA: %s: connections by server %v (agents on each %v); server RSS %s", kind, load.Conns, load.AgentsOn, rssList(load.ServerRSS))
	return c, agents
}

func (c *haCluster) serverRSS(ip string) uint64 {
	p, err := c.serverProc(ip)
	if err != nil {
		c.tb.Fatalf("spire-server %s: %v", ip, err)
	}
	v, err := p.RSS()
	if err != nil {
		c.tb.Fatalf("spire-server %s: %v", ip, err)
	}
	return v
}

// serverCPU reads each server's CPU time so far.
func (c *haCluster) serverCPU() map[string]float64 {
	out := map[string]float64{}
	for ip := range c.servers {
		p, err := c.serverProc(ip)
		if err == nil {
			out[ip], err = p.CPUSeconds()
		}
		if err != nil {
			c.tb.Fatalf("spire-server %s: %v", ip, err)
		}
	}
	return out
}

func rssList(m map[string]uint64) string {
	s := ""
	for _, ip := range haServerIPs {
		s += fmt.Sprintf(" %s=%s", ip, mb(m[ip]))
	}
	return s
}

// haSection runs the SPIRE-HA section: the load with each kind, one after
// the other on fresh servers, then failover with one agent of each kind on
// the last pair.
func (r *run) haSection() {
	start := time.Now()
	if err := haPrerequisites(); err != nil {
		if r.cfg.HAOnly {
			r.tb.Fatalf("HA: %v", err)
		}
		// The sections before stand: report the skip as a missed target.
		r.logf("HA: skipped: %v", err)
		r.report.HA.Skipped = err.Error()
		return
	}
	h := r.newHAShared()
	r.report.HA.Servers = len(haServerIPs)
	var last *haCluster
	if r.cfg.HAAgents > 0 {
		for _, kind := range haKinds {
			if last != nil {
				last.stop()
			}
			var agents []*haAgent
			last, agents = r.haLoad(h, kind, r.cfg.HAAgents)
			stopAgents(agents)
		}
	} else {
		last = h.cluster(r.tb)
	}
	if r.cfg.HAFailoverRounds > 0 {
		r.haFailover(last)
	}
	last.stop()
	r.report.HA.Duration = time.Since(start).Round(time.Second).String()
	r.logf("HA: the section took %s", r.report.HA.Duration)
}

// haPrerequisites tells why the section cannot run here, if it cannot.
func haPrerequisites() error {
	if os.Geteuid() != 0 {
		return errors.New("needs root: agents run in mount namespaces of their own, PostgreSQL as nobody")
	}
	for _, cmd := range []string{"unshare", "ss"} {
		if _, err := exec.LookPath(cmd); err != nil {
			return fmt.Errorf("%s is not installed (util-linux, iproute2)", cmd)
		}
	}
	_, err := spiretest.FindPostgres()
	return err
}

func writeFile(tb testing.TB, path, body string) {
	tb.Helper()
	if err := os.WriteFile(path, []byte(body), 0o644); err != nil {
		tb.Fatal(err)
	}
}
