package bench

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/conf"
	"github.com/lanyard-dev/lanyard/test/spire/spiretest"
	"github.com/lanyard-dev/lanyard/workloadapi"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
)

// ProfileConfig is one profiling run of Lanyard's fetch path.
type ProfileConfig struct {
	Config    string // a lanyard config file; plugins must be linked into the caller
	ExpandEnv bool   // expand $VAR in it, as lanyard run -expandEnv
	Kind      Kind
	Clients   int
	Window    time.Duration
	CPUOut    string // CPU profile file; empty: none
	HeapOut   string // heap profile file, written after the load; empty: none
}

// Profile runs Lanyard's agent and Workload API in this process, wired as
// `lanyard run` wires them, drives a fetch workload at it from a child
// process (`lanyard-bench load`, so that the client's work is not in the
// profile), and writes pprof CPU and heap profiles of the agent. It
// returns the load generator's summary line.
func Profile(pc ProfileConfig) (string, error) {
	if pc.Window <= 0 || pc.Window > 10*time.Minute {
		return "", fmt.Errorf("the window must be in (0, 10m], not %s", pc.Window)
	}
	if pc.Config == "floor" {
		return profileFloor(pc)
	}
	cfg, err := conf.Load(pc.Config, pc.ExpandEnv)
	if err != nil {
		return "", err
	}
	log := hclog.New(&hclog.LoggerOptions{Name: "lanyard", Level: hclog.LevelFromString(cfg.Agent.LogLevel), Output: os.Stderr})
	a, err := agent.New(cfg, log)
	if err != nil {
		return "", err
	}
	l, err := agent.Listen(cfg.Agent.SocketPath, agent.DefaultMaxConnections(), log.Named("listener"))
	if err != nil {
		return "", err
	}
	srv := workloadapi.NewServer(workloadapi.Config{
		Log:                           log.Named("workloadapi"),
		Attestor:                      a,
		Identities:                    a.SVIDManager(),
		AllowUnauthenticatedVerifiers: cfg.Agent.AllowUnauthenticatedVerifiers,
	})
	ctx, cancel := context.WithCancel(context.Background())
	agentDone := make(chan struct{})
	go func() {
		defer close(agentDone)
		_ = a.Run(ctx)
	}()
	go func() { _ = srv.GRPC.Serve(l) }()
	defer func() {
		srv.Shutdown(time.Second)
		cancel()
		<-agentDone
	}()
	if err := waitSVID(cfg.Agent.SocketPath, startupBound, nil); err != nil {
		return "", err
	}
	return profileLoad(pc, cfg.Agent.SocketPath)
}

// profileFloor profiles the floor server instead, serving answers of the
// size Lanyard's have, for comparison.
func profileFloor(pc ProfileConfig) (string, error) {
	socket, stop, err := startSizedFloor()
	if err != nil {
		return "", err
	}
	defer stop()
	return profileLoad(pc, socket)
}

// startSizedFloor serves the sized floor on a socket in a new directory,
// and returns once it answers; stop ends it and removes the directory.
func startSizedFloor() (socket string, stop func(), err error) {
	dir, err := os.MkdirTemp("", "floor-")
	if err != nil {
		return "", nil, err
	}
	socket = filepath.Join(dir, "floor.sock")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- ServeFloor(ctx, socket, sizedFloor()) }()
	stop = func() {
		cancel()
		<-done
		os.RemoveAll(dir)
	}
	if err := waitSVID(socket, startupBound, nil); err != nil {
		stop()
		return "", nil, err
	}
	return socket, stop, nil
}

// sizedFloor answers as much as Lanyard does for one SVID: a chain of two
// certificates, a key and a bundle of one.
func sizedFloor() *Floor {
	cert := make([]byte, 600)
	return &Floor{
		X509: &workload.X509SVIDResponse{Svids: []*workload.X509SVID{{
			SpiffeId:    workloadID,
			X509Svid:    append(append([]byte(nil), cert...), cert...),
			X509SvidKey: make([]byte, 138),
			Bundle:      cert,
		}}},
		JWT: &workload.JWTSVIDResponse{Svids: []*workload.JWTSVID{{
			SpiffeId: workloadID,
			Svid:     string(make([]byte, 500)),
		}}},
	}
}

// profileLoad drives the load from a child process while profiling.
func profileLoad(pc ProfileConfig, socket string) (string, error) {
	self, err := os.Executable()
	if err != nil {
		return "", err
	}
	cmd := exec.Command(self, "load", "-socket", socket, "-kind", string(pc.Kind),
		"-clients", strconv.Itoa(pc.Clients), "-window", pc.Window.String())
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if pc.CPUOut != "" {
		f, err := os.Create(pc.CPUOut)
		if err != nil {
			return "", err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return "", err
		}
		defer pprof.StopCPUProfile()
	}
	cpu0, err := Proc{PID: os.Getpid()}.CPUSeconds()
	if err != nil {
		return "", err
	}
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("the load generator failed: %w", err)
	}
	pprof.StopCPUProfile()
	cpu1, err := Proc{PID: os.Getpid()}.CPUSeconds()
	if err != nil {
		return "", err
	}
	if pc.HeapOut != "" {
		runtime.GC()
		f, err := os.Create(pc.HeapOut)
		if err != nil {
			return "", err
		}
		defer f.Close()
		if err := pprof.WriteHeapProfile(f); err != nil {
			return "", err
		}
	}
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	line := strings.TrimSpace(string(out))
	line += fmt.Sprintf("; heap: live %s, in use %s, free but kept %s; stacks %s; from the OS %s",
		mb(ms.HeapAlloc), mb(ms.HeapInuse), mb(ms.HeapIdle-ms.HeapReleased), mb(ms.StackSys), mb(ms.Sys))
	// The load line starts "<kind> c=<n>: <throughput> fetches/s".
	var rate float64
	if _, after, ok := strings.Cut(line, ": "); ok {
		fmt.Sscanf(after, "%g", &rate)
	}
	if rate > 0 {
		line += fmt.Sprintf("; server CPU %.1f µs/fetch", (cpu1-cpu0)/(rate*pc.Window.Seconds())*1e6)
	}
	return line, nil
}

// ProfileWithSPIRE profiles Lanyard as the agent of a real spire-server
// (started here, through tb) that holds entries registration entries for
// the node, one of them for this process's uid.
func ProfileWithSPIRE(tb testing.TB, pc ProfileConfig, entries int) (string, error) {
	s := spiretest.StartServer(tb, spiretest.WithServerLogLevel("WARN"))
	list := []spiretest.Entry{uidEntry(workloadID, os.Getuid())}
	for i := 1; i < entries; i++ {
		list = append(list, uidEntry(fmt.Sprintf("spiffe://example.org/bench/entry/%05d", i), absentUID0+i))
	}
	s.CreateEntries(tb, list)
	dir := tb.TempDir()
	if err := os.WriteFile(dir+"/bundle.pem", s.BundlePEM(tb), 0o600); err != nil {
		return "", err
	}
	_, port, err := net.SplitHostPort(s.Addr)
	if err != nil {
		return "", err
	}
	pc.Config = dir + "/agent.conf"
	body := fmt.Sprintf(lanyardSPIREConf, dir, port, dir+"/api.sock", s.JoinToken(tb, nodeID), spiretest.AgentPlugins)
	if err := os.WriteFile(pc.Config, []byte(body), 0o600); err != nil {
		return "", err
	}
	line, err := Profile(pc)
	if err != nil {
		return "", err
	}
	if m, err := (Proc{PID: os.Getpid()}).Memory(); err == nil {
		line += fmt.Sprintf("; this process's RSS %s (anonymous %s)", mb(m.RSS), mb(m.Anon))
	}
	return line, nil
}
