package e2e

import (
	"errors"
	"github.com/lanyard-dev/lanyard/internal/testkit"
	"io"
	"net"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"golang.org/x/net/http2"
)

// rssKiB reads a process's resident set size.
func rssKiB(t *testing.T, pid int) int { return statusKiB(t, pid, "VmRSS:") }

// statusKiB reads a size in KiB from a process's /proc status.
func statusKiB(t *testing.T, pid int, field string) int {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if rest, ok := strings.CutPrefix(line, field); ok {
			n, err := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")))
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
	}
	t.Fatalf("no %s in /proc/%d/status", field, pid)
	return 0
}

// stuckStream opens a FetchX509SVID stream over raw HTTP/2 with a flow-control
// window of zero, so the agent can never send it a message: a client that
// does not read, as the agent sees it.
func stuckStream(t *testing.T, socket string) net.Conn {
	c := testkit.DialH2(t, socket, http2.Setting{ID: http2.SettingInitialWindowSize, Val: 0})
	c.Call(t, 1, "FetchX509SVID", &workload.X509SVIDRequest{})
	return c.Conn
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
	testFloodDoesNotStarve(t, func(socket string, n int) *testkit.Child {
		return startRole(t, attackerUID, "hold", socket, itoa(n))
	})
}

// TestConnectionFloodFromManyUIDsInAUserNamespace: the same attacker makes
// a user namespace mapping 65,536 host uids (as newuidmap does for an
// /etc/subuid range) and holds each connection as another uid inside it.
// Before the cap was shared per user namespace, each uid got a share and
// the victim got none of its 40 fetches.
func TestConnectionFloodFromManyUIDsInAUserNamespace(t *testing.T) {
	testFloodDoesNotStarve(t, func(socket string, n int) *testkit.Child {
		const capSetgid, capSetuid = 6, 7
		return startRoleCaps(t, attackerUID, []uintptr{capSetgid, capSetuid}, "userns-hold", socket, itoa(n))
	})
}

// testFloodDoesNotStarve runs the agent with a connection limit of 64,
// lets attack(socket, n) hold all of it with n connections, and checks that
// victimUID gets 40 of 40 fetches, root's probe is served, and the
// attacker's uid is named in the log.
func testFloodDoesNotStarve(t *testing.T, attack func(socket string, n int) *testkit.Child) {
	testkit.RequireRoot(t, "to run clients under other uids")
	a := newAgentProc(t, newAgentDir(t), withEntries(`
      entry {
        spiffe_id = "spiffe://example.org/victim"
        selectors = ["unix:uid:`+itoa(victimUID)+`"]
      }
`))
	a.nofile = 384
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

	attacker := attack(a.socket, limit+limit/4)
	deadline := time.Now().Add(60 * time.Second)
	for held := 0; held < limit; {
		if time.Now().After(deadline) {
			t.Fatalf("the attacker holds %d connections after 60s, want the limit %d", held, limit)
		}
		line, ok := attacker.Next(t, 60*time.Second)
		if !ok {
			t.Fatalf("the attacker exited: %s", attacker.Stderr.String())
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
		line, ok := victim.Next(t, 60*time.Second)
		if !ok {
			t.Fatalf("the victim exited early: %s", victim.Stderr.String())
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

// hwmKiB reads a process's peak resident set size.
func hwmKiB(t *testing.T, pid int) int { return statusKiB(t, pid, "VmHWM:") }

// headerLiteral appends one HPACK "literal header field without indexing,
// new name" with no Huffman coding: what the agent decodes is what was sent.
func headerLiteral(dst []byte, name, value string) []byte {
	dst = append(dst, 0)
	dst = hpackInt(dst, len(name))
	dst = append(dst, name...)
	dst = hpackInt(dst, len(value))
	return append(dst, value...)
}

// hpackInt appends an HPACK integer with a 7-bit prefix (RFC 7541 5.1) to
// a first byte whose high bit (Huffman) is clear.
func hpackInt(dst []byte, n int) []byte {
	if n < 127 {
		return append(dst, byte(n))
	}
	dst = append(dst, 127)
	for n -= 127; n >= 128; n >>= 7 {
		dst = append(dst, byte(n%128)|0x80)
	}
	return append(dst, byte(n))
}

// headerFlood is one attacker connection: it opens up to streams Health
// Watch calls (no identity needed), each with a header list of block bytes
// sent as a HEADERS frame and CONTINUATION frames, and adds what it wrote
// to sent. It returns when the agent closes the connection or at deadline;
// the connection is left open so that the agent keeps what it accepted.
func headerFlood(t *testing.T, socket string, block []byte, streams int, sent *atomic.Int64, deadline time.Time) (net.Conn, error) {
	conn, err := net.Dial("unix", socket)
	if err != nil {
		return nil, err
	}
	t.Cleanup(func() { conn.Close() })
	// The agent's answers (settings, health statuses) are read and dropped,
	// so that it never waits on this client.
	go func() { _, _ = io.Copy(io.Discard, conn) }()
	if err := conn.SetWriteDeadline(deadline); err != nil {
		return conn, err
	}
	if _, err := io.WriteString(conn, http2.ClientPreface); err != nil {
		return conn, err
	}
	fr := http2.NewFramer(conn, nil)
	if err := fr.WriteSettings(); err != nil {
		return conn, err
	}
	const frame = 16 << 10 // the agent's SETTINGS_MAX_FRAME_SIZE
	for i := range streams {
		id := uint32(2*i + 1)
		first := block[:min(frame, len(block))]
		if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: first, EndHeaders: len(first) == len(block)}); err != nil {
			return conn, err
		}
		sent.Add(int64(len(first)))
		for rest := block[len(first):]; len(rest) > 0; {
			n := min(frame, len(rest))
			if err := fr.WriteContinuation(id, n == len(rest), rest[:n]); err != nil {
				return conn, err
			}
			sent.Add(int64(n))
			rest = rest[n:]
		}
		// An empty HealthCheckRequest.
		if err := fr.WriteData(id, true, []byte{0, 0, 0, 0, 0}); err != nil {
			return conn, err
		}
	}
	return conn, nil
}

// TestHeaderFloodIsBounded: two connections open Health Watch streams, which
// anyone may call, each with a megabyte of headers, and reconnect whenever
// the agent closes them. The agent must not keep what it was sent: its
// peak RSS stays within 50 MB while the attack sends 200 MB (had it kept
// them, as with gRPC's 16 MiB default limit, it would grow by more than
// that), and a workload is served during the attack.
func TestHeaderFloodIsBounded(t *testing.T) {
	a := startAgent(t, baseConfig)
	if _, err := a.client(t).FetchX509SVID(testContext(t)); err != nil {
		t.Fatal(err)
	}
	pid := a.Cmd.Process.Pid
	hwmBefore := hwmKiB(t, pid)

	// A megabyte of headers a stream, in fields of 64 KiB.
	var block []byte
	for _, f := range [][2]string{
		{":method", "POST"}, {":scheme", "http"}, {":path", "/grpc.health.v1.Health/Watch"},
		{":authority", "localhost"}, {"content-type", "application/grpc"}, {"te", "trailers"},
	} {
		block = headerLiteral(block, f[0], f[1])
	}
	pad := strings.Repeat("a", 64<<10)
	for i := range 16 {
		block = headerLiteral(block, "x-pad-"+strconv.Itoa(i), pad)
	}
	const (
		conns   = 2
		streams = 100 // the agent's limit a connection
		budget  = conns * streams << 20
		maxDial = 2000 // reconnections an attacker makes at most
	)
	var sent atomic.Int64
	deadline := time.Now().Add(10 * time.Second)
	var wg sync.WaitGroup
	dialErrs := make([]error, conns)
	for c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range maxDial {
				if sent.Load() >= budget || time.Now().After(deadline) {
					return
				}
				conn, err := headerFlood(t, a.socket, block, streams, &sent, deadline)
				if conn == nil {
					dialErrs[c] = err
					return
				}
				if err == nil {
					return // every stream sent: the agent holds them
				}
				conn.Close()
			}
		}()
	}
	wg.Wait()
	if err := errors.Join(dialErrs...); err != nil {
		t.Fatalf("the attacker could not connect: %v", err)
	}

	// A workload is served while the attacker's connections are open.
	if _, err := a.client(t).FetchX509SVID(testContext(t)); err != nil {
		t.Fatalf("a workload was not served during the header flood: %v", err)
	}
	hwmAfter := hwmKiB(t, pid)
	t.Logf("agent peak RSS: %d KiB before, %d KiB after %d MiB of headers", hwmBefore, hwmAfter, sent.Load()>>20)
	if sent.Load() < budget/4 {
		t.Fatalf("the attack sent only %d MiB in 10 s, too little to tell", sent.Load()>>20)
	}
	if grow := hwmAfter - hwmBefore; grow > 50<<10 {
		t.Fatalf("the agent's peak RSS grew by %d MiB under a header flood of %d MiB", grow>>10, sent.Load()>>20)
	}
}
