package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"strconv"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/conf"
	"github.com/lanyard-dev/lanyard/supervisor"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// httpStopGrace bounds how long an HTTP listener waits for its requests
// in flight when the agent stops.
const httpStopGrace = time.Second

// httpService serves HTTP on a listener bound at start, so that a busy port
// fails the start with its address rather than later.
type httpService struct {
	name     string
	listener net.Listener
	server   *http.Server
}

// newHTTPService binds addr, and logs what it serves there (args).
func newHTTPService(name, addr string, handler http.Handler, log hclog.Logger, msg string, args ...any) (*httpService, error) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("the %s listener: %w", name, err)
	}
	log.Info(msg, append([]any{"address", addr}, args...)...)
	return &httpService{
		name:     name,
		listener: l,
		server:   &http.Server{Handler: handler, ReadHeaderTimeout: 5 * time.Second},
	}, nil
}

func (h *httpService) Name() string { return h.name }

func (h *httpService) Run(ctx context.Context) error {
	served := make(chan error, 1)
	go func() { served <- h.server.Serve(h.listener) }()
	select {
	case err := <-served:
		return fmt.Errorf("serving on %s: %w", h.listener.Addr(), err)
	case <-ctx.Done():
		stopCtx, cancel := context.WithTimeout(context.Background(), httpStopGrace)
		defer cancel()
		_ = h.server.Shutdown(stopCtx)
		if err := <-served; !errors.Is(err, http.ErrServerClosed) {
			return err
		}
		return nil
	}
}

// listenerServices binds the HTTP listeners the config enables: health
// checks, Prometheus metrics and profiling.
func listenerServices(cfg *conf.Config, a *agent.Agent, log hclog.Logger) ([]supervisor.Service, error) {
	var services []supervisor.Service
	var bound []*httpService
	for _, listen := range []func(*conf.Config, *agent.Agent, hclog.Logger) (*httpService, error){
		healthListener, metricsListener, profilingListener,
	} {
		svc, err := listen(cfg, a, log)
		if err != nil {
			for _, b := range bound {
				b.listener.Close()
			}
			return nil, err
		}
		if svc != nil {
			bound = append(bound, svc)
			services = append(services, svc)
		}
	}
	return services, nil
}

// healthListener serves the HTTP liveness and readiness probes of the
// health_checks block, when enabled.
func healthListener(cfg *conf.Config, a *agent.Agent, log hclog.Logger) (*httpService, error) {
	hc := cfg.HealthChecks
	if !hc.ListenerEnabled {
		return nil, nil
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
	return newHTTPService("health-checks", addr, mux, log, "Serving health checks", "live_path", hc.LivePath, "ready_path", hc.ReadyPath)
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

// metricsListener serves Prometheus metrics when the telemetry block asks
// for it.
func metricsListener(cfg *conf.Config, a *agent.Agent, log hclog.Logger) (*httpService, error) {
	t := cfg.Telemetry
	if !t.PrometheusEnabled {
		return nil, nil
	}
	// The agent's registry (with its own metrics and those of the Workload
	// API and the upstream that record into it) plus the runtime's.
	reg := a.Metrics().Registry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	addr := net.JoinHostPort(t.PrometheusHost, strconv.Itoa(t.PrometheusPort))
	return newHTTPService("metrics", addr, mux, log, "Serving Prometheus metrics", "path", "/metrics")
}

// profilingListener serves net/http/pprof on localhost when the agent
// block enables profiling, as spire-agent does.
func profilingListener(cfg *conf.Config, _ *agent.Agent, log hclog.Logger) (*httpService, error) {
	port := cfg.Agent.ProfilingPort
	if port == 0 {
		return nil, nil
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	addr := net.JoinHostPort("localhost", strconv.Itoa(port))
	return newHTTPService("profiling", addr, mux, log, "Serving pprof profiles", "path", "/debug/pprof/")
}

// reloader applies the config file again on SIGHUP. hup is subscribed
// before the agent starts (runAgent): a SIGHUP with no subscriber would end
// it, and one that came during the start is applied once this runs. It
// tells systemd through notifier (nil outside a Type=notify unit).
func reloader(f *runFlags, a *agent.Agent, hup <-chan os.Signal, notifier *systemdNotifier, log hclog.Logger) supervisor.Service {
	return supervisor.Func("reload", func(ctx context.Context) error {
		for {
			select {
			case <-ctx.Done():
				return nil
			case <-hup:
			}
			notifier.reloading()
			next, err := f.loadConfig()
			if err == nil {
				err = a.Reload(next)
			}
			notifier.reloaded(err)
			if err != nil {
				log.Error("Reload failed; the previous config stays in force", "error", err)
				continue
			}
			log.Info("Reloaded the config", "config", f.config)
		}
	})
}
