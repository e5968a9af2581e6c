// Package supervisor runs the agent's long-running parts (services) as one:
// it starts them, stops them all when one fails, and stops them in order,
// so that the Workload API stops accepting and ends its streams before the
// upstream stops, and the cache is saved last.
package supervisor

import (
	"context"
	"fmt"
	"sync"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sync/errgroup"
)

// Service is a long-running part of the agent: the Workload API server, a
// listener, the upstream, SVID rotation, the cache's persistence.
type Service interface {
	// Name names the service in the log ("workload-api", "upstream").
	Name() string
	// Run works until ctx ends, then cleans up and returns nil. An error
	// makes the supervisor stop every service; returning nil before ctx
	// ends means the service has nothing more to do, and the others run on.
	Run(ctx context.Context) error
}

// Func makes a function a service.
func Func(name string, run func(ctx context.Context) error) Service {
	return funcService{name: name, run: run}
}

type funcService struct {
	name string
	run  func(ctx context.Context) error
}

func (f funcService) Name() string                  { return f.name }
func (f funcService) Run(ctx context.Context) error { return f.run(ctx) }

// Supervisor runs services in stages. Stages start in the order they were
// added and stop in reverse, one at a time, like deferred calls: a stage is
// asked to stop only once every later one has returned. Services within a
// stage start and stop together.
type Supervisor struct {
	log    hclog.Logger
	stages [][]Service
}

// New returns a supervisor that logs through log.
func New(log hclog.Logger) *Supervisor { return &Supervisor{log: log} }

// Stage adds a stage of services, started after and stopped before those
// of the stages added earlier. It returns s, for chaining.
func (s *Supervisor) Stage(services ...Service) *Supervisor {
	s.stages = append(s.stages, services)
	return s
}

// Run starts every service and returns once all have returned. It stops
// them when ctx ends (and returns nil) or when one fails (and returns that
// service's error, naming it). Errors that services return while stopping
// are logged: they do not change the outcome.
//
// errgroup (already a dependency) gives the first error and a context that
// ends with it; each stage has its own context on top, so that stages can
// be stopped in order. oklog/run, the other candidate, interrupts every
// actor at once, with no order, and stops all when any returns, even one
// that has merely finished.
func (s *Supervisor) Run(ctx context.Context) error {
	group, failed := errgroup.WithContext(ctx)
	stops := make([]context.CancelFunc, len(s.stages))
	running := make([]sync.WaitGroup, len(s.stages))
	for i, stage := range s.stages {
		// Not derived from ctx: ctx ending must not stop every stage at once.
		stageCtx, stop := context.WithCancel(context.WithoutCancel(ctx))
		stops[i] = stop
		for _, svc := range stage {
			running[i].Add(1)
			group.Go(func() error {
				defer running[i].Done()
				return s.run(stageCtx, svc)
			})
		}
	}
	<-failed.Done()
	if ctx.Err() != nil {
		s.log.Info("Shutting down")
	}
	for i := len(stops) - 1; i >= 0; i-- {
		stops[i]()
		running[i].Wait()
	}
	return group.Wait()
}

// run runs one service and reports how it ended.
func (s *Supervisor) run(ctx context.Context, svc Service) error {
	s.log.Debug("Starting a service", "service", svc.Name())
	err := svc.Run(ctx)
	switch {
	case err == nil:
		s.log.Debug("A service stopped", "service", svc.Name())
		return nil
	case ctx.Err() != nil:
		s.log.Error("A service failed while stopping", "service", svc.Name(), "error", err)
		return nil
	default:
		s.log.Error("A service failed; stopping the others", "service", svc.Name(), "error", err)
		return fmt.Errorf("%s: %w", svc.Name(), err)
	}
}
