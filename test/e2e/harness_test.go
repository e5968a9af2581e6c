// Package e2e runs the real lanyard binary and talks to it over its real
// Unix socket with go-spiffe's Workload API client.
package e2e

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
)

// lanyardBin is the binary under test, built once by TestMain.
var lanyardBin string

func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == roleArg {
		os.Exit(runRole(os.Args[2:]))
	}
	os.Exit(runTests(m))
}

func runTests(m *testing.M) int {
	return testkit.RunWithLanyard(m, func(bin string) error {
		lanyardBin = bin
		return placeRoleBin(filepath.Dir(bin))
	})
}

// agentProc is a running lanyard agent.
type agentProc struct {
	*testkit.Process
	t       *testing.T
	dir     string
	config  string
	socket  string
	dataDir string
	// nofile, when set, is the agent's open-file limit, from which it
	// sizes its connection limit.
	nofile int
}

// newAgentDir makes a short-pathed directory for the agent's socket that
// other users can traverse.
func newAgentDir(t *testing.T) string { return testkit.ShortDir(t, "ly-") }

// expandConfig fills the placeholders @DATA@, @SOCKET@ and @UID@.
func expandConfig(body, dataDir, socket string) string {
	return strings.NewReplacer("@DATA@", dataDir, "@SOCKET@", socket, "@UID@", strconv.Itoa(os.Getuid())).Replace(body)
}

// startAgent writes config (with placeholders) into a new directory and
// runs the agent on it until it serves.
func startAgent(t *testing.T, config string) *agentProc {
	dir := newAgentDir(t)
	return startAgentIn(t, dir, config)
}

func startAgentIn(t *testing.T, dir, config string) *agentProc {
	t.Helper()
	a := newAgentProc(t, dir, config)
	if err := a.start(); err != nil {
		t.Fatal(err)
	}
	return a
}

// newAgentProc writes config (with placeholders) into dir, for an agent
// the test starts itself.
func newAgentProc(t *testing.T, dir, config string) *agentProc {
	t.Helper()
	a := &agentProc{
		t:       t,
		dir:     dir,
		config:  filepath.Join(dir, "agent.conf"),
		socket:  filepath.Join(dir, "public", "api.sock"),
		dataDir: filepath.Join(dir, "data"),
	}
	a.writeConfig(config)
	return a
}

func (a *agentProc) writeConfig(config string) {
	a.t.Helper()
	if err := os.WriteFile(a.config, []byte(expandConfig(config, a.dataDir, a.socket)), 0o644); err != nil {
		a.t.Fatal(err)
	}
}

func (a *agentProc) start() error {
	bin, args := lanyardBin, []string{"run", "-config", a.config}
	if a.nofile > 0 {
		bin, args = roleBin, append([]string{roleArg, "nofile", strconv.Itoa(a.nofile), lanyardBin}, args...)
	}
	p, err := testkit.Start(a.t, bin, args...)
	if err != nil {
		return err
	}
	a.Process = p
	return p.WaitServing(a.socket, 30*time.Second)
}

func (a *agentProc) healthy() bool { return testkit.Serving(a.socket) }

// reload rewrites the config and sends SIGHUP, then waits for the agent to
// log the outcome.
func (a *agentProc) reload(config, wantLog string) {
	a.t.Helper()
	before := strings.Count(a.Logs.String(), wantLog)
	a.writeConfig(config)
	if err := a.Cmd.Process.Signal(syscall.SIGHUP); err != nil {
		a.t.Fatal(err)
	}
	waitFor(a.t, 10*time.Second, "the agent to log "+strconv.Quote(wantLog), func() bool {
		return strings.Count(a.Logs.String(), wantLog) > before
	})
}

func (a *agentProc) client(t *testing.T) *workloadapi.Client {
	t.Helper()
	c, err := workloadapi.New(context.Background(), workloadapi.WithAddr("unix://"+a.socket))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// rawConn is a plain gRPC connection, for calls the go-spiffe client would
// not make (no security header, unimplemented methods).
func (a *agentProc) rawConn(t *testing.T) *grpc.ClientConn { return testkit.Dial(t, a.socket) }

func withHeader(ctx context.Context) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "workload.spiffe.io", "true")
}

var waitFor = testkit.WaitFor

func testContext(t *testing.T) context.Context { return testkit.Context(t, 30*time.Second) }

// runCLI runs the lanyard binary and returns its combined output and exit code.
func runCLI(t *testing.T, args ...string) (string, int) {
	t.Helper()
	return testkit.RunCLI(t, lanyardBin, args...)
}
