package testkit

import (
	"context"
	"sync"
)

// Faults are what a fake's calls meet as they start, changed by the test
// while they run: a gate to wait for and an error to fail with. The zero
// value lets every call through.
type Faults struct {
	mu   sync.Mutex
	gate chan struct{}
	fail error
}

// SetFail makes every call fail with err (nil: succeed again).
func (f *Faults) SetFail(err error) {
	f.mu.Lock()
	f.fail = err
	f.mu.Unlock()
}

// SetGate makes calls wait until gate closes or their context ends (nil:
// do not wait).
func (f *Faults) SetGate(gate chan struct{}) {
	f.mu.Lock()
	f.gate = gate
	f.mu.Unlock()
}

// Enter starts a call: it waits for the gate set when the call came, and
// returns the error set then, or ctx's if it ended first.
func (f *Faults) Enter(ctx context.Context) error {
	f.mu.Lock()
	gate, fail := f.gate, f.fail
	f.mu.Unlock()
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return fail
}

// Err is the error set, for calls that do not wait at the gate.
func (f *Faults) Err() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.fail
}
