package bench

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/test/spire/spiretest"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
)

// Target is a Workload API server under measurement.
type Target struct {
	Name   string
	Socket string
	Proc   Proc
	// Stop ends the target before the run does (nil: only at the end).
	Stop func()
}

// rss is the target's resident set size now; it fails tb if it cannot be
// read.
func (t Target) rss(tb testing.TB) uint64 {
	tb.Helper()
	rss, err := t.Proc.RSS()
	if err != nil {
		tb.Fatalf("%s: %v", t.Name, err)
	}
	return rss
}

// Target names, as reported.
const (
	NameLanyard = "lanyard"
	NameSpire   = "spire-agent"
	NameFloor   = "floor"
	// NameBaseline is another lanyard binary, e.g. the last commit's, run
	// beside the one measured (-baseline), for before/after figures.
	NameBaseline = "lanyard-base"
)

// startupBound bounds how long an agent may take to serve its first SVID.
const startupBound = 90 * time.Second

// lanyardSPIREConf is a spire-agent agent.conf as SPIRE's docs write it,
// which Lanyard runs unchanged: %[1]s is the node dir, %[2]s the server's
// port, %[3]s the socket, %[4]s the join token, %[5]s the plugins block.
const lanyardSPIREConf = `agent {
    data_dir = "%[1]s/data"
    log_level = "INFO"
    server_address = "127.0.0.1"
    server_port = "%[2]s"
    socket_path = "%[3]s"
    trust_bundle_path = "%[1]s/bundle.pem"
    trust_domain = "example.org"
    join_token = "%[4]s"
}

%[5]s`

// lanyardLocalConf runs Lanyard on its embedded CA with one entry for
// %[4]s (the uid of the load generator).
const lanyardLocalConf = `agent {
    data_dir = "%[1]s/data"
    log_level = "INFO"
    socket_path = "%[2]s"
    trust_domain = "example.org"
}

plugins {
    WorkloadAttestor "unix" {
        plugin_data {}
    }
    UpstreamAuthority "local" {
        plugin_data {
            entry {
                spiffe_id = "%[3]s"
                selectors = ["unix:uid:%[4]d"]
            }
        }
    }
}
`

// startLanyard runs `lanyard run -config <conf>` in a new dir; spire is
// nil for the embedded CA. It returns once Lanyard serves an X509-SVID.
func startLanyard(tb testing.TB, bin string, s *spiretest.Server, joinToken string) Target {
	tb.Helper()
	return startLanyardWith(tb, bin, s, joinToken, spiretest.AgentPlugins)
}

// startLanyardWith is startLanyard with the plugins block of a SPIRE
// upstream's config.
func startLanyardWith(tb testing.TB, bin string, s *spiretest.Server, joinToken, plugins string) Target {
	tb.Helper()
	dir := tb.TempDir()
	if err := os.Chmod(dir, 0o755); err != nil {
		tb.Fatalf("making the socket dir reachable by other uids: %v", err)
	}
	socket := filepath.Join(dir, "api.sock")
	var body string
	if s != nil {
		if err := os.WriteFile(filepath.Join(dir, "bundle.pem"), s.BundlePEM(tb), 0o600); err != nil {
			tb.Fatal(err)
		}
		_, port, err := net.SplitHostPort(s.Addr)
		if err != nil {
			tb.Fatal(err)
		}
		body = fmt.Sprintf(lanyardSPIREConf, dir, port, socket, joinToken, plugins)
	} else {
		body = fmt.Sprintf(lanyardLocalConf, dir, socket, workloadID, os.Getuid())
	}
	confPath := filepath.Join(dir, "agent.conf")
	if err := os.WriteFile(confPath, []byte(body), 0o600); err != nil {
		tb.Fatal(err)
	}
	logPath := filepath.Join(dir, "lanyard.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		tb.Fatal(err)
	}
	defer logFile.Close()
	cmd := exec.Command(bin, "run", "-config", confPath)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		tb.Fatalf("starting %s: %v", bin, err)
	}
	exited := make(chan error, 1)
	done := make(chan struct{})
	go func() {
		exited <- cmd.Wait()
		close(done)
	}()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			_ = cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-done:
			case <-time.After(15 * time.Second):
				_ = cmd.Process.Kill()
				<-done
			}
		})
	}
	tb.Cleanup(func() {
		stop()
		if tb.Failed() {
			b, _ := os.ReadFile(logPath)
			tb.Logf("lanyard log:\n%s", tail(b))
		}
	})
	t := Target{Name: NameLanyard, Socket: socket, Proc: Proc{PID: cmd.Process.Pid}, Stop: stop}
	if err := waitSVID(t.Socket, startupBound, exited); err != nil {
		b, _ := os.ReadFile(logPath)
		tb.Fatalf("lanyard: %v\n%s", err, tail(b))
	}
	return t
}

// waitSVID waits until socket serves the caller an X509-SVID.
func waitSVID(socket string, bound time.Duration, exited <-chan error) error {
	deadline := time.Now().Add(bound)
	var last error
	for time.Now().Before(deadline) {
		select {
		case err := <-exited:
			return fmt.Errorf("exited before serving: %v", err)
		default:
		}
		if last = fetchOnce(socket); last == nil {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("no X509-SVID on %s within %s: %v", socket, bound, last)
}

func fetchOnce(socket string) error {
	conn, err := Dial(socket)
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(WithHeader(context.Background()), 5*time.Second)
	defer cancel()
	return fetchX509(ctx, workload.NewSpiffeWorkloadAPIClient(conn))
}

// cannedResponses fetches an X509-SVID and a JWT-SVID answer from socket,
// for the floor to serve.
func cannedResponses(socket string) (*workload.X509SVIDResponse, *workload.JWTSVIDResponse, error) {
	conn, err := Dial(socket)
	if err != nil {
		return nil, nil, err
	}
	defer conn.Close()
	client := workload.NewSpiffeWorkloadAPIClient(conn)
	ctx, cancel := context.WithTimeout(WithHeader(context.Background()), 10*time.Second)
	defer cancel()
	stream, err := client.FetchX509SVID(ctx, &workload.X509SVIDRequest{})
	if err != nil {
		return nil, nil, err
	}
	x509, err := stream.Recv()
	if err != nil {
		return nil, nil, err
	}
	jwt, err := client.FetchJWTSVID(ctx, &workload.JWTSVIDRequest{Audience: []string{JWTAudience}})
	if err != nil {
		return nil, nil, err
	}
	return x509, jwt, nil
}

func tail(b []byte) string {
	const n = 8 << 10
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}

// BuildLanyard builds cmd/lanyard into dir and returns the binary's path.
func BuildLanyard(dir string) (string, error) {
	bin := filepath.Join(dir, "lanyard")
	cmd := exec.Command("go", "build", "-o", bin, "github.com/lanyard-dev/lanyard/cmd/lanyard")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("go build lanyard: %v\n%s", err, out)
	}
	return bin, nil
}

// startSPIREAgent runs spire-agent with joinToken and returns it once it
// serves an X509-SVID.
func startSPIREAgent(tb testing.TB, s *spiretest.Server, joinToken string, opts ...spiretest.AgentOption) Target {
	tb.Helper()
	sock := s.StartAgent(tb, joinToken, append([]spiretest.AgentOption{spiretest.WithAgentLogLevel("INFO")}, opts...)...)
	// Workloads of other uids connect too.
	if err := os.Chmod(filepath.Dir(sock), 0o755); err != nil {
		tb.Fatalf("making spire-agent's socket dir reachable by other uids: %v", err)
	}
	if err := waitSVID(sock, startupBound, nil); err != nil {
		tb.Fatalf("spire-agent: %v", err)
	}
	pid, err := SocketOwner(sock)
	if err != nil {
		tb.Fatal(err)
	}
	p := Proc{PID: pid}
	// spiretest stops it at the end of the run; this stops it sooner, by
	// its PID, and waits until spiretest has reaped it.
	stop := func() {
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
			return
		}
		for range 100 {
			if !p.Alive() {
				return
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	return Target{Name: NameSpire, Socket: sock, Proc: p, Stop: stop}
}
