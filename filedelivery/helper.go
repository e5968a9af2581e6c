package filedelivery

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// fetchPatience bounds how long a one-shot run waits for the agent to
// have an identity for this workload (PermissionDenied until its entry
// reaches the agent): an init container must fail, not hang.
const fetchPatience = 30 * time.Second

// Helper writes a config's files from a Workload API client.
type Helper struct {
	cfg    *Config
	log    hclog.Logger
	client *workloadapi.Client
	state  *writeState

	// mu serialises every write and the signals after it, so that a
	// signal always follows a complete set of files.
	mu    sync.Mutex
	child *child
	now   func() time.Time
}

// New connects a helper to the agent at cfg.AgentAddress; Close it.
func New(ctx context.Context, cfg *Config, log hclog.Logger) (*Helper, error) {
	client, err := workloadapi.New(ctx, workloadapi.WithAddr("unix://"+cfg.AgentAddress))
	if err != nil {
		return nil, fmt.Errorf("connecting to the Workload API at %s: %w", cfg.AgentAddress, err)
	}
	h := &Helper{cfg: cfg, log: log, client: client, state: newWriteState(cfg), now: time.Now}
	if cfg.Cmd != "" {
		h.child = &child{path: cfg.Cmd, args: cfg.CmdArgs, signal: cfg.RenewSignal, log: log}
	}
	return h, nil
}

// Close closes the client.
func (h *Helper) Close() error { return h.client.Close() }

// RunOnce fetches every configured output once and writes it: the
// daemon_mode = false run.
func (h *Helper) RunOnce(ctx context.Context) error {
	if h.cfg.X509Enabled() {
		xc, err := retryPermissionDenied(ctx, h.log, func() (*workloadapi.X509Context, error) {
			return h.client.FetchX509Context(ctx)
		})
		if err != nil {
			return fmt.Errorf("fetching the X.509-SVID: %w", err)
		}
		if err := h.writeX509Context(xc); err != nil {
			return err
		}
	}
	if h.cfg.JWTBundleFile != "" {
		set, err := retryPermissionDenied(ctx, h.log, func() (*jwtbundle.Set, error) {
			return h.client.FetchJWTBundles(ctx)
		})
		if err != nil {
			return fmt.Errorf("fetching the JWT bundles: %w", err)
		}
		if err := writeJWTBundles(h.cfg, set); err != nil {
			return err
		}
	}
	for _, j := range h.cfg.JWTSVIDs {
		svids, err := retryPermissionDenied(ctx, h.log, func() ([]*jwtsvid.SVID, error) {
			return h.client.FetchJWTSVIDs(ctx, jwtsvid.Params{Audience: j.Audience, ExtraAudiences: j.ExtraAudiences})
		})
		if err != nil {
			return fmt.Errorf("fetching the JWT-SVID for %q: %w", j.Audience, err)
		}
		if _, err := writeJWTSVID(h.cfg, j, svids); err != nil {
			return err
		}
	}
	return nil
}

// retryPermissionDenied retries fetch while the agent answers
// PermissionDenied (no identity for this workload yet), up to
// fetchPatience.
func retryPermissionDenied[T any](ctx context.Context, log hclog.Logger, fetch func() (T, error)) (T, error) {
	deadline := time.Now().Add(fetchPatience)
	wait := 100 * time.Millisecond
	for {
		v, err := fetch()
		if err == nil || status.Code(err) != codes.PermissionDenied || time.Now().Add(wait).After(deadline) {
			return v, err
		}
		log.Debug("no identity yet; retrying", "wait", wait)
		select {
		case <-ctx.Done():
			return v, ctx.Err()
		case <-time.After(wait):
		}
		wait = min(2*wait, 2*time.Second)
	}
}

// RunDaemon keeps the files up to date until ctx ends, then stops the
// child (if cmd is set) and returns nil.
func (h *Helper) RunDaemon(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	errs := make(chan error, 2+len(h.cfg.JWTSVIDs))
	run := func(f func(context.Context) error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := f(ctx); err != nil && ctx.Err() == nil {
				errs <- err
				cancel()
			}
		}()
	}
	if h.cfg.HealthChecks.ListenerEnabled {
		srv, err := newHealthServer(h.cfg.HealthChecks, h.state)
		if err != nil {
			return err
		}
		run(srv.serve)
	}
	if h.cfg.X509Enabled() {
		run(func(ctx context.Context) error {
			return h.client.WatchX509Context(ctx, x509Watcher{h})
		})
	}
	if h.cfg.JWTBundleFile != "" {
		run(func(ctx context.Context) error {
			return h.client.WatchJWTBundles(ctx, jwtBundleWatcher{h})
		})
	}
	for _, j := range h.cfg.JWTSVIDs {
		run(func(ctx context.Context) error { h.renewJWTSVID(ctx, j); return nil })
	}
	<-ctx.Done()
	wg.Wait()
	if h.child != nil {
		h.child.stop()
	}
	select {
	case err := <-errs:
		return err
	default:
		return nil
	}
}

type x509Watcher struct{ h *Helper }

func (w x509Watcher) OnX509ContextUpdate(xc *workloadapi.X509Context) {
	err := w.h.writeX509Context(xc)
	w.h.afterWrite(outputX509, err)
}

func (w x509Watcher) OnX509ContextWatchError(err error) {
	if status.Code(err) != codes.Canceled {
		w.h.log.Warn("watching X.509-SVIDs", "error", err)
	}
}

type jwtBundleWatcher struct{ h *Helper }

func (w jwtBundleWatcher) OnJWTBundlesUpdate(set *jwtbundle.Set) {
	w.h.mu.Lock()
	err := writeJWTBundles(w.h.cfg, set)
	w.h.mu.Unlock()
	w.h.afterWrite(w.h.cfg.JWTBundleFile, err)
}

func (w jwtBundleWatcher) OnJWTBundlesWatchError(err error) {
	if status.Code(err) != codes.Canceled {
		w.h.log.Warn("watching JWT bundles", "error", err)
	}
}

// writeX509Context writes the X.509 files and the credential folder.
func (h *Helper) writeX509Context(xc *workloadapi.X509Context) error {
	svid, err := pickX509SVID(xc, h.cfg.Hint)
	if err != nil {
		return err
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.cfg.SVIDFile != "" {
		if err := writeX509(h.cfg, svid, xc.Bundles, h.now()); err != nil {
			return err
		}
	}
	if h.cfg.CredentialFolder != "" {
		if err := writeCredentialFolder(h.cfg, svid, xc.Bundles); err != nil {
			return err
		}
	}
	h.log.Info("X.509-SVID written", "spiffe_id", svid.ID.String(), "expires", svid.Certificates[0].NotAfter)
	return nil
}

// renewJWTSVID keeps one JWT-SVID file fresh: renewed at half its
// remaining life, retried with a growing wait when a fetch or write fails.
func (h *Helper) renewJWTSVID(ctx context.Context, j JWTSVID) {
	retry := time.Second
	for {
		next := retry
		svids, err := h.client.FetchJWTSVIDs(ctx, jwtsvid.Params{Audience: j.Audience, ExtraAudiences: j.ExtraAudiences})
		if err == nil {
			var svid *jwtsvid.SVID
			h.mu.Lock()
			svid, err = writeJWTSVID(h.cfg, j, svids)
			h.mu.Unlock()
			if err == nil {
				next = max(time.Until(svid.Expiry)/2, time.Second)
				retry = time.Second
				h.log.Info("JWT-SVID written", "audience", j.Audience, "file", j.FileName, "expires", svid.Expiry)
			}
		}
		if ctx.Err() != nil {
			return
		}
		h.afterWrite(j.FileName, err)
		if err != nil {
			retry = min(2*retry, time.Minute)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(next):
		}
	}
}

// afterWrite records the outcome of writing one output and, once every
// output has been written, starts the child or signals it and the pid
// file's process.
func (h *Helper) afterWrite(output string, err error) {
	h.state.set(output, err)
	if err != nil {
		h.log.Error("writing files", "output", output, "error", err)
		return
	}
	if !h.state.allWritten() {
		return
	}
	// The X.509 files are what a server reloads; when there are none, any
	// update is worth a signal.
	if output != outputX509 && h.cfg.X509Enabled() && h.child != nil && h.child.running() {
		return
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.child != nil {
		if err := h.child.startOrSignal(); err != nil {
			h.log.Error("running cmd", "cmd", h.cfg.Cmd, "error", err)
		}
	}
	if h.cfg.PIDFileName != "" && (output == outputX509 || !h.cfg.X509Enabled()) {
		if err := signalPIDFile(h.cfg.PIDFileName, h.cfg.RenewSignal); err != nil {
			h.log.Error("signalling the process in pid_file_name", "file", h.cfg.PIDFileName, "error", err)
		}
	}
}
