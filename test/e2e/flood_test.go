package e2e

import (
	"bufio"
	"bytes"
	"io"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// rssKiB reads a process's resident set size.
func rssKiB(t *testing.T, pid int) int {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			n, err := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")))
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
	}
	t.Fatal("no VmRSS")
	return 0
}

// stuckStream opens a FetchX509SVID stream over raw HTTP/2 with a flow-control
// window of zero, so the agent can never send it a message: a client that
// does not read, as the agent sees it.
func stuckStream(t *testing.T, socket string) net.Conn {
	conn, err := net.Dial("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	if _, err := io.WriteString(conn, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	fr := http2.NewFramer(conn, bufio.NewReader(conn))
	if err := fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 0}); err != nil {
		t.Fatal(err)
	}
	var hdr bytes.Buffer
	enc := hpack.NewEncoder(&hdr)
	for _, f := range [][2]string{
		{":method", "POST"}, {":scheme", "http"}, {":path", "/SpiffeWorkloadAPI/FetchX509SVID"},
		{":authority", "localhost"}, {"content-type", "application/grpc"}, {"te", "trailers"},
		{"workload.spiffe.io", "true"},
	} {
		if err := enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]}); err != nil {
			t.Fatal(err)
		}
	}
	if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: hdr.Bytes(), EndHeaders: true}); err != nil {
		t.Fatal(err)
	}
	// An empty X509SVIDRequest: uncompressed, zero length.
	if err := fr.WriteData(1, true, []byte{0, 0, 0, 0, 0}); err != nil {
		t.Fatal(err)
	}
	return conn
}

func TestConnectionFloodDoesNotStarveOthers(t *testing.T) {
	a := startAgent(t, baseConfig)
	if _, err := a.client(t).FetchX509SVID(testContext(t)); err != nil {
		t.Fatal(err)
	}
	rssBefore := rssKiB(t, a.Cmd.Process.Pid)

	// 2,000 connections at once that never speak.
	const flood = 2000
	conns := make([]net.Conn, flood)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var dialErrs int
	for i := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := net.Dial("unix", a.socket)
			if err != nil {
				mu.Lock()
				dialErrs++
				mu.Unlock()
				return
			}
			conns[i] = c
		}()
	}
	wg.Wait()
	t.Cleanup(func() {
		for _, c := range conns {
			if c != nil {
				c.Close()
			}
		}
	})
	if dialErrs > 0 {
		t.Logf("%d of %d flood connections could not connect (kernel backlog)", dialErrs, flood)
	}

	// A well-behaved client is served in the middle of it.
	svid, err := a.client(t).FetchX509SVID(testContext(t))
	if err != nil {
		t.Fatalf("a well-behaved client was not served during the flood: %v", err)
	}
	if svid.ID != userID {
		t.Fatal(svid.ID)
	}
	rssFlood := rssKiB(t, a.Cmd.Process.Pid)
	t.Logf("agent RSS: %d KiB before, %d KiB with %d idle connections", rssBefore, rssFlood, flood)
	// Bounded, with room for the race detector's shadow memory.
	if grow := rssFlood - rssBefore; grow > 256*1024 {
		t.Fatalf("agent RSS grew by %d KiB for %d idle connections", grow, flood)
	}

	// Connections that never send the HTTP/2 preface are closed.
	i := slices.IndexFunc(conns, func(c net.Conn) bool { return c != nil })
	if i < 0 {
		t.Fatal("none of the flood connections connected")
	}
	idle := conns[i]
	if err := idle.SetReadDeadline(time.Now().Add(30 * time.Second)); err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(io.Discard, idle); err != nil {
		t.Fatalf("an idle connection was not closed by the agent: %v", err)
	}
}

// bigEntries makes X.509 responses of tens of KiB (many DNS names, several
// entries) that rotate every second or so, so that a client that does not
// read fills gRPC's per-stream send quota (64 KiB) within seconds.
func bigEntries() string {
	var names []string
	for i := range 150 {
		names = append(names, strconv.Quote("host-"+strconv.Itoa(i)+".workloads.example.org"))
	}
	var b strings.Builder
	for i := range 4 {
		b.WriteString("      entry {\n")
		b.WriteString("        spiffe_id = \"spiffe://example.org/big/" + strconv.Itoa(i) + "\"\n")
		b.WriteString("        selectors = [\"unix:uid:@UID@\"]\n")
		b.WriteString("        x509_svid_ttl = \"2s\"\n")
		b.WriteString("        dns_names = [" + strings.Join(names, ", ") + "]\n")
		b.WriteString("      }\n")
	}
	return withEntries(b.String())
}

func TestStuckReaderIsDroppedOthersKeepGettingRotations(t *testing.T) {
	a := startAgent(t, bigEntries())
	w := watch(t, a.client(t))
	stuck := stuckStream(t, a.socket)

	// The stuck stream is cut off after the send timeout, not waited on.
	if err := stuck.SetReadDeadline(time.Now().Add(60 * time.Second)); err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(io.Discard, stuck); err != nil {
		t.Fatalf("the stuck client's connection was not closed by the agent: %v", err)
	}
	waitFor(t, 5*time.Second, "the agent to log the stuck client", func() bool {
		return strings.Contains(a.Logs.String(), "stopped reading")
	})
	// Meanwhile the reading client kept receiving rotations.
	if n := len(w.snapshot()); n < 3 {
		t.Fatalf("the well-behaved watcher got %d updates while the other client was stuck", n)
	}
	if len(w.errs) > 0 {
		t.Fatalf("the watcher saw errors: %v", w.errs)
	}
}

// TestConnectionFloodByOneUserDoesNotStarveAnother: a user with no entry
// takes every connection the agent allows and holds them, half idle, half
// with a stream open, reconnecting whenever one is closed. Another user's
// workload must still get every fetch, and a probe by root must be served.
func TestConnectionFloodByOneUserDoesNotStarveAnother(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root to run clients under other uids")
	}
	a := &agentProc{t: t, dir: newAgentDir(t), nofile: 384}
	a.config = filepath.Join(a.dir, "agent.conf")
	a.socket = filepath.Join(a.dir, "public", "api.sock")
	a.dataDir = filepath.Join(a.dir, "data")
	a.writeConfig(withEntries(`
      entry {
        spiffe_id = "spiffe://example.org/victim"
        selectors = ["unix:uid:` + itoa(victimUID) + `"]
      }
`))
	if err := a.start(); err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`max_connections=(\d+)`).FindStringSubmatch(a.Logs.String())
	if m == nil {
		t.Fatalf("the agent does not log its connection limit:\n%s", a.Logs.String())
	}
	limit, _ := strconv.Atoi(m[1])
	if limit > 256 {
		t.Fatalf("the connection limit is %d under RLIMIT_NOFILE %d", limit, a.nofile)
	}

	attacker := startRole(t, attackerUID, "hold", a.socket, itoa(limit+limit/4))
	deadline := time.Now().Add(60 * time.Second)
	for held := 0; held < limit; {
		if time.Now().After(deadline) {
			t.Fatalf("the attacker holds %d connections after 60s, want the limit %d", held, limit)
		}
		line, ok := attacker.next(t, 60*time.Second)
		if !ok {
			t.Fatalf("the attacker exited: %s", attacker.errors())
		}
		if n, ok := heldCount(line); ok {
			held = n
		}
	}

	const fetches = 40
	victim := startRole(t, victimUID, "fetch", a.socket, itoa(fetches))
	var got int
	var fails []string
	for range fetches {
		line, ok := victim.next(t, 60*time.Second)
		if !ok {
			t.Fatalf("the victim exited early: %s", victim.errors())
		}
		if line == "ok" {
			got++
		} else if len(fails) < 3 {
			fails = append(fails, line)
		}
	}
	if got != fetches {
		t.Fatalf("the victim got %d of %d fetches while uid %d held the agent's %d connections; first failures: %q", got, fetches, attackerUID, limit, fails)
	}
	// A probe by root, as the agent's health checks are, is served too.
	if !a.healthy() {
		t.Fatal("a health probe was not served during the flood")
	}
	waitFor(t, 10*time.Second, "the agent to log the offending uid", func() bool {
		return strings.Contains(a.Logs.String(), "uid="+itoa(attackerUID))
	})
}
