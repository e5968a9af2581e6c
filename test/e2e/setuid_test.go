package e2e

// The attacks of this file: a process connects to the Workload API, hands
// the connection to a child, and then becomes something else under the
// same PID (a setuid-root program, a trusted binary) or exits. The child
// asks for an SVID over the inherited connection. The agent must answer
// from the credentials the kernel recorded at connect, or refuse with
// Unauthenticated; never with the identity of what the PID runs now.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/lanyard-dev/lanyard/internal/testkit"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// peerAttack is what the child of an attack reports.
type peerAttack struct {
	// Events are what the process under the connection's PID said or
	// did, in order: "root <pid>" (a setuid program runs with euid 0),
	// "dropped open" (it dropped root when the agent opened its
	// executable), "exec <path>" (it runs a trusted binary), "gone".
	Events []string `json:"events"`
	// EuidAtAnswer is the effective uid under the PID when the answer came.
	EuidAtAnswer int      `json:"euid_at_answer"`
	Code         string   `json:"code"`
	Message      string   `json:"message"`
	IDs          []string `json:"ids"`
	// SecondCode is the answer to a second call on the same connection.
	SecondCode string `json:"second_code"`
	// ClosedAfter is whether the agent closed the connection within 10 s
	// of the answers, so that a client reconnects.
	ClosedAfter bool   `json:"closed_after"`
	Error       string `json:"error,omitempty"`
}

// connectThenBecome is the attacker's first process: it connects to the
// socket args[0], waits for the agent's HTTP/2 SETTINGS (so the agent has
// accepted it and recorded it as the caller), starts a child that keeps
// the connection, and then, by args[1]: "setuid" executes args[2] (a
// setuid-root copy of this binary, role setuid-window), "exec" executes
// args[2] (a binary an entry trusts), "exit" exits.
func connectThenBecome(args []string) error {
	socket, mode := args[0], args[1]
	conn, err := net.Dial("unix", socket)
	if err != nil {
		return err
	}
	settings, err := readFrame(conn)
	if err != nil {
		return fmt.Errorf("reading the agent's first frame: %w", err)
	}
	evR, evW, err := os.Pipe()
	if err != nil {
		return err
	}
	cmR, cmW, err := os.Pipe()
	if err != nil {
		return err
	}
	connFile, err := conn.(*net.UnixConn).File()
	if err != nil {
		return err
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	child := exec.Command(self, roleArg, "peer-child", strconv.Itoa(os.Getpid()), mode, hex.EncodeToString(settings))
	// No Pdeathsig: this process execs or exits, and the child must live on.
	child.Stdin, child.Stdout, child.Stderr = os.Stdin, os.Stdout, os.Stderr
	child.ExtraFiles = []*os.File{connFile, evR, cmW}
	if err := child.Start(); err != nil {
		return err
	}
	switch mode {
	case "exit":
		return nil
	case "exec":
		return syscall.Exec(args[2], []string{args[2], "60"}, os.Environ())
	case "setuid":
		// The program under our PID reports on fd 3 and takes commands
		// on fd 4. Duplicate first: the pipes may sit on 3 or 4.
		ev, err := unix.Dup(int(evW.Fd()))
		if err != nil {
			return err
		}
		cm, err := unix.Dup(int(cmR.Fd()))
		if err != nil {
			return err
		}
		if err := unix.Dup3(ev, 3, 0); err != nil {
			return err
		}
		if err := unix.Dup3(cm, 4, 0); err != nil {
			return err
		}
		return syscall.Exec(args[2], []string{args[2], roleArg, "setuid-window"}, os.Environ())
	}
	return fmt.Errorf("unknown mode %q", mode)
}

// readFrame reads one HTTP/2 frame, header and payload, as raw bytes.
func readFrame(c net.Conn) ([]byte, error) {
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	defer c.SetReadDeadline(time.Time{})
	hdr := make([]byte, 9)
	if _, err := io.ReadFull(c, hdr); err != nil {
		return nil, err
	}
	n := int(hdr[0])<<16 | int(hdr[1])<<8 | int(hdr[2])
	if hdr[3] != 0x4 || n > 1<<14 {
		return nil, fmt.Errorf("the first frame is of type %d and %d bytes long, want SETTINGS", hdr[3], n)
	}
	payload := make([]byte, n)
	if _, err := io.ReadFull(c, payload); err != nil {
		return nil, err
	}
	return append(hdr, payload...), nil
}

// setuidWindow runs as a setuid-root program started by a user: it holds
// euid 0 until the agent opens its executable (which the agent does while
// attesting, when it discovers workload paths) or until told, then drops
// back to the user, as mount(8) does a moment after it starts. It reports
// on fd 3 and reads commands ("drop", "exit") from fd 4.
func setuidWindow() error {
	ev := os.NewFile(3, "events")
	cmds := os.NewFile(4, "commands")
	if os.Geteuid() != 0 {
		fmt.Fprintf(ev, "noroot %d\n", os.Geteuid())
		return nil
	}
	self, err := os.Readlink("/proc/self/exe")
	if err != nil {
		return err
	}
	in, err := unix.InotifyInit1(unix.IN_CLOEXEC)
	if err != nil {
		return err
	}
	if _, err := unix.InotifyAddWatch(in, self, unix.IN_OPEN); err != nil {
		return err
	}
	fmt.Fprintf(ev, "root %d\n", os.Getpid())
	drop := func(why string) error {
		if err := syscall.Setresuid(-1, os.Getuid(), -1); err != nil {
			return err
		}
		fmt.Fprintf(ev, "dropped %s\n", why)
		return nil
	}
	dropped := false
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		fds := []unix.PollFd{{Fd: int32(in), Events: unix.POLLIN}, {Fd: int32(cmds.Fd()), Events: unix.POLLIN}}
		if _, err := unix.Poll(fds, 1000); err != nil && !errors.Is(err, unix.EINTR) {
			return err
		}
		if fds[0].Revents&unix.POLLIN != 0 && !dropped {
			if err := drop("open"); err != nil {
				return err
			}
			dropped = true
		}
		if fds[1].Revents&(unix.POLLIN|unix.POLLHUP) != 0 {
			line, _ := bufio.NewReader(cmds).ReadString('\n')
			switch strings.TrimSpace(line) {
			case "drop":
				if !dropped {
					if err := drop("cmd"); err != nil {
						return err
					}
					dropped = true
				}
			default: // "exit", or the child is gone
				return nil
			}
		}
	}
	return nil
}

// peerChild is the attacker's second process. It holds the connection its
// parent (pid args[0]) opened, waits for the parent to become what args[1]
// says (see connectThenBecome), fetches an X509-SVID over the connection,
// makes a second call, and prints a peerAttack as JSON.
func peerChild(args []string) error {
	pid, mode := args[0], args[1]
	settings, err := hex.DecodeString(args[2])
	if err != nil {
		return err
	}
	time.AfterFunc(roleLifetime, func() { os.Exit(3) })
	conn, err := net.FileConn(os.NewFile(3, "conn"))
	if err != nil {
		return err
	}
	events := bufio.NewReader(os.NewFile(4, "events"))
	cmds := os.NewFile(5, "commands")
	var r peerAttack
	report := func() error {
		fmt.Fprintln(cmds, "exit")
		b, _ := json.Marshal(r)
		fmt.Printf("result %s\n", b)
		return nil
	}
	evLines := make(chan string, 8)
	go func() {
		for {
			line, err := events.ReadString('\n')
			if err != nil {
				close(evLines)
				return
			}
			evLines <- strings.TrimSpace(line)
		}
	}()
	switch mode {
	case "setuid":
		select {
		case line := <-evLines:
			r.Events = append(r.Events, line)
			if !strings.HasPrefix(line, "root ") {
				r.Error = "the setuid program did not run as root: " + line
				return report()
			}
		case <-time.After(20 * time.Second):
			r.Error = "the setuid program said nothing"
			return report()
		}
	case "exec":
		want := os.Getenv("LANYARD_TRUSTED_BIN")
		deadline := time.Now().Add(20 * time.Second)
		for {
			if exe, _ := os.Readlink("/proc/" + pid + "/exe"); exe == want {
				r.Events = append(r.Events, "exec "+exe)
				break
			}
			if time.Now().After(deadline) {
				r.Error = "the parent did not execute " + want
				return report()
			}
			time.Sleep(5 * time.Millisecond)
		}
	case "exit":
		// The test reaps the parent, then says go.
		line, _ := bufio.NewReader(os.Stdin).ReadString('\n')
		if strings.TrimSpace(line) != "go" {
			r.Error = "no go from the test"
			return report()
		}
		r.Events = append(r.Events, "gone")
	}

	first := true
	cc, err := grpc.NewClient("passthrough:///attacked",
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(context.Context, string) (net.Conn, error) {
			if !first {
				return nil, errors.New("the inherited connection is gone")
			}
			first = false
			return &replayConn{Conn: conn, r: io.MultiReader(bytes.NewReader(settings), conn)}, nil
		}))
	if err != nil {
		return err
	}
	defer cc.Close()
	ctx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(context.Background(), "workload.spiffe.io", "true"), 10*time.Second)
	defer cancel()
	client := workload.NewSpiffeWorkloadAPIClient(cc)
	stream, err := client.FetchX509SVID(ctx, &workload.X509SVIDRequest{})
	var resp *workload.X509SVIDResponse
	if err == nil {
		resp, err = stream.Recv()
	}
	r.EuidAtAnswer = euidOf(pid)
	s := status.Convert(err)
	r.Code, r.Message = s.Code().String(), s.Message()
	if resp != nil {
		for _, svid := range resp.Svids {
			r.IDs = append(r.IDs, svid.SpiffeId)
		}
	}
	_, err = client.FetchJWTSVID(ctx, &workload.JWTSVIDRequest{Audience: []string{"second"}})
	r.SecondCode = status.Code(err).String()
	waitCtx, waitCancel := context.WithTimeout(context.Background(), 10*time.Second)
	for st := cc.GetState(); st == connectivity.Ready; st = cc.GetState() {
		if !cc.WaitForStateChange(waitCtx, st) {
			break
		}
	}
	r.ClosedAfter = waitCtx.Err() == nil
	waitCancel()
	// Everything the program under the PID did, in order: it writes its
	// last event before it exits on this command.
	fmt.Fprintln(cmds, "exit")
	for drain := time.After(10 * time.Second); ; {
		select {
		case line, ok := <-evLines:
			if ok {
				r.Events = append(r.Events, line)
				continue
			}
		case <-drain:
		}
		break
	}
	return report()
}

// replayConn gives gRPC the agent's SETTINGS frame, which the parent read,
// before the rest of the connection.
type replayConn struct {
	net.Conn
	r io.Reader
}

func (c *replayConn) Read(b []byte) (int, error) { return c.r.Read(b) }

// euidOf reads a process's effective uid, or -1.
func euidOf(pid string) int {
	b, err := os.ReadFile("/proc/" + pid + "/status")
	if err != nil {
		return -1
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "Uid:"); ok {
			if f := strings.Fields(rest); len(f) > 1 {
				n, _ := strconv.Atoi(f[1])
				return n
			}
		}
	}
	return -1
}

// setuidCopy makes a setuid-root copy of the test binary next to roleBin.
func setuidCopy(t *testing.T, n int) string {
	t.Helper()
	data, err := os.ReadFile(roleBin)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(filepath.Dir(roleBin), "e2e-setuid-"+strconv.Itoa(os.Getpid())+"-"+strconv.Itoa(n))
	if err := os.WriteFile(path, data, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(path) })
	if err := os.Chown(path, 0, 0); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, os.ModeSetuid|0o755); err != nil {
		t.Fatal(err)
	}
	return path
}

// runPeerAttack runs connectThenBecome as the attacker and returns the
// child's report. The test reaps the first process before saying go in
// mode exit.
func runPeerAttack(t *testing.T, socket, mode string, extra ...string) peerAttack {
	t.Helper()
	stdinR, stdinW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer stdinR.Close()
	defer stdinW.Close()
	cmd := exec.Command(roleBin, append([]string{roleArg, "connect-then-become", socket, mode}, extra...)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: attackerUID, Gid: attackerUID, NoSetGroups: true}}
	cmd.Env = os.Environ()
	if mode == "exec" {
		cmd.Env = append(cmd.Env, "LANYARD_TRUSTED_BIN="+extra[0])
	}
	cmd.Stdin = stdinR
	// A file, not a pipe: the child keeps the attacker's stderr, and Wait
	// would wait for a pipe's copier until the child exits.
	stderr, err := os.CreateTemp("", "ly-attack-stderr-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.Remove(stderr.Name())
	defer stderr.Close()
	cmd.Stderr = stderr
	// A pipe of our own: Wait closes a StdoutPipe once the first process
	// exits, and the child's report comes later.
	out, outW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	cmd.Stdout = outW
	err = cmd.Start()
	outW.Close()
	if err != nil {
		t.Fatal(err)
	}
	lines := make(chan string, 16)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	waited := make(chan error, 1)
	go func() { waited <- cmd.Wait() }()
	defer func() {
		_ = cmd.Process.Kill()
	}()
	if mode == "exit" {
		select {
		case err := <-waited:
			if err != nil {
				t.Fatalf("the attacker's first process failed: %v\n%s", err, readAll(stderr.Name()))
			}
		case <-time.After(20 * time.Second):
			t.Fatal("the attacker's first process did not exit")
		}
		fmt.Fprintln(stdinW, "go")
	}
	deadline := time.After(30 * time.Second)
	for {
		select {
		case line, ok := <-lines:
			if !ok {
				t.Fatalf("the attacker printed no result; stderr:\n%s", readAll(stderr.Name()))
			}
			if rest, ok := strings.CutPrefix(line, "result "); ok {
				var r peerAttack
				if err := json.Unmarshal([]byte(rest), &r); err != nil {
					t.Fatal(err)
				}
				t.Logf("attack %s: %+v", mode, r)
				return r
			}
		case <-deadline:
			t.Fatalf("no result from the attacker within 30s; stderr:\n%s", readAll(stderr.Name()))
		}
	}
}

const rootEntryConfig = agentBlock + `plugins {
  WorkloadAttestor "unix" { plugin_data { discover_workload_path = @DISCOVER@ } }
  UpstreamAuthority "local" {
    plugin_data {
      entry {
        spiffe_id = "spiffe://example.org/root"
        selectors = ["unix:uid:0"]
      }
      entry {
        spiffe_id = "spiffe://example.org/victim"
        selectors = ["unix:uid:47002"]
      }
      entry {
        spiffe_id = "spiffe://example.org/trusted-binary"
        selectors = ["unix:path:@TRUSTED@"]
      }
    }
  }
}
`

func trustedBinary(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("sleep")
	if err != nil {
		t.Fatal(err)
	}
	real, err := filepath.EvalSymlinks(p)
	if err != nil {
		t.Fatal(err)
	}
	return real
}

func startAttackedAgent(t *testing.T, discover bool) *agentProc {
	t.Helper()
	cfg := strings.NewReplacer("@DISCOVER@", strconv.FormatBool(discover), "@TRUSTED@", trustedBinary(t)).Replace(rootEntryConfig)
	return startAgent(t, cfg)
}

// TestSetuidAfterConnectGetsNoRootIdentity is finding 1 of the attack
// review: the attacker connects, then executes a setuid-root program that
// holds euid 0 for a moment, and a child asks for an SVID over the
// connection in that moment. With discover_workload_path the setuid
// program drops root exactly when the agent opens its executable, that is
// after the agent has read the process's credentials and before it checks
// them again: the agent that read credentials from /proc handed out root's
// SVID every time.
func TestSetuidAfterConnectGetsNoRootIdentity(t *testing.T) {
	testkit.RequireRoot(t, "the attack runs a setuid-root program under another uid")
	for _, discover := range []bool{true, false} {
		t.Run(fmt.Sprintf("discover_workload_path=%v", discover), func(t *testing.T) {
			a := startAttackedAgent(t, discover)
			for attempt := range 3 {
				// A new file each time: the agent hashes each file once,
				// and the window is the hashing.
				r := runPeerAttack(t, a.socket, "setuid", setuidCopy(t, attempt))
				if r.Error != "" {
					t.Fatalf("attempt %d: the attack did not run as one: %s", attempt, r.Error)
				}
				// The attack ran as one: the program under the PID
				// held euid 0 when the request went out, and the agent
				// attested it in that window: either it was still root
				// at the answer, or it dropped root only when the agent
				// opened its executable (while attesting).
				inWindow := r.EuidAtAnswer == 0 || contains(r.Events, "dropped open")
				if !contains(r.Events, "root") || !inWindow {
					t.Fatalf("attempt %d: the request did not land in the setuid window (events %v, euid at answer %d)", attempt, r.Events, r.EuidAtAnswer)
				}
				for _, id := range r.IDs {
					t.Errorf("attempt %d: the attacker got %s", attempt, id)
				}
				if r.Code != "Unauthenticated" || r.SecondCode != "Unauthenticated" {
					t.Errorf("attempt %d: answers %s (%s) then %s, want Unauthenticated twice", attempt, r.Code, r.Message, r.SecondCode)
				}
				if !r.ClosedAfter {
					t.Errorf("attempt %d: the refused connection was not closed: a client retrying on it would never reconnect", attempt)
				}
			}
			if !strings.Contains(a.Logs.String(), "Refusing a caller") || !strings.Contains(a.Logs.String(), "uid="+strconv.Itoa(attackerUID)) {
				t.Errorf("the refusals were not logged with the attacker's uid")
			}
		})
	}
}

// TestExecAfterConnectGetsNoPathIdentity is finding 10: the attacker
// connects and then executes a binary that a unix:path entry trusts; the
// child that kept the connection must not get that entry's identity.
func TestExecAfterConnectGetsNoPathIdentity(t *testing.T) {
	testkit.RequireRoot(t, "to run the attacker under another uid")
	a := startAttackedAgent(t, true)
	trusted := trustedBinary(t)
	r := runPeerAttack(t, a.socket, "exec", trusted)
	if r.Error != "" {
		t.Fatalf("the attack did not run as one: %s", r.Error)
	}
	if !contains(r.Events, "exec "+trusted) {
		t.Fatalf("the parent did not run %s when the child asked: %v", trusted, r.Events)
	}
	for _, id := range r.IDs {
		t.Errorf("the attacker got %s", id)
	}
	if r.Code != "Unauthenticated" {
		t.Errorf("answer %s (%s), want Unauthenticated", r.Code, r.Message)
	}
}

// TestCallerGoneIsUnauthenticated is finding 9: when the process that
// connected exited (and was reaped), a child holding its connection gets
// Unauthenticated, on every call, not a closed connection.
func TestCallerGoneIsUnauthenticated(t *testing.T) {
	testkit.RequireRoot(t, "to run the attacker under another uid")
	a := startAttackedAgent(t, false)
	r := runPeerAttack(t, a.socket, "exit")
	if r.Error != "" {
		t.Fatalf("the attack did not run as one: %s", r.Error)
	}
	if r.Code != "Unauthenticated" || r.SecondCode != "Unauthenticated" {
		t.Errorf("answers %s (%s) then %s, want Unauthenticated twice", r.Code, r.Message, r.SecondCode)
	}
	if !r.ClosedAfter {
		t.Error("the refused connection was not closed")
	}
	for _, id := range r.IDs {
		t.Errorf("the orphaned connection got %s", id)
	}
}

func readAll(path string) string {
	b, _ := os.ReadFile(path)
	return string(b)
}

func contains(events []string, prefix string) bool {
	for _, e := range events {
		if strings.HasPrefix(e, prefix) {
			return true
		}
	}
	return false
}
