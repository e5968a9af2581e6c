package agent

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/lanyard-dev/lanyard/supervisor"
)

// The agent's long-running parts, as services for the supervisor. The
// Workload API and the listeners are added beside them by cmd/lanyard.

// Persister saves the cache as it changes, and once more when it stops.
// Run it in the first stage of the supervisor, so that it stops last, once
// nothing changes the cache any more.
func (a *Agent) Persister() supervisor.Service {
	return a.svids.Persister()
}

// Workers are the services that keep the cache supplied: the upstream,
// SVID rotation, and the watcher that logs while the upstream is down.
func (a *Agent) Workers() []supervisor.Service {
	return []supervisor.Service{
		supervisor.Func("upstream", a.runUpstream),
		a.svids.Rotator(),
		supervisor.Func("health-watcher", func(ctx context.Context) error {
			a.watchHealth(ctx, degradedLogEvery)
			return nil
		}),
	}
}

// Run runs the agent's own services (Workers and Persister) until ctx
// ends; tests and benchmarks serve the Workload API beside it.
func (a *Agent) Run(ctx context.Context) error {
	return supervisor.New(a.log).Stage(a.Persister()).Stage(a.Workers()...).Run(ctx)
}

// runUpstream runs the upstream until ctx ends. An upstream that fails is
// restarted with capped backoff: the agent keeps serving what it has
// meanwhile, so its failure is not the service's. The exception is a node
// that cannot attest while the agent has nothing cached: that ends it.
func (a *Agent) runUpstream(ctx context.Context) error {
	retry := NewBackoff(time.Second, 30*time.Second)
	for ctx.Err() == nil {
		err := a.upstream.Run(ctx, a.svids)
		if ctx.Err() != nil {
			break
		}
		a.svids.ReportUpstream(fmt.Errorf("the upstream stopped: %w", err))
		if errors.Is(err, ErrNodeAttestationRefused) && !a.svids.Health().Ready {
			// Nothing to serve (no sync, no saved cache), and retrying
			// gets the same answer: exit, so that the operator (or the
			// kubelet's restarts) sees why.
			return fmt.Errorf("the agent has no saved cache to serve and cannot attest: %w", err)
		}
		wait := retry.Next()
		a.log.Error("The upstream stopped; restarting it", "upstream", a.upstreamName, "retry_in", wait.Round(time.Millisecond), "error", err)
		select {
		case <-ctx.Done():
		case <-time.After(wait):
		}
	}
	return nil
}

// degradedLogEvery spaces the warnings while the upstream is down.
const degradedLogEvery = time.Minute

// watchHealth logs, while the upstream is down, how long until the first
// SVID expires, and once more when it is back.
func (a *Agent) watchHealth(ctx context.Context, every time.Duration) {
	ticker := time.NewTicker(every)
	defer ticker.Stop()
	wasDown := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
		}
		h := a.svids.Health()
		switch {
		case h.UpstreamErr != nil:
			args := []any{"upstream", a.upstreamName, "down_for", time.Since(h.UpstreamDownSince).Round(time.Second), "error", h.UpstreamErr}
			if !h.FirstExpiry.IsZero() {
				args = append(args, "first_svid_expires_in", time.Until(h.FirstExpiry).Round(time.Second))
			}
			a.log.Warn("Serving from the cache: the upstream is unavailable and SVIDs are not being renewed", args...)
			wasDown = true
		case wasDown:
			a.log.Info("The upstream is available again", "upstream", a.upstreamName)
			wasDown = false
		}
	}
}
