// Package spiretest runs the real SPIRE (spire-server, spire-agent) as a test
// peer. The binaries come from test/spire/build.sh, which builds them from a
// separate Go module, so this package never imports SPIRE.
//
// Set LANYARD_SKIP_INTEROP=1 to skip tests that need SPIRE; otherwise a
// failure to build or start SPIRE fails the test.
package spiretest

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/attestor"
	"github.com/lanyard-dev/lanyard/internal/testkit"
	"golang.org/x/sys/unix"
)

// SkipEnv names the environment variable that, set to "1", skips SPIRE
// interop tests.
const SkipEnv = "LANYARD_SKIP_INTEROP"

const (
	// Bounds for waiting on SPIRE processes; generous because CI machines
	// with 2 cores running tests in parallel are slow.
	startTimeout = 60 * time.Second
	cliTimeout   = 30 * time.Second
	killTimeout  = 10 * time.Second
	pollEvery    = 100 * time.Millisecond
	logTailBytes = 16 << 10
)

var (
	binOnce sync.Once
	binDir  string
	binErr  error
)

// Binaries returns the dir holding spire-server and spire-agent, building
// them via build.sh if needed. The build runs once per test binary and is
// serialized across test binaries with a file lock, so parallel packages do
// not build twice. It skips the test only if LANYARD_SKIP_INTEROP=1.
func Binaries(t testing.TB) string {
	t.Helper()
	if os.Getenv(SkipEnv) == "1" {
		t.Skipf("%s=1: skipping test that needs the real SPIRE", SkipEnv)
	}
	binOnce.Do(func() { binDir, binErr = buildBinaries() })
	if binErr != nil {
		t.Fatalf("building the real SPIRE test peer: %v\n(set %s=1 to skip interop tests)", binErr, SkipEnv)
	}
	return binDir
}

func buildBinaries() (string, error) {
	script, err := findBuildScript()
	if err != nil {
		return "", err
	}
	lockPath := filepath.Join(os.TempDir(), "lanyard-spire-build.lock")
	lock, err := os.OpenFile(lockPath, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return "", fmt.Errorf("opening build lock %s: %w", lockPath, err)
	}
	defer lock.Close()
	// Blocks while another test binary builds; go test's -timeout bounds it.
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		return "", fmt.Errorf("locking %s: %w", lockPath, err)
	}
	// Closing the file (deferred above) releases the lock.

	var stdout, stderr bytes.Buffer
	cmd := exec.Command("sh", script)
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("%s failed: %w\n%s", script, err, tail(stderr.Bytes()))
	}
	lines := strings.Split(strings.TrimSpace(stdout.String()), "\n")
	dir := strings.TrimSpace(lines[len(lines)-1])
	for _, name := range []string{"spire-server", "spire-agent"} {
		if _, err := os.Stat(filepath.Join(dir, name)); err != nil {
			return "", fmt.Errorf("%s printed bin dir %q but %s is not there: %w", script, dir, name, err)
		}
	}
	return dir, nil
}

// findBuildScript locates test/spire/build.sh from this source file, or,
// when built with -trimpath, by walking up from the working directory.
func findBuildScript() (string, error) {
	if _, file, _, ok := runtime.Caller(0); ok && filepath.IsAbs(file) {
		p := filepath.Join(filepath.Dir(file), "..", "build.sh")
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	wd, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("finding build.sh: %w", err)
	}
	for dir := wd; ; dir = filepath.Dir(dir) {
		p := filepath.Join(dir, "test", "spire", "build.sh")
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
		if filepath.Dir(dir) == dir {
			return "", fmt.Errorf("test/spire/build.sh not found above %s; run tests from inside the lanyard repo", wd)
		}
	}
}

// Server is a running spire-server. Fields are fixed for its lifetime,
// including across Stop and Start.
type Server struct {
	Dir         string // data dir (config, datastore, keys, log)
	BinDir      string // holds spire-server and spire-agent
	TrustDomain string // e.g. "example.org"
	Addr        string // 127.0.0.1:port of the agent-facing API
	SocketPath  string // admin API Unix socket
	ConfigPath  string
	LogPath     string // stdout and stderr of every run, appended

	t    testing.TB
	mu   sync.Mutex
	proc *process
}

type serverConfig struct {
	trustDomain         string
	caTTL               time.Duration
	x509SVIDTTL         time.Duration
	jwtSVIDTTL          time.Duration
	cacheReloadInterval time.Duration
	logLevel            string
}

// ServerOption configures StartServer.
type ServerOption func(*serverConfig)

// WithTrustDomain sets the trust domain (default "example.org").
func WithTrustDomain(td string) ServerOption {
	return func(c *serverConfig) { c.trustDomain = td }
}

// WithCATTL sets ca_ttl (SPIRE's default is 24h).
func WithCATTL(d time.Duration) ServerOption {
	return func(c *serverConfig) { c.caTTL = d }
}

// WithX509SVIDTTL sets default_x509_svid_ttl (SPIRE's default is 1h).
func WithX509SVIDTTL(d time.Duration) ServerOption {
	return func(c *serverConfig) { c.x509SVIDTTL = d }
}

// WithJWTSVIDTTL sets default_jwt_svid_ttl (SPIRE's default is 5m).
func WithJWTSVIDTTL(d time.Duration) ServerOption {
	return func(c *serverConfig) { c.jwtSVIDTTL = d }
}

// WithCacheReloadInterval sets experimental.cache_reload_interval, how often
// the server refreshes its entry cache (SPIRE's default is 5s).
func WithCacheReloadInterval(d time.Duration) ServerOption {
	return func(c *serverConfig) { c.cacheReloadInterval = d }
}

// WithServerLogLevel sets log_level (default "DEBUG").
func WithServerLogLevel(level string) ServerOption {
	return func(c *serverConfig) { c.logLevel = level }
}

// StartServer starts spire-server on 127.0.0.1 with a free port, a sqlite
// datastore, the disk key manager and the join_token node attestor, in
// t.TempDir(). It returns once the server reports healthy and stops it in
// t.Cleanup.
func StartServer(t testing.TB, opts ...ServerOption) *Server {
	t.Helper()
	cfg := serverConfig{trustDomain: "example.org", logLevel: "DEBUG"}
	for _, o := range opts {
		o(&cfg)
	}
	binDir := Binaries(t)
	dir := t.TempDir()
	sockDir := testkit.ShortDir(t, "spt")
	port := freePort(t)

	s := &Server{
		Dir:         dir,
		BinDir:      binDir,
		TrustDomain: cfg.trustDomain,
		Addr:        net.JoinHostPort("127.0.0.1", strconv.Itoa(port)),
		SocketPath:  filepath.Join(sockDir, "server.sock"),
		ConfigPath:  filepath.Join(dir, "server.conf"),
		LogPath:     filepath.Join(dir, "server.log"),
		t:           t,
	}

	var extra strings.Builder
	for _, kv := range []struct {
		key string
		d   time.Duration
	}{
		{"ca_ttl", cfg.caTTL},
		{"default_x509_svid_ttl", cfg.x509SVIDTTL},
		{"default_jwt_svid_ttl", cfg.jwtSVIDTTL},
	} {
		if kv.d > 0 {
			fmt.Fprintf(&extra, "    %s = %q\n", kv.key, kv.d.String())
		}
	}
	if cfg.cacheReloadInterval > 0 {
		fmt.Fprintf(&extra, "    experimental {\n        cache_reload_interval = %q\n    }\n", cfg.cacheReloadInterval.String())
	}
	conf := fmt.Sprintf(`server {
    bind_address = "127.0.0.1"
    bind_port = %d
    socket_path = %q
    trust_domain = %q
    data_dir = %q
    log_level = %q
%s}

plugins {
    DataStore "sql" {
        plugin_data {
            database_type = "sqlite3"
            connection_string = %q
        }
    }
    KeyManager "disk" {
        plugin_data {
            keys_path = %q
        }
    }
    NodeAttestor "join_token" {
        plugin_data {}
    }
}
`, port, s.SocketPath, s.TrustDomain, filepath.Join(dir, "data"), cfg.logLevel, extra.String(),
		filepath.Join(dir, "data", "datastore.sqlite3"), filepath.Join(dir, "data", "keys.json"))
	if err := os.WriteFile(s.ConfigPath, []byte(conf), 0o600); err != nil {
		t.Fatalf("writing spire-server config: %v", err)
	}

	t.Cleanup(func() {
		s.mu.Lock()
		p := s.proc
		s.proc = nil
		s.mu.Unlock()
		if p != nil {
			if err := p.kill(); err != nil {
				t.Errorf("stopping spire-server: %v", err)
			}
		}
		if t.Failed() {
			logTail(t, "spire-server", s.LogPath)
		}
	})
	s.Start()
	return s
}

// Start starts the server process again after Stop, with the same config,
// data dir, port and socket, and waits until it is healthy. Call it from
// the test goroutine.
func (s *Server) Start() {
	s.t.Helper()
	s.mu.Lock()
	if s.proc != nil {
		s.mu.Unlock()
		s.t.Fatalf("spire-server is already running")
	}
	p, err := startProcess(filepath.Join(s.BinDir, "spire-server"), s.LogPath, "run", "-config", s.ConfigPath)
	if err != nil {
		s.mu.Unlock()
		s.t.Fatalf("starting spire-server: %v", err)
	}
	s.proc = p
	s.mu.Unlock()

	err = waitHealthy(p, func(ctx context.Context) error {
		_, err := s.run(ctx, "healthcheck")
		return err
	})
	if err != nil {
		s.t.Fatalf("spire-server did not become healthy: %v\n%s", err, readTail(s.LogPath))
	}
}

// Stop kills the server process (SIGKILL, like a crash) and waits for it to
// exit. Its data stays, so Start brings the same server back.
func (s *Server) Stop() {
	s.t.Helper()
	s.mu.Lock()
	p := s.proc
	s.proc = nil
	s.mu.Unlock()
	if p == nil {
		s.t.Fatalf("spire-server is not running")
	}
	if err := p.kill(); err != nil {
		s.t.Fatalf("stopping spire-server: %v", err)
	}
}

// CLI runs `spire-server <args> -socketPath s.SocketPath` and returns its
// stdout, failing the test with the output on error.
func (s *Server) CLI(t testing.TB, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), cliTimeout)
	defer cancel()
	out, err := s.run(ctx, args...)
	if err != nil {
		t.Fatalf("spire-server %s: %v", strings.Join(args, " "), err)
	}
	return out
}

func (s *Server) run(ctx context.Context, args ...string) (string, error) {
	args = append(append([]string(nil), args...), "-socketPath", s.SocketPath)
	return runCLI(ctx, filepath.Join(s.BinDir, "spire-server"), args...)
}

// JoinToken generates a join token. If spiffeID is not empty, the agent that
// attests with it also gets that SPIFFE ID (a node alias), so it can be used
// as the parent ID of workload entries.
func (s *Server) JoinToken(t testing.TB, spiffeID string) string {
	t.Helper()
	args := []string{"token", "generate", "-output", "json"}
	if spiffeID != "" {
		args = append(args, "-spiffeID", spiffeID)
	}
	var resp struct {
		Value string `json:"value"`
	}
	decodeJSON(t, s.CLI(t, args...), &resp)
	if resp.Value == "" {
		t.Fatalf("spire-server token generate returned no token")
	}
	return resp.Value
}

// Entry is a registration entry to create; selectors are "type:value",
// e.g. "unix:uid:1000".
type Entry struct {
	ParentID  string
	SPIFFEID  string
	Selectors []string
}

// CreateEntry creates a registration entry and returns its ID.
func (s *Server) CreateEntry(t testing.TB, parentID, spiffeID string, selectors ...string) string {
	t.Helper()
	return s.CreateEntries(t, []Entry{{ParentID: parentID, SPIFFEID: spiffeID, Selectors: selectors}})[0]
}

// entriesPerCall bounds one `entry create -data` call.
const entriesPerCall = 1000

// CreateEntries creates entries with `spire-server entry create -data`, a
// thousand per call, and returns their IDs in order.
func (s *Server) CreateEntries(t testing.TB, entries []Entry) []string {
	t.Helper()
	type selector struct {
		Type  string `json:"type"`
		Value string `json:"value"`
	}
	type entry struct {
		SPIFFEID  string     `json:"spiffe_id"`
		ParentID  string     `json:"parent_id"`
		Selectors []selector `json:"selectors"`
	}
	var ids []string
	for chunk := range slices.Chunk(entries, entriesPerCall) {
		doc := struct {
			Entries []entry `json:"entries"`
		}{}
		for _, e := range chunk {
			je := entry{SPIFFEID: e.SPIFFEID, ParentID: e.ParentID}
			for _, sel := range e.Selectors {
				parsed, err := attestor.ParseSelector(sel)
				if err != nil {
					t.Fatalf("entry %s: %v", e.SPIFFEID, err)
				}
				je.Selectors = append(je.Selectors, selector{Type: parsed.Type, Value: parsed.Value})
			}
			doc.Entries = append(doc.Entries, je)
		}
		data, err := json.Marshal(doc)
		if err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(t.TempDir(), "entries.json")
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		var resp struct {
			Results []struct {
				Status struct {
					Code    int    `json:"code"`
					Message string `json:"message"`
				} `json:"status"`
				Entry struct {
					ID string `json:"id"`
				} `json:"entry"`
			} `json:"results"`
		}
		decodeJSON(t, s.CLI(t, "entry", "create", "-data", path, "-output", "json"), &resp)
		if len(resp.Results) != len(chunk) {
			t.Fatalf("spire-server entry create: %d results for %d entries", len(resp.Results), len(chunk))
		}
		for _, r := range resp.Results {
			if r.Status.Code != 0 || r.Entry.ID == "" {
				t.Fatalf("spire-server entry create failed: code %d: %s", r.Status.Code, r.Status.Message)
			}
			ids = append(ids, r.Entry.ID)
		}
	}
	return ids
}

// DeleteEntry deletes the registration entry with the given ID.
func (s *Server) DeleteEntry(t testing.TB, id string) {
	t.Helper()
	s.CLI(t, "entry", "delete", "-entryID", id)
}

// BundlePEM returns the server's X.509 trust bundle as PEM.
func (s *Server) BundlePEM(t testing.TB) []byte {
	t.Helper()
	out := s.CLI(t, "bundle", "show", "-format", "pem")
	if !strings.Contains(out, "-----BEGIN CERTIFICATE-----") {
		t.Fatalf("spire-server bundle show returned no certificate:\n%s", out)
	}
	return []byte(out)
}

// BundleCerts returns the server's X.509 trust bundle's certificates.
func (s *Server) BundleCerts(t testing.TB) []*x509.Certificate {
	t.Helper()
	var certs []*x509.Certificate
	for rest := s.BundlePEM(t); ; {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			return certs
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			t.Fatalf("parsing bundle certificate: %v", err)
		}
		certs = append(certs, c)
	}
}

// PrepareX509Authority prepares a new X.509 authority (adding it to the
// bundle) and returns its authority ID.
func (s *Server) PrepareX509Authority(t testing.TB) string {
	t.Helper()
	return s.prepareAuthority(t, "x509")
}

// ActivateX509Authority makes the prepared X.509 authority the active one.
func (s *Server) ActivateX509Authority(t testing.TB, id string) {
	t.Helper()
	s.CLI(t, "localauthority", "x509", "activate", "-authorityID", id)
}

// PrepareJWTAuthority prepares a new JWT authority (adding its key to the
// bundle) and returns its authority ID.
func (s *Server) PrepareJWTAuthority(t testing.TB) string {
	t.Helper()
	return s.prepareAuthority(t, "jwt")
}

// ActivateJWTAuthority makes the prepared JWT authority the active one.
func (s *Server) ActivateJWTAuthority(t testing.TB, id string) {
	t.Helper()
	s.CLI(t, "localauthority", "jwt", "activate", "-authorityID", id)
}

func (s *Server) prepareAuthority(t testing.TB, kind string) string {
	t.Helper()
	var resp struct {
		PreparedAuthority struct {
			AuthorityID string `json:"authority_id"`
		} `json:"prepared_authority"`
	}
	decodeJSON(t, s.CLI(t, "localauthority", kind, "prepare", "-output", "json"), &resp)
	if resp.PreparedAuthority.AuthorityID == "" {
		t.Fatalf("spire-server localauthority %s prepare returned no authority ID", kind)
	}
	return resp.PreparedAuthority.AuthorityID
}

// AgentPlugins is the plugins block of the agent.conf StartAgent writes:
// join_token attestation, keys in memory, the unix workload attestor.
// Lanyard runs it unchanged.
const AgentPlugins = `plugins {
    NodeAttestor "join_token" {
        plugin_data {}
    }
    KeyManager "memory" {
        plugin_data {}
    }
    WorkloadAttestor "unix" {
        plugin_data {}
    }
}
`

type agentConfig struct {
	syncInterval time.Duration
	logLevel     string
}

// AgentOption configures StartAgent.
type AgentOption func(*agentConfig)

// WithSyncInterval sets experimental.sync_interval, how often the agent
// pulls entries and SVIDs from the server (SPIRE's default is 5s).
func WithSyncInterval(d time.Duration) AgentOption {
	return func(c *agentConfig) { c.syncInterval = d }
}

// WithAgentLogLevel sets log_level (default "DEBUG").
func WithAgentLogLevel(level string) AgentOption {
	return func(c *agentConfig) { c.logLevel = level }
}

// StartAgent runs a real spire-agent against the server, attesting with
// joinToken, with the unix workload attestor and an in-memory key manager.
// It returns the Workload API socket path once the agent is healthy, and
// stops the agent in t.Cleanup.
func (s *Server) StartAgent(t testing.TB, joinToken string, opts ...AgentOption) (socketPath string) {
	t.Helper()
	cfg := agentConfig{logLevel: "DEBUG"}
	for _, o := range opts {
		o(&cfg)
	}
	dir := t.TempDir()
	socketPath = filepath.Join(testkit.ShortDir(t, "spt"), "agent.sock")
	bundlePath := filepath.Join(dir, "bundle.pem")
	if err := os.WriteFile(bundlePath, s.BundlePEM(t), 0o600); err != nil {
		t.Fatalf("writing spire-agent trust bundle: %v", err)
	}
	host, port, err := net.SplitHostPort(s.Addr)
	if err != nil {
		t.Fatalf("splitting server address %q: %v", s.Addr, err)
	}
	var extra string
	if cfg.syncInterval > 0 {
		extra = fmt.Sprintf("    experimental {\n        sync_interval = %q\n    }\n", cfg.syncInterval.String())
	}
	conf := fmt.Sprintf(`agent {
    data_dir = %q
    log_level = %q
    server_address = %q
    server_port = %s
    socket_path = %q
    trust_bundle_path = %q
    trust_domain = %q
%s}

`+AgentPlugins, filepath.Join(dir, "data"), cfg.logLevel, host, port, socketPath, bundlePath, s.TrustDomain, extra)
	confPath := filepath.Join(dir, "agent.conf")
	if err := os.WriteFile(confPath, []byte(conf), 0o600); err != nil {
		t.Fatalf("writing spire-agent config: %v", err)
	}
	logPath := filepath.Join(dir, "agent.log")
	bin := filepath.Join(s.BinDir, "spire-agent")
	p, err := startProcess(bin, logPath, "run", "-config", confPath, "-joinToken", joinToken)
	if err != nil {
		t.Fatalf("starting spire-agent: %v", err)
	}
	t.Cleanup(func() {
		if err := p.kill(); err != nil {
			t.Errorf("stopping spire-agent: %v", err)
		}
		if t.Failed() {
			logTail(t, "spire-agent", logPath)
		}
	})
	// The agent serves its socket (with gRPC health) only after attesting.
	err = waitHealthy(p, func(ctx context.Context) error {
		_, err := runCLI(ctx, bin, "healthcheck", "-socketPath", socketPath)
		return err
	})
	if err != nil {
		t.Fatalf("spire-agent did not become healthy: %v\n%s", err, readTail(logPath))
	}
	return socketPath
}

// process is a SPIRE child that dies with the test binary (Pdeathsig).
type process struct {
	cmd  *exec.Cmd
	done chan struct{}
	err  error // set before done closes
}

func startProcess(bin, logPath string, args ...string) (*process, error) {
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	defer logFile.Close() // the child holds its own copy
	cmd := exec.Command(bin, args...)
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &process{cmd: cmd, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

func (p *process) kill() error {
	_ = p.cmd.Process.Kill() // fails only if it already exited
	select {
	case <-p.done:
		return nil
	case <-time.After(killTimeout):
		// SIGKILL cannot be ignored; only a process stuck in the kernel
		// gets here.
		return fmt.Errorf("pid %d did not exit %s after SIGKILL", p.cmd.Process.Pid, killTimeout)
	}
}

// waitHealthy polls check until it succeeds, the process exits, or
// startTimeout passes.
func waitHealthy(p *process, check func(context.Context) error) error {
	deadline := time.Now().Add(startTimeout)
	var last error
	for time.Now().Before(deadline) {
		select {
		case <-p.done:
			return fmt.Errorf("process exited: %v", p.err)
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		last = check(ctx)
		cancel()
		if last == nil {
			return nil
		}
		time.Sleep(pollEvery)
	}
	return fmt.Errorf("not healthy after %s: %v", startTimeout, last)
}

func runCLI(ctx context.Context, bin string, args ...string) (string, error) {
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("%w\nstdout:\n%s\nstderr:\n%s", err, stdout.String(), stderr.String())
	}
	return stdout.String(), nil
}

func decodeJSON(t testing.TB, out string, v any) {
	t.Helper()
	if err := json.Unmarshal([]byte(out), v); err != nil {
		t.Fatalf("parsing spire-server JSON output: %v\n%s", err, out)
	}
}

func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("finding a free port: %v", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func logTail(t testing.TB, name, path string) {
	t.Helper()
	t.Logf("%s log (%s), last part:\n%s", name, path, readTail(path))
}

func readTail(path string) string {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Sprintf("(cannot read log: %v)", err)
	}
	defer f.Close()
	if st, err := f.Stat(); err == nil && st.Size() > logTailBytes {
		if _, err := f.Seek(-logTailBytes, io.SeekEnd); err != nil {
			return fmt.Sprintf("(cannot read log: %v)", err)
		}
	}
	b, err := io.ReadAll(f)
	if err != nil && !errors.Is(err, io.EOF) {
		return fmt.Sprintf("(cannot read log: %v)", err)
	}
	return string(b)
}

func tail(b []byte) string {
	if len(b) > logTailBytes {
		b = b[len(b)-logTailBytes:]
	}
	return string(b)
}
