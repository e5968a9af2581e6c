package ha

import (
	"bufio"
	"context"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// serverName is the SPIRE Servers' host name, which only the agent's
// private /etc/hosts knows.
const serverName = "spire-ha.test"

// agentNode is a lanyard agent that resolves serverName to every server's
// address through its own /etc/hosts and a resolv.conf that names only a
// loopback nameserver: it runs in a mount namespace of its own where both
// are bind-mounted (unshare -m), so the rest of the machine is untouched.
type agentNode struct {
	dir     string
	socket  string
	port    int
	token   string
	metrics int // the Prometheus port
	proc    *testkit.Process
}

// hostName is a name that resolves to server ip alone.
func hostName(ip string) string {
	return "spire-" + strings.ReplaceAll(ip, ".", "-") + ".test"
}

func startAgent(t *testing.T, serverIPs []string, port int, bundlePEM []byte, token string) *agentNode {
	t.Helper()
	dir := testkit.ShortDir(t, "lyha-")
	n := &agentNode{dir: dir, socket: filepath.Join(dir, "api.sock"), port: port, token: token, metrics: testkit.FreePort(t)}
	hosts := "127.0.0.1 localhost\n"
	for _, ip := range serverIPs {
		hosts += ip + " " + serverName + " " + hostName(ip) + "\n"
	}
	write(t, filepath.Join(dir, "hosts"), hosts)
	// Nothing listens there: a lookup that reaches DNS fails at once.
	write(t, filepath.Join(dir, "resolv.conf"), "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
	write(t, filepath.Join(dir, "bundle.pem"), string(bundlePEM))
	n.writeConfig(t, serverName)
	// unshare execs sh, which execs lanyard: one pid throughout.
	script := `mount --bind "$1/hosts" /etc/hosts && mount --bind "$1/resolv.conf" /etc/resolv.conf && exec "$2" run -config "$1/agent.conf"`
	p, err := testkit.Start(t, "unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", dir, lanyardBin)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.WaitServing(n.socket, 90*time.Second); err != nil {
		t.Fatal(err)
	}
	n.proc = p
	return n
}

// writeConfig writes agent.conf with server_address.
func (n *agentNode) writeConfig(t *testing.T, serverAddress string) {
	t.Helper()
	write(t, filepath.Join(n.dir, "agent.conf"), fmt.Sprintf(`agent {
    data_dir = "%[1]s/data"
    log_level = "DEBUG"
    server_address = %[2]q
    server_port = "%[3]d"
    socket_path = "%[1]s/api.sock"
    trust_bundle_path = "%[1]s/bundle.pem"
    trust_domain = "example.org"
    join_token = %[4]q
    sync_interval = %[5]q
}

telemetry {
    Prometheus {
        host = "127.0.0.1"
        port = %[6]d
    }
}

plugins {
    NodeAttestor "join_token" {
        plugin_data {}
    }
    KeyManager "disk" {
        plugin_data {
            directory = "%[1]s/keys"
        }
    }
    WorkloadAttestor "unix" {
        plugin_data {}
    }
}
`, n.dir, serverAddress, n.port, n.token, syncInterval.String(), n.metrics))
}

// reload points the agent at serverAddress with SIGHUP and waits until it
// took the new config.
func (n *agentNode) reload(t *testing.T, serverAddress string) {
	t.Helper()
	n.writeConfig(t, serverAddress)
	before := strings.Count(n.proc.Logs.String(), "Reloaded the config")
	if err := n.proc.Cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	testkit.WaitFor(t, 10*time.Second, "the agent to reload its config", func() bool {
		logs := n.proc.Logs.String()
		if strings.Contains(logs, "Reload failed") {
			t.Fatalf("the agent refused the new server_address:\n%s", logs)
		}
		return strings.Count(logs, "Reloaded the config") > before
	})
}

func write(t *testing.T, path, body string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
}

// serverConns counts the agent's established TCP connections to port, by
// remote address, from /proc: the sockets its descriptors hold, looked up
// in the kernel's table of its network namespace.
func (n *agentNode) serverConns(t *testing.T, port int) map[string]int {
	t.Helper()
	pid := n.proc.Cmd.Process.Pid
	fdDir := fmt.Sprintf("/proc/%d/fd", pid)
	fds, err := os.ReadDir(fdDir)
	if err != nil {
		t.Fatalf("reading the agent's descriptors: %v", err)
	}
	inodes := map[string]bool{}
	for _, fd := range fds {
		link, err := os.Readlink(filepath.Join(fdDir, fd.Name()))
		if err == nil && strings.HasPrefix(link, "socket:[") {
			inodes[strings.TrimSuffix(strings.TrimPrefix(link, "socket:["), "]")] = true
		}
	}
	f, err := os.Open(fmt.Sprintf("/proc/%d/net/tcp", pid))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	conns := map[string]int{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
		fields := strings.Fields(sc.Text())
		if len(fields) < 10 || fields[3] != "01" || !inodes[fields[9]] { // 01: ESTABLISHED
			continue
		}
		if ip, p, ok := parseProcAddr(fields[2]); ok && p == port {
			conns[ip]++
		}
	}
	return conns
}

// parseProcAddr reads /proc/net/tcp's "0200007F:1F90": the IPv4 address
// in the kernel's (little-endian) byte order, the port in hex.
func parseProcAddr(s string) (string, int, bool) {
	hexIP, hexPort, ok := strings.Cut(s, ":")
	b, err := hex.DecodeString(hexIP)
	if !ok || err != nil || len(b) != 4 {
		return "", 0, false
	}
	port, err := strconv.ParseInt(hexPort, 16, 32)
	if err != nil {
		return "", 0, false
	}
	return net.IPv4(b[3], b[2], b[1], b[0]).String(), int(port), true
}

// fetchAs runs `lanyard api fetch x509` as uid until it succeeds, failing
// the test after bound; it returns how long that took.
func (n *agentNode) fetchAs(t *testing.T, uid int, bound time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	var out []byte
	for time.Since(start) < bound {
		left := bound - time.Since(start)
		cmd := exec.Command(lanyardBin, "api", "fetch", "x509", "-socketPath", n.socket, "-timeout", left.String())
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(uid)}}
		var err error
		if out, err = cmd.CombinedOutput(); err == nil {
			return time.Since(start)
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("uid %d got no SVID within %s; last answer:\n%s", uid, bound, out)
	return 0
}

// fetcher is a workload that fetches its X509-SVID every 100 ms, each time
// on a new connection, and counts the failures.
type fetcher struct {
	cancel context.CancelFunc
	done   chan struct{}

	mu       sync.Mutex
	ok       int
	failures []string
	serial   string          // of the last SVID fetched for webID
	ids      map[string]bool // the SPIFFE IDs of the last fetch
}

func startFetcher(t *testing.T, socket string) *fetcher {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	f := &fetcher{cancel: cancel, done: make(chan struct{})}
	go f.run(ctx, socket)
	t.Cleanup(f.stop)
	return f
}

func (f *fetcher) run(ctx context.Context, socket string) {
	defer close(f.done)
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		fctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		svids, err := workloadapi.FetchX509SVIDs(fctx, workloadapi.WithAddr("unix://"+socket))
		cancel()
		if ctx.Err() != nil {
			return
		}
		f.mu.Lock()
		if err != nil {
			f.failures = append(f.failures, time.Now().Format(time.TimeOnly)+": "+err.Error())
		} else {
			f.ok++
			f.ids = map[string]bool{}
			for _, svid := range svids {
				f.ids[svid.ID.String()] = true
				if svid.ID.String() == webID {
					f.serial = svid.Certificates[0].SerialNumber.String()
				}
			}
		}
		f.mu.Unlock()
	}
}

func (f *fetcher) stop() {
	f.cancel()
	<-f.done
}

// state returns the fetches that succeeded, the failures and the serial of
// the last SVID.
func (f *fetcher) state() (int, []string, string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.ok, append([]string(nil), f.failures...), f.serial
}

// has reports whether the last fetch had an SVID for id.
func (f *fetcher) has(id string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.ids[id]
}
