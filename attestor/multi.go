package attestor

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/attestor/selector"
	"github.com/lanyard-dev/lanyard/conf"
)

// DefaultTimeout is how long each workload attestor may take when the
// configuration sets no deadline (agent.workload_attestor_timeout). It
// bounds a fetch whose client set none (a FetchX509SVID stream usually has
// none) when a kubelet or a container engine hangs.
const DefaultTimeout = conf.DefaultWorkloadAttestorTimeout

// ErrAttestorTimeout means a workload attestor did not answer within its
// deadline. It is a resource failure, not a verdict on the caller, which
// may retry.
var ErrAttestorTimeout = errors.New("a workload attestor did not answer within its deadline")

// Plugin is a configured workload attestor and the name it is configured
// under, which logs and errors show.
type Plugin struct {
	Name     string
	Attestor WorkloadAttestor
}

// MultiAttestor is the workload attestation of the agent: it runs every
// configured attestor at once, each within a deadline, and merges their
// selectors.
type MultiAttestor struct {
	plugins []Plugin
	timeout time.Duration
	log     hclog.Logger
}

// NewMultiAttestor returns a MultiAttestor over plugins that gives each
// timeout to answer (DefaultTimeout when timeout is not positive).
func NewMultiAttestor(log hclog.Logger, timeout time.Duration, plugins ...Plugin) *MultiAttestor {
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	return &MultiAttestor{plugins: plugins, timeout: timeout, log: log}
}

type pluginResult struct {
	plugin int
	sels   []selector.Selector
	err    error
}

// Attest runs every attestor at once and merges their selectors, sorted and
// without duplicates. An attestor that finds the caller changed or gone
// fails the whole attestation with that error (IsRefusal). One that does
// not answer within the deadline is logged and fails it with
// ErrAttestorTimeout: selectors without its own would give the caller
// another identity for as long as the attestor is slow. One that fails
// otherwise is logged and contributes nothing, as in SPIRE: the others may
// still identify the workload. An attestor that ignores ctx is not waited
// for past the deadline.
func (m *MultiAttestor) Attest(ctx context.Context, p Process) ([]selector.Selector, error) {
	if len(m.plugins) == 0 {
		return nil, ErrNoSelectors
	}
	// A timer and a cancel rather than context.WithTimeout: 3 fewer
	// allocations on every call (BenchmarkMultiAttestor).
	actx, cancel := context.WithCancel(ctx)
	defer cancel()
	deadline := time.NewTimer(m.timeout)
	defer deadline.Stop()
	// Buffered: an attestor that answers after the deadline does not block.
	results := make(chan pluginResult, len(m.plugins))
	for i, pl := range m.plugins {
		go func() {
			sels, err := pl.Attestor.Attest(actx, p)
			results <- pluginResult{plugin: i, sels: sels, err: err}
		}()
	}
	answered := make([]bool, len(m.plugins))
	var all []selector.Selector
	var failed []string
	for range m.plugins {
		select {
		case r := <-results:
			answered[r.plugin] = true
			name := m.plugins[r.plugin].Name
			switch {
			case r.err == nil:
				all = append(all, r.sels...)
			case IsRefusal(r.err):
				// Nothing the others find can be trusted.
				return nil, fmt.Errorf("%s: %w", name, r.err)
			default:
				m.log.Warn("Workload attestor failed", "attestor", name, "pid", p.PID, "error", r.err)
				failed = append(failed, fmt.Sprintf("%s: %v", name, r.err))
			}
		case <-deadline.C:
			return nil, m.timedOut(p, answered)
		case <-ctx.Done():
			return nil, fmt.Errorf("workload attestation of pid %d: the caller gave up: %w", p.PID, ctx.Err())
		}
	}
	if len(all) == 0 {
		if len(failed) > 0 {
			return nil, fmt.Errorf("%w: %s", ErrNoSelectors, strings.Join(failed, "; "))
		}
		return nil, ErrNoSelectors
	}
	return selector.Sort(all), nil
}

// timedOut logs each attestor that has not answered and returns the
// ErrAttestorTimeout that names them.
func (m *MultiAttestor) timedOut(p Process, answered []bool) error {
	var late []string
	for i, ok := range answered {
		if !ok {
			name := m.plugins[i].Name
			m.log.Warn("Workload attestor did not answer within its deadline", "attestor", name, "pid", p.PID, "timeout", m.timeout)
			late = append(late, name)
		}
	}
	return fmt.Errorf("%w (%s): %s", ErrAttestorTimeout, m.timeout, strings.Join(late, ", "))
}
