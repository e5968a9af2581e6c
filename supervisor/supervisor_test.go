package supervisor

import (
	"context"
	"errors"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/internal/testkit"
)

const waitLimit = 5 * time.Second

// recorder records the order in which services stop.
type recorder struct {
	mu      sync.Mutex
	stopped []string
}

func (r *recorder) add(name string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.stopped = append(r.stopped, name)
}

func (r *recorder) order() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.stopped)
}

// untilStopped is a service that works until it is stopped, taking a
// moment to stop so that a wrong order would show.
func (r *recorder) untilStopped(name string) Service {
	return Func(name, func(ctx context.Context) error {
		<-ctx.Done()
		time.Sleep(10 * time.Millisecond)
		r.add(name)
		return nil
	})
}

func runAsync(ctx context.Context, s *Supervisor) <-chan error {
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	return done
}

func wait(t *testing.T, done <-chan error) error {
	t.Helper()
	return testkit.Receive(t, done, waitLimit, "the supervisor to return")
}

func TestStagesStopInReverseWhenTheContextEnds(t *testing.T) {
	r := &recorder{}
	s := New(hclog.NewNullLogger()).
		Stage(r.untilStopped("persister")).
		Stage(r.untilStopped("upstream"), r.untilStopped("rotator")).
		Stage(r.untilStopped("workload-api"))
	ctx, cancel := context.WithCancel(t.Context())
	done := runAsync(ctx, s)
	time.Sleep(20 * time.Millisecond)
	cancel()
	if err := wait(t, done); err != nil {
		t.Fatalf("Run after the context ended = %v, want nil", err)
	}
	got := r.order()
	if len(got) != 4 || got[0] != "workload-api" || got[3] != "persister" {
		t.Fatalf("stop order %v: want the workload API first and the persister last", got)
	}
}

func TestOneFailureStopsAll(t *testing.T) {
	r := &recorder{}
	boom := errors.New("address already in use")
	s := New(hclog.NewNullLogger()).
		Stage(r.untilStopped("persister")).
		Stage(r.untilStopped("upstream")).
		Stage(r.untilStopped("workload-api"), Func("metrics", func(context.Context) error { return boom }))
	err := wait(t, runAsync(t.Context(), s))
	if !errors.Is(err, boom) || !strings.HasPrefix(err.Error(), "metrics: ") {
		t.Fatalf("Run = %v, want the metrics service's error, named", err)
	}
	if got := r.order(); !slices.Equal(got, []string{"workload-api", "upstream", "persister"}) {
		t.Fatalf("stop order %v after a failure", got)
	}
}

func TestAServiceThatFinishesStopsNothing(t *testing.T) {
	r := &recorder{}
	finished := make(chan struct{})
	s := New(hclog.NewNullLogger()).
		Stage(Func("one-shot", func(context.Context) error { close(finished); return nil })).
		Stage(r.untilStopped("upstream"))
	ctx, cancel := context.WithCancel(t.Context())
	done := runAsync(ctx, s)
	<-finished
	select {
	case err := <-done:
		t.Fatalf("Run returned %v when a service finished", err)
	case <-time.After(50 * time.Millisecond):
	}
	cancel()
	if err := wait(t, done); err != nil {
		t.Fatal(err)
	}
	if got := r.order(); !slices.Equal(got, []string{"upstream"}) {
		t.Fatalf("stopped %v", got)
	}
}

func TestAnErrorWhileStoppingIsLoggedNotReturned(t *testing.T) {
	// Read only once Run has returned, after every write.
	var logs strings.Builder
	log := hclog.New(&hclog.LoggerOptions{Output: &logs})
	s := New(log).Stage(Func("persister", func(ctx context.Context) error {
		<-ctx.Done()
		return errors.New("disk full")
	}))
	ctx, cancel := context.WithCancel(t.Context())
	done := runAsync(ctx, s)
	cancel()
	if err := wait(t, done); err != nil {
		t.Fatalf("Run = %v, want nil: the agent was asked to stop", err)
	}
	if !strings.Contains(logs.String(), "failed while stopping") || !strings.Contains(logs.String(), "disk full") {
		t.Fatalf("the error was not logged:\n%s", logs.String())
	}
}
