package attestor

import (
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testkit"
)

// TestWorkerPoolNeverWaitsOnABusyWorker: a job stuck in a worker (an
// attestor blocked despite ctx) does not hold up the next job, and an idle
// worker is reused.
func TestWorkerPoolNeverWaitsOnABusyWorker(t *testing.T) {
	p := workerPool{jobs: make(chan func()), idle: time.Minute}
	release := make(chan struct{})
	defer close(release)
	p.run(func() { <-release })
	done := make(chan int, 2)
	p.run(func() { done <- 1 })
	testkit.Receive(t, done, 10*time.Second, "a job while the only other worker is busy")
	// The second worker is idle now: it takes the next job.
	testkit.WaitFor(t, 10*time.Second, "an idle worker to take a job", func() bool {
		select {
		case p.jobs <- func() { done <- 2 }:
			return true
		default:
			return false
		}
	})
	if got := testkit.Receive(t, done, 10*time.Second, "the job of the idle worker"); got != 2 {
		t.Fatalf("ran job %d, want 2", got)
	}
}

// TestWorkerPoolWorkersExitWhenIdle: the pool shrinks back when calls stop.
func TestWorkerPoolWorkersExitWhenIdle(t *testing.T) {
	p := workerPool{jobs: make(chan func()), idle: 10 * time.Millisecond}
	done := make(chan struct{})
	p.run(func() { close(done) })
	testkit.Receive(t, done, 10*time.Second, "the job")
	// Once the worker has exited, nothing receives on jobs any more.
	testkit.WaitFor(t, 10*time.Second, "the idle worker to exit", func() bool {
		select {
		case p.jobs <- func() {}:
			return false
		case <-time.After(50 * time.Millisecond):
			return true
		}
	})
}
