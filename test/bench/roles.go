package bench

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// The harness runs parts of itself as child processes: the floor server
// (so that its CPU and memory are its own) and workloads with other uids
// (each workload a process of its own, as the agents attest processes).
// The child is the same executable, told its role by the environment.

const (
	roleEnv = "LANYARD_BENCH_ROLE"
	argsEnv = "LANYARD_BENCH_ARGS"

	roleFloor      = "floor"
	roleHolder     = "holder"
	roleFirstFetch = "first-fetch"

	// childRetry is how often a child workload retries a fetch that the
	// agent refused (no identity yet) or could not answer.
	childRetry = 50 * time.Millisecond
	// childBound bounds how long a child workload tries.
	childBound = 120 * time.Second
)

// RunRole runs the child role named in the environment and exits, or
// returns at once when there is none. Call it first thing in main (and in
// TestMain of tests that run the harness).
func RunRole() {
	role := os.Getenv(roleEnv)
	if role == "" {
		return
	}
	var err error
	switch role {
	case roleFloor:
		err = floorRole()
	case roleHolder:
		err = holderRole()
	case roleFirstFetch:
		err = firstFetchRole()
	default:
		err = fmt.Errorf("unknown role %q", role)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "lanyard-bench %s: %v\n", role, err)
		os.Exit(1)
	}
	os.Exit(0)
}

func roleArgs(v any) error {
	return json.Unmarshal([]byte(os.Getenv(argsEnv)), v)
}

// untilStdinCloses returns a context that ends when the parent closes the
// child's stdin (or dies), or on SIGTERM.
func untilStdinCloses() (context.Context, context.CancelFunc) {
	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		cancel()
	}()
	return ctx, cancel
}

type floorArgs struct {
	Socket string `json:"socket"`
	X509   []byte `json:"x509"` // a marshalled X509SVIDResponse
	JWT    []byte `json:"jwt"`  // a marshalled JWTSVIDResponse
}

func floorRole() error {
	var a floorArgs
	if err := roleArgs(&a); err != nil {
		return err
	}
	f := &Floor{X509: &workload.X509SVIDResponse{}, JWT: &workload.JWTSVIDResponse{}}
	if err := proto.Unmarshal(a.X509, f.X509); err != nil {
		return err
	}
	if err := proto.Unmarshal(a.JWT, f.JWT); err != nil {
		return err
	}
	ctx, cancel := untilStdinCloses()
	defer cancel()
	errc := make(chan error, 1)
	go func() { errc <- ServeFloor(ctx, a.Socket, f) }()
	// Ready once the socket answers.
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := SocketOwner(a.Socket); err == nil {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the floor did not listen on %s", a.Socket)
		}
		time.Sleep(10 * time.Millisecond)
	}
	fmt.Println("ready")
	return <-errc
}

type holderArgs struct {
	Sockets []string `json:"sockets"`
}

// holderRole holds a FetchX509SVID stream on each socket, printing
// "ready <i>" once stream i has its first SVID, until stdin closes.
func holderRole() error {
	var a holderArgs
	if err := roleArgs(&a); err != nil {
		return err
	}
	ctx, cancel := untilStdinCloses()
	defer cancel()
	var mu sync.Mutex
	var wg sync.WaitGroup
	errc := make(chan error, len(a.Sockets))
	for i, sock := range a.Sockets {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := holdStream(ctx, sock, func() {
				mu.Lock()
				fmt.Printf("ready %d\n", i)
				mu.Unlock()
			}); err != nil && ctx.Err() == nil {
				errc <- fmt.Errorf("%s: %w", sock, err)
				cancel()
			}
		}()
	}
	wg.Wait()
	close(errc)
	return <-errc
}

// holdStream opens FetchX509SVID, retrying while the agent has no identity
// for the caller, calls ready on the first SVID and reads on until ctx
// ends.
func holdStream(ctx context.Context, sock string, ready func()) error {
	conn, err := Dial(sock)
	if err != nil {
		return err
	}
	defer conn.Close()
	client := workload.NewSpiffeWorkloadAPIClient(conn)
	deadline := time.Now().Add(childBound)
	for first := true; ; {
		stream, err := client.FetchX509SVID(WithHeader(ctx), &workload.X509SVIDRequest{})
		for err == nil {
			var resp *workload.X509SVIDResponse
			if resp, err = stream.Recv(); err == nil && len(resp.Svids) > 0 && first {
				first = false
				ready()
			}
		}
		if ctx.Err() != nil {
			return nil
		}
		if !retryable(err) || time.Now().After(deadline) {
			return err
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(childRetry):
		}
	}
}

func retryable(err error) bool {
	switch status.Code(err) {
	case codes.PermissionDenied, codes.Unavailable:
		return true
	}
	return false
}

type firstFetchArgs struct {
	Socket string `json:"socket"`
	// WaitGo makes the child print "ready" and wait for a line on stdin
	// before it connects, so that the harness can place it in a cgroup and
	// start many at once.
	WaitGo bool `json:"wait_go,omitempty"`
}

// FirstFetch is what a first-fetch child reports: when it got its first
// X509-SVID and how many times the agent refused it before.
type FirstFetch struct {
	AtUnixNano int64  `json:"at_unix_nano"`
	Denied     int    `json:"denied"`
	Err        string `json:"err,omitempty"`
}

// firstFetchRole fetches until it gets an X509-SVID, retrying on
// PermissionDenied, and prints a FirstFetch as JSON.
func firstFetchRole() error {
	var a firstFetchArgs
	if err := roleArgs(&a); err != nil {
		return err
	}
	if a.WaitGo {
		fmt.Println("ready")
		if _, err := bufio.NewReader(os.Stdin).ReadString('\n'); err != nil {
			return fmt.Errorf("waiting for the go line: %w", err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), childBound)
	defer cancel()
	conn, err := Dial(a.Socket)
	if err != nil {
		return err
	}
	defer conn.Close()
	client := workload.NewSpiffeWorkloadAPIClient(conn)
	var out FirstFetch
	for {
		err := fetchX509(WithHeader(ctx), client)
		if err == nil {
			out.AtUnixNano = time.Now().UnixNano()
			break
		}
		if status.Code(err) == codes.PermissionDenied {
			out.Denied++
		}
		if !retryable(err) || ctx.Err() != nil {
			out.Err = err.Error()
			break
		}
		time.Sleep(childRetry)
	}
	return json.NewEncoder(os.Stdout).Encode(out)
}

// child is a running child role.
type child struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	lines chan string // stdout, line by line; closed at EOF
	done  chan struct{}
	err   error // set before done closes
	errb  *testkit.Buffer
}

// exe is a copy of this executable that every uid may run (go run and go
// test build into directories only their user can read).
type exe struct{ path string }

func newExe(dir string) (*exe, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		return nil, err
	}
	dst := filepath.Join(dir, "lanyard-bench")
	in, err := os.Open(self)
	if err != nil {
		return nil, err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		return nil, err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return nil, err
	}
	if err := out.Close(); err != nil {
		return nil, err
	}
	return &exe{path: dst}, nil
}

// start runs role with args; uid and gid, when not negative, are the
// child's credentials.
func (e *exe) start(role string, args any, uid, gid int) (*child, error) {
	b, err := json.Marshal(args)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(e.path)
	cmd.Env = append(os.Environ(), roleEnv+"="+role, argsEnv+"="+string(b))
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if uid >= 0 {
		cmd.SysProcAttr.Credential = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), NoSetGroups: true}
		cmd.Dir = "/"
	}
	c := &child{cmd: cmd, lines: make(chan string, 64), done: make(chan struct{}), errb: &testkit.Buffer{Limit: 64 << 10}}
	if c.stdin, err = cmd.StdinPipe(); err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	cmd.Stderr = c.errb
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting the %s child: %w", role, err)
	}
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			c.lines <- sc.Text()
		}
		close(c.lines)
		c.err = cmd.Wait()
		close(c.done)
	}()
	return c, nil
}

// line waits for the child's next line of output.
func (c *child) line(timeout time.Duration) (string, error) {
	select {
	case l, ok := <-c.lines:
		if !ok {
			<-c.done
			return "", fmt.Errorf("the child exited (%v): %s", c.err, strings.TrimSpace(c.errb.String()))
		}
		return l, nil
	case <-time.After(timeout):
		return "", fmt.Errorf("no answer from the child within %s", timeout)
	}
}

// stop closes the child's stdin, which ends it, and kills it if it has not
// exited within a few seconds.
func (c *child) stop() {
	c.stdin.Close()
	go func() {
		for range c.lines {
		}
	}()
	select {
	case <-c.done:
	case <-time.After(5 * time.Second):
		_ = c.cmd.Process.Kill()
		<-c.done
	}
}
