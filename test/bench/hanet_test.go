package bench

import (
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testkit"
)

// procNetTCP is /proc/net/tcp as this machine's kernel (6.x) writes it:
// a server listening on 127.0.0.2:56313 (0A), the accepted side and the
// client side of one connection to it (01), which received 11 bytes
// (rx_queue 0xB), and a client's connection to 127.0.0.3:56313 in
// TIME_WAIT (06), which holds no inode.
const procNetTCP = `  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode                                                     
   0: 0200007F:DBF9 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 13141514 1 000000000c947833 100 0 0 10 0                  
  15: 0200007F:DBF9 0100007F:9188 01 00000000:00000000 00:00000000 00000000     0        0 13141516 2 00000000e44beeb2 20 0 0 11 -1                  
  38: 0100007F:9188 0200007F:DBF9 01 00000000:0000000B 00:00000000 00000000     0        0 13141515 2 00000000fd8691f3 20 4 30 10 -1                 
  39: 0100007F:9190 0300007F:DBF9 06 00000000:00000000 03:000016A8 00000000     0        0 0 3 00000000a8e4d0c5                                    
`

func TestParseProcNetTCP(t *testing.T) {
	conns, err := parseProcNetTCP(strings.NewReader(procNetTCP))
	if err != nil {
		t.Fatal(err)
	}
	if len(conns) != 4 {
		t.Fatalf("got %d rows, want 4: %+v", len(conns), conns)
	}
	want := tcpConn{Local: netAddr{"127.0.0.1", 37256}, Remote: netAddr{"127.0.0.2", 56313}, Established: true, Inode: "13141515"}
	if conns[2] != want {
		t.Errorf("row 38: got %+v, want %+v", conns[2], want)
	}
	if conns[0].Established || conns[3].Established {
		t.Errorf("a listening or TIME_WAIT socket read as established: %+v", conns)
	}

	// The client's socket counts for 127.0.0.2; the server's accepted
	// socket is not the agent's, and TIME_WAIT is not a connection.
	got := serverConns(conns, map[string]bool{"13141515": true, "0": true}, 56313)
	if len(got) != 1 || got["127.0.0.2"] != 1 {
		t.Errorf("serverConns = %v, want map[127.0.0.2:1]", got)
	}
	if got := serverConns(conns, map[string]bool{"13141515": true}, 443); len(got) != 0 {
		t.Errorf("connections to another port counted: %v", got)
	}
}

func TestParseProcAddrRejects(t *testing.T) {
	for _, s := range []string{"", "0200007F", "0200007F:", "00000000000000000000000001000000:0050", "0200007F:1FFFFF", "zz00007F:0050"} {
		if a, err := parseProcAddr(s); err == nil {
			t.Errorf("parseProcAddr(%q) = %v, want an error", s, a)
		}
	}
}

// ssOutput is `ss -tinHe state established dst 127.0.0.2:56313` as
// iproute2 6.1 prints it: per socket a summary line with ino: and an
// indented tcp_info line; the second socket has received nothing yet, so
// its line has no bytes_received; the third received data under 1 ms ago,
// so its line has no lastrcv.
const ssOutput = "11     0      127.0.0.1:37256 127.0.0.2:56313 ino:13141515 sk:1009 cgroup:/ <->\n" +
	"\t ts sack bbr wscale:10,10 rto:200 rtt:0.024/0.012 ato:40 mss:32768 pmtu:65535 rcvmss:536 advmss:65483 cwnd:10 bytes_acked:1 bytes_received:11 segs_out:3 segs_in:2 data_segs_in:1 bbr:(bw:0bps,mrtt:0.024,pacing_gain:1,cwnd_gain:1) send 109226666667bps lastsnd:12 lastrcv:12 lastack:12 pacing_rate 311896363608bps delivered:1 app_limited rcv_space:65495 rcv_ssthresh:65495 minrtt:0.024 snd_wnd:65536\n" +
	"0      0      127.0.0.1:44764 127.0.0.2:56313 ino:13053170 sk:1002 cgroup:/ <->\n" +
	"\t ts sack bbr wscale:10,10 rto:200 rtt:0.025/0.012 mss:32741 pmtu:65535 rcvmss:536 advmss:65483 cwnd:10 bytes_acked:1 segs_out:2 segs_in:1 bbr:(bw:0bps,mrtt:0.025,pacing_gain:1,cwnd_gain:1) send 104771200000bps lastsnd:4 lastrcv:4 lastack:4 pacing_rate 299420519776bps delivered:1 app_limited rcv_space:65495 rcv_ssthresh:65495 minrtt:0.025 snd_wnd:65483                                         \n" +
	"0      0      127.0.0.1:44770 127.0.0.2:56313 ino:13053180 sk:1003 cgroup:/ <->\n" +
	"\t ts sack bbr wscale:10,10 rto:200 rtt:0.025/0.012 mss:32741 pmtu:65535 rcvmss:536 advmss:65483 cwnd:10 bytes_acked:1 bytes_received:6 segs_out:2 segs_in:2 data_segs_in:1 bbr:(bw:0bps,mrtt:0.025,pacing_gain:1,cwnd_gain:1) send 104771200000bps pacing_rate 299420519776bps delivered:1 app_limited rcv_space:65495 rcv_ssthresh:65495 minrtt:0.025 snd_wnd:65483\n"

func TestParseSS(t *testing.T) {
	got := parseSS(ssOutput)
	want := map[string]ssSocket{
		"13141515": {Received: 11, LastData: 12 * time.Millisecond},
		"13053170": {Received: 0, LastData: 4 * time.Millisecond},
		"13053180": {Received: 6, LastData: 0},
	}
	if len(got) != len(want) || got["13141515"] != want["13141515"] || got["13053170"] != want["13053170"] || got["13053180"] != want["13053180"] {
		t.Fatalf("parseSS = %+v, want %+v", got, want)
	}
	if got := parseSS(""); len(got) != 0 {
		t.Errorf("no sockets: got %v", got)
	}
	// A summary line without its tcp_info line.
	if got := parseSS("0      0      127.0.0.1:37256 127.0.0.2:56313 ino:42 sk:1 cgroup:/ <->\n"); got["42"] != (ssSocket{LastData: -1}) {
		t.Errorf("no tcp_info: got %+v", got)
	}
}

func TestAnswered(t *testing.T) {
	rx := func(m map[string]uint64) map[string]ssSocket {
		out := map[string]ssSocket{}
		for k, v := range m {
			out[k] = ssSocket{Received: v, LastData: -1}
		}
		return out
	}
	before := rx(map[string]uint64{"1": 100, "2": 50})
	mine := map[string]bool{"1": true, "3": true}
	for _, c := range []struct {
		name string
		now  map[string]uint64
		want bool
	}{
		{"nothing new", map[string]uint64{"1": 100, "2": 50}, false},
		{"another agent's connection received", map[string]uint64{"1": 100, "2": 90}, false},
		{"its connection received", map[string]uint64{"1": 120, "2": 50}, true},
		{"its new connection received", map[string]uint64{"1": 100, "3": 7}, true},
		{"its new connection, nothing received yet", map[string]uint64{"3": 0}, false},
	} {
		if got := answered(before, rx(c.now), mine); got != c.want {
			t.Errorf("%s: answered = %v, want %v", c.name, got, c.want)
		}
	}
}

func TestLastAnswer(t *testing.T) {
	socks := map[string]ssSocket{
		"1": {LastData: 3 * time.Second},
		"2": {LastData: 800 * time.Millisecond}, // another agent's
		"3": {LastData: 1200 * time.Millisecond},
		"4": {LastData: -1},
	}
	if got, ok := lastAnswer(socks, map[string]bool{"1": true, "3": true, "4": true}); !ok || got != 1200*time.Millisecond {
		t.Errorf("lastAnswer = %s %v, want 1.2s", got, ok)
	}
	if _, ok := lastAnswer(socks, map[string]bool{"4": true, "9": true}); ok {
		t.Error("lastAnswer found an answer where ss showed none")
	}
}

// TestConnsFromTheKernel reads a real loopback connection back from
// /proc and ss, as the HA section reads the agents'.
func TestConnsFromTheKernel(t *testing.T) {
	if _, err := exec.LookPath("ss"); err != nil {
		testkit.Missing(t, "ss (iproute2) is not installed")
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	port := l.Addr().(*net.TCPAddr).Port
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := l.Accept()
		if err == nil {
			accepted <- c
		}
		close(accepted)
	}()
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	srv := <-accepted
	if srv == nil {
		t.Fatal("accept failed")
	}
	defer srv.Close()

	table, err := readTCPTable()
	if err != nil {
		t.Fatal(err)
	}
	inodes, err := socketInodes(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	// The process holds both ends; only the client's has port as remote.
	if got := serverConns(table, inodes, port); got["127.0.0.1"] != 1 || len(got) != 1 {
		t.Fatalf("serverConns = %v, want map[127.0.0.1:1]", got)
	}

	to := []string{"dst", netAddr{IP: "127.0.0.1", Port: port}.String()}
	before, err := sockets(to...)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.WriteString(srv, "answer"); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 6)
	if err := c.SetReadDeadline(time.Now().Add(10 * time.Second)); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, buf); err != nil {
		t.Fatal(err)
	}
	now, err := sockets(to...)
	if err != nil {
		t.Fatal(err)
	}
	if !answered(before, now, inodes) {
		t.Errorf("the server's answer was not seen: before %v, now %v", before, now)
	}
	if last, ok := lastAnswer(now, inodes); !ok || last > 10*time.Second {
		t.Errorf("lastAnswer = %s %v, want the answer just read", last, ok)
	}
}
