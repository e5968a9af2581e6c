package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/conf"
	"github.com/lanyard-dev/lanyard/workloadapi"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// shutdownGrace bounds how long open streams may take to finish on SIGTERM.
const shutdownGrace = 5 * time.Second

type runFlags struct {
	config     string
	expandEnv  bool
	socketPath string
	joinToken  string
	logLevel   string
}

func parseRunFlags(name string, args []string, stderr io.Writer) (*runFlags, int, bool) {
	f := &runFlags{}
	fs := flag.NewFlagSet("lanyard "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&f.config, "config", "conf/agent/agent.conf", "path to the agent config file")
	fs.BoolVar(&f.expandEnv, "expandEnv", false, "expand $VAR and ${VAR} in the config file")
	if name == "run" {
		fs.StringVar(&f.socketPath, "socketPath", "", "Workload API socket path (overrides agent.socket_path)")
		fs.StringVar(&f.joinToken, "joinToken", "", "join token for SPIRE Server node attestation (overrides agent.join_token)")
		fs.StringVar(&f.logLevel, "logLevel", "", "log level: trace, debug, info, warn, error (overrides agent.log_level)")
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil, 0, false
		}
		return nil, 2, false
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "lanyard %s: unexpected argument %q\n", name, fs.Arg(0))
		return nil, 2, false
	}
	return f, 0, true
}

// loadConfig loads the config and applies command-line overrides.
func (f *runFlags) loadConfig() (*conf.Config, error) {
	cfg, err := conf.Load(f.config, f.expandEnv)
	if err != nil {
		return nil, err
	}
	if f.socketPath != "" {
		cfg.Agent.SocketPath = f.socketPath
	}
	if f.joinToken != "" {
		cfg.Agent.JoinToken = f.joinToken
	}
	if f.logLevel != "" {
		if hclog.LevelFromString(f.logLevel) == hclog.NoLevel {
			return nil, fmt.Errorf("-logLevel %q: use trace, debug, info, warn or error", f.logLevel)
		}
		cfg.Agent.LogLevel = f.logLevel
	}
	return cfg, nil
}

func runValidate(args []string, stdout, stderr io.Writer) int {
	f, code, ok := parseRunFlags("validate", args, stderr)
	if !ok {
		return code
	}
	cfg, err := f.loadConfig()
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	// Plugins check their own plugin_data; build them against a scratch
	// data dir so validation writes nothing where the agent keeps state.
	scratch, err := os.MkdirTemp("", "lanyard-validate-")
	if err != nil {
		fmt.Fprintln(stderr, "lanyard validate:", err)
		return 1
	}
	defer os.RemoveAll(scratch)
	cfg.Agent.DataDir = scratch
	if _, err := agent.New(cfg, hclog.NewNullLogger()); err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	fmt.Fprintf(stdout, "%s: configuration is valid\n", f.config)
	return 0
}

func newLogger(cfg *conf.Config, stderr io.Writer) (hclog.Logger, io.Closer, error) {
	out, closer := stderr, io.Closer(nil)
	if cfg.Agent.LogFile != "" {
		file, err := os.OpenFile(cfg.Agent.LogFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o640)
		if err != nil {
			return nil, nil, fmt.Errorf("opening log_file: %w", err)
		}
		out, closer = file, file
	}
	return hclog.New(&hclog.LoggerOptions{
		Name:       "lanyard",
		Level:      hclog.LevelFromString(cfg.Agent.LogLevel),
		JSONFormat: cfg.Agent.LogFormat == "json",
		Output:     out,
	}), closer, nil
}

func runAgent(args []string, stderr io.Writer) int {
	f, code, ok := parseRunFlags("run", args, stderr)
	if !ok {
		return code
	}
	cfg, err := f.loadConfig()
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	log, closer, err := newLogger(cfg, stderr)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	if closer != nil {
		defer closer.Close()
	}
	// Start-up errors (a bad plugin_data, a busy socket) go to stderr as
	// they are, so that file:line:key reads plainly.
	a, err := agent.New(cfg, log)
	if err != nil {
		fmt.Fprintln(stderr, "lanyard:", err)
		return 1
	}
	maxConns := agent.DefaultMaxConnections()
	listener, err := agent.Listen(cfg.Agent.SocketPath, maxConns, log.Named("listener"))
	if err != nil {
		fmt.Fprintln(stderr, "lanyard:", err)
		return 1
	}
	if err := serve(cfg, f, log, a, listener, maxConns); err != nil {
		log.Error("Agent stopped", "error", err)
		return 1
	}
	return 0
}

// serve runs the agent until SIGTERM or SIGINT, reloading on SIGHUP.
func serve(cfg *conf.Config, f *runFlags, log hclog.Logger, a *agent.Agent, listener net.Listener, maxConns int) error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)

	srv := workloadapi.NewServer(workloadapi.Config{
		Log:                           log.Named("workloadapi"),
		Attestor:                      a,
		Identities:                    a.SVIDManager(),
		AllowUnauthenticatedVerifiers: cfg.Agent.AllowUnauthenticatedVerifiers,
		TrustDomain:                   cfg.Agent.TrustDomain,
		SDS:                           workloadapi.SDSConfig(cfg.Agent.SDS),
	})

	runCtx, cancelRun := context.WithCancel(context.Background())
	defer cancelRun()
	agentDone := make(chan error, 1)
	go func() { agentDone <- a.Run(runCtx) }()
	serveDone := make(chan error, 1)
	go func() { serveDone <- srv.GRPC.Serve(listener) }()
	stopHealth := startHealthListener(cfg.HealthChecks, a, log)
	defer stopHealth()
	stopMetrics := startMetricsListener(cfg.Telemetry, a, log)
	defer stopMetrics()
	stopProfiling := startProfilingListener(cfg.Agent.ProfilingPort, log)
	defer stopProfiling()

	log.Info("Starting the Workload API", "socket_path", cfg.Agent.SocketPath, "trust_domain", cfg.Agent.TrustDomain, "max_connections", maxConns, "version", version)
	go func() {
		select {
		case <-a.SVIDManager().Ready():
			srv.Health.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
			log.Info("Agent is ready: entries and bundles are loaded")
		case <-runCtx.Done():
		}
	}()

	for {
		select {
		case <-hup:
			next, err := f.loadConfig()
			if err == nil {
				err = a.Reload(next)
			}
			if err != nil {
				log.Error("Reload failed; the previous config stays in force", "error", err)
				continue
			}
			log.Info("Reloaded the config", "config", f.config)
		case err := <-serveDone:
			cancelRun()
			<-agentDone
			return fmt.Errorf("the Workload API server stopped: %w", err)
		case err := <-agentDone:
			srv.Shutdown(shutdownGrace)
			return err
		case <-ctx.Done():
			log.Info("Shutting down")
			srv.Shutdown(shutdownGrace)
			cancelRun()
			if err := <-agentDone; err != nil {
				return err
			}
			log.Info("Stopped")
			return nil
		}
	}
}

// startHealthListener serves the HTTP liveness and readiness probes of the
// health_checks block, when enabled. It returns a function that stops it.
func startHealthListener(hc conf.HealthChecks, a *agent.Agent, log hclog.Logger) func() {
	if !hc.ListenerEnabled {
		return func() {}
	}
	mux := http.NewServeMux()
	mux.HandleFunc(hc.LivePath, func(w http.ResponseWriter, _ *http.Request) {
		w.WriteHeader(http.StatusOK)
		fmt.Fprintln(w, `{"live":true}`)
	})
	mux.HandleFunc(hc.ReadyPath, func(w http.ResponseWriter, _ *http.Request) {
		writeReadiness(w, a.SVIDManager().Health())
	})
	addr := net.JoinHostPort(hc.BindAddress, strconv.Itoa(hc.BindPort))
	log.Info("Serving health checks", "address", addr, "live_path", hc.LivePath, "ready_path", hc.ReadyPath)
	return serveHTTP(addr, mux, "health check", log)
}

// writeReadiness answers the readiness probe: 200 when the agent is loaded
// and its upstream works; 503 while loading, or when degraded (serving from
// its cache with SVIDs not being renewed, or unable to save its state), with
// the reason in the body.
func writeReadiness(w http.ResponseWriter, h agent.Health) {
	body := map[string]any{"ready": h.Ready && !h.Degraded(), "loaded": h.Ready, "degraded": h.Degraded()}
	if h.Degraded() {
		body["reason"] = h.Reason()
	}
	if h.UpstreamErr != nil {
		body["upstream_down_seconds"] = int(time.Since(h.UpstreamDownSince).Seconds())
	}
	if !h.FirstExpiry.IsZero() {
		body["first_svid_expires_in_seconds"] = int(time.Until(h.FirstExpiry).Seconds())
	}
	w.Header().Set("Content-Type", "application/json")
	if h.Ready && !h.Degraded() {
		w.WriteHeader(http.StatusOK)
	} else {
		w.WriteHeader(http.StatusServiceUnavailable)
	}
	_ = json.NewEncoder(w).Encode(body)
}

// startMetricsListener serves Prometheus metrics when the telemetry block
// asks for it.
func startMetricsListener(t conf.Telemetry, a *agent.Agent, log hclog.Logger) func() {
	if !t.PrometheusEnabled {
		return func() {}
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}), a.NewCollector())
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	addr := net.JoinHostPort(t.PrometheusHost, strconv.Itoa(t.PrometheusPort))
	log.Info("Serving Prometheus metrics", "address", addr, "path", "/metrics")
	return serveHTTP(addr, mux, "metrics", log)
}

// startProfilingListener serves net/http/pprof on localhost when the agent
// block enables profiling, as spire-agent does.
func startProfilingListener(port int, log hclog.Logger) func() {
	if port == 0 {
		return func() {}
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	addr := net.JoinHostPort("localhost", strconv.Itoa(port))
	log.Info("Serving pprof profiles", "address", addr, "path", "/debug/pprof/")
	return serveHTTP(addr, mux, "profiling", log)
}

func serveHTTP(addr string, handler http.Handler, what string, log hclog.Logger) func() {
	srv := &http.Server{Addr: addr, Handler: handler, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := srv.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("HTTP listener failed", "listener", what, "address", addr, "error", err)
		}
	}()
	return func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx)
	}
}
