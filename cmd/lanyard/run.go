package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/adminapi"
	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/conf"
	"github.com/lanyard-dev/lanyard/supervisor"
	"github.com/lanyard-dev/lanyard/workloadapi"
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

// startCommand parses the flags of run or validate and loads the config.
// When ok is false the command is over: exit with code (a usage error or
// an unusable config, already printed to stderr; 0 for -help).
func startCommand(name string, args []string, stderr io.Writer) (f *runFlags, cfg *conf.Config, code int, ok bool) {
	f, code, ok = parseRunFlags(name, args, stderr)
	if !ok {
		return nil, nil, code, false
	}
	cfg, err := f.loadConfig()
	if err != nil {
		fmt.Fprintln(stderr, err)
		return nil, nil, 1, false
	}
	return f, cfg, 0, true
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
	f, cfg, code, ok := startCommand("validate", args, stderr)
	if !ok {
		return code
	}
	// Plugins check their own plugin_data; building them touches no state.
	if err := agent.Check(cfg, hclog.NewNullLogger()); err != nil {
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
	started := time.Now()
	// First, before the config is read: a SIGHUP with no subscriber ends
	// the process (Go's default), and one may come while the agent starts
	// (a config change rolled out as it restarts). It waits for the
	// reloader instead, which applies the config again once running.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	f, cfg, code, ok := startCommand("run", args, stderr)
	if !ok {
		return code
	}
	log, closer, err := newLogger(cfg, stderr)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	if closer != nil {
		defer closer.Close()
	}
	// Start-up errors (a bad plugin_data, a busy socket or port) go to
	// stderr as they are, so that file:line:key reads plainly.
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
	listeners, err := listenerServices(cfg, a, log)
	if err != nil {
		listener.Close()
		fmt.Fprintln(stderr, "lanyard:", err)
		return 1
	}
	// The open streams are recorded only for the admin socket's status.
	var streams *workloadapi.Streams
	if cfg.Agent.AdminSocketPath != "" {
		streams = workloadapi.NewStreams()
		admin, err := adminapi.New(adminapi.Config{
			Log:         log.Named("admin"),
			Attestor:    a,
			Identities:  a.SVIDManager(),
			Delegates:   cfg.Agent.AuthorizedDelegates,
			Grace:       shutdownGrace,
			Self:        a.SelfIdentity(),
			Started:     started,
			TrustDomain: cfg.Agent.TrustDomain,
			Status:      adminapi.StatusInfo{Version: version, Upstream: a.UpstreamInUse, Streams: streams},
		}, cfg.Agent.AdminSocketPath)
		if err != nil {
			listener.Close()
			fmt.Fprintln(stderr, "lanyard:", err)
			return 1
		}
		listeners = append(listeners, admin)
	}
	if cfg.Agent.Broker != nil {
		broker, err := newBrokerEndpoint(cfg, a, log)
		if err != nil {
			listener.Close()
			fmt.Fprintln(stderr, "lanyard:", err)
			return 1
		}
		listeners = append(listeners, broker)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	srv := workloadapi.NewServer(workloadapi.Config{
		Log:                           log.Named("workloadapi"),
		Attestor:                      a,
		Identities:                    a.SVIDManager(),
		AllowUnauthenticatedVerifiers: cfg.Agent.AllowUnauthenticatedVerifiers,
		TrustDomain:                   cfg.Agent.TrustDomain,
		SDS:                           workloadapi.SDSConfig(cfg.Agent.SDS),
		Streams:                       streams,
	})
	// What accepts requests stops first (the Workload API ending its
	// streams with Unavailable), then what feeds the cache, and the cache
	// is saved last, once nothing changes it.
	notifier := newSystemdNotifier(cfg.Agent.SocketPath, log.Named("systemd"))
	front := append([]supervisor.Service{
		srv.Endpoint(listener, a.SVIDManager().Ready(), shutdownGrace),
		reloader(f, a, hup, notifier, log),
	}, listeners...)
	if notifier != nil {
		front = append(front, notifier)
	}
	log.Info("Starting the Workload API", "socket_path", cfg.Agent.SocketPath, "trust_domain", cfg.Agent.TrustDomain, "max_connections", maxConns, "version", version)
	err = supervisor.New(log).
		Stage(a.Persister()).
		Stage(a.Workers()...).
		Stage(front...).
		Run(ctx)
	if err != nil {
		log.Error("Agent stopped", "error", err)
		return 1
	}
	log.Info("Stopped")
	return 0
}
