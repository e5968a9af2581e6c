package attestor

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
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
	// InProcess attestors read only the kernel's state and honour ctx:
	// they run on the caller's goroutine. The others (calls to a kubelet,
	// a container engine, D-Bus) run on goroutines of their own, so that
	// one stuck in a call despite ctx cannot hold the caller past the
	// deadline. Handing a call to another goroutine costs about a tenth of
	// a fetch on a reused connection (make bench, x509 and jwt at c=16).
	InProcess bool
}

// MaxStuckCalls is how many of one attestor's calls may still be running
// past the end of their attestation (a kubelet or an engine that ignores
// ctx) before the attestor's next calls fail at once with
// ErrAttestorTimeout instead of starting yet another goroutine.
const MaxStuckCalls = 64

// MultiAttestor is the workload attestation of the agent: it runs every
// configured attestor at once, each within a deadline, and merges their
// selectors.
type MultiAttestor struct {
	plugins  []Plugin
	stuck    []stuckCalls // by plugin; used only for those not InProcess
	failures []failureLog // by plugin
	timeout  time.Duration
	// lateGrace is defaultLateGrace; tests of the reasons make it long,
	// since an attestor that answers ends the wait at once.
	lateGrace time.Duration
	log       hclog.Logger
}

// failureLogEvery spaces the warnings of an attestor that keeps failing for
// the same cause (no D-Bus, an engine that is down): once per cause, then
// once in this long, with how many were not logged.
const failureLogEvery = 30 * time.Second

// failureLog is what an attestor's last failure warning said, and when.
type failureLog struct {
	mu         sync.Mutex
	cause      string
	at         time.Time
	suppressed int
}

// logFailure warns that plugin i failed, unless it failed for the same
// cause within failureLogEvery.
func (m *MultiAttestor) logFailure(i int, p Process, err error) {
	f := &m.failures[i]
	cause := err.Error()
	f.mu.Lock()
	now := time.Now()
	if cause == f.cause && now.Sub(f.at) < failureLogEvery {
		f.suppressed++
		f.mu.Unlock()
		return
	}
	suppressed := f.suppressed
	f.cause, f.at, f.suppressed = cause, now, 0
	f.mu.Unlock()
	m.log.Warn("Workload attestor failed", "attestor", m.plugins[i].Name, "pid", p.PID, "error", err, "same_failures_not_logged", suppressed)
}

// stuckCalls counts one attestor's calls that outlived their attestation.
type stuckCalls struct {
	n      atomic.Int32
	capped atomic.Bool // logged once each time the cap is reached
}

// NewMultiAttestor returns a MultiAttestor over plugins that gives each
// timeout to answer (DefaultTimeout when timeout is not positive).
func NewMultiAttestor(log hclog.Logger, timeout time.Duration, plugins ...Plugin) *MultiAttestor {
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	return &MultiAttestor{plugins: plugins, stuck: make([]stuckCalls, len(plugins)), failures: make([]failureLog, len(plugins)), timeout: timeout, lateGrace: defaultLateGrace, log: log}
}

// call is one attestor's call on a worker. Exactly one of the worker
// (finished) and the attestation (abandoned) moves it out of running.
type call struct {
	state atomic.Int32
}

const (
	callRunning int32 = iota
	callFinished
	callAbandoned
)

type pluginResult struct {
	plugin int
	sels   []selector.Selector
	err    error
}

// Plugin returns the attestor configured under name, or nil.
func (m *MultiAttestor) Plugin(name string) WorkloadAttestor {
	for _, p := range m.plugins {
		if p.Name == name {
			return p.Attestor
		}
	}
	return nil
}

// Attest runs every attestor at once and merges their selectors, sorted and
// without duplicates. An attestor that finds the caller changed or gone
// fails the whole attestation with that error (IsRefusal). One that does
// not answer within the deadline is logged and fails it with
// ErrAttestorTimeout: selectors without its own would give the caller
// another identity for as long as the attestor is slow. One that fails
// otherwise is logged and contributes nothing, as in SPIRE: the others may
// still identify the workload. An attestor that is not InProcess and
// ignores ctx is not waited for past the deadline.
func (m *MultiAttestor) Attest(ctx context.Context, p Process) ([]selector.Selector, error) {
	if len(m.plugins) == 0 {
		return nil, ErrNoSelectors
	}
	actx, cancel := context.WithTimeout(ctx, m.timeout)
	defer cancel()
	var results chan pluginResult
	var calls []*call // by plugin; nil for InProcess ones
	waiting := 0
	for i, pl := range m.plugins {
		if pl.InProcess {
			continue
		}
		if results == nil {
			// Buffered: an attestor that answers after the deadline does
			// not block.
			results = make(chan pluginResult, len(m.plugins))
			calls = make([]*call, len(m.plugins))
		}
		if err := m.admit(i); err != nil {
			abandon(m, calls)
			return nil, err
		}
		c := &call{}
		calls[i] = c
		waiting++
		workers.run(func() {
			sels, err := pl.Attestor.Attest(actx, p)
			if !c.state.CompareAndSwap(callRunning, callFinished) {
				m.stuck[i].n.Add(-1)
			}
			results <- pluginResult{plugin: i, sels: sels, err: err}
		})
	}
	// Calls still running when the attestation ends count as stuck until
	// they return.
	defer abandon(m, calls)
	g := merge{m: m, ctx: ctx, actx: actx, p: p}
	// No allocation for the usual handful of attestors.
	var answered [8]bool
	if len(m.plugins) <= len(answered) {
		g.answered = answered[:len(m.plugins)]
	} else {
		g.answered = make([]bool, len(m.plugins))
	}
	for i, pl := range m.plugins {
		if pl.InProcess {
			sels, err := pl.Attestor.Attest(actx, p)
			if err := g.add(pluginResult{plugin: i, sels: sels, err: err}); err != nil {
				return nil, err
			}
		}
	}
	for ; waiting > 0; waiting-- {
		select {
		case r := <-results:
			if err := g.add(r); err != nil {
				return nil, err
			}
		case <-actx.Done():
			if ctx.Err() == nil {
				g.collectLate(results, waiting)
			}
			return nil, g.ended()
		}
	}
	return g.result()
}

// defaultLateGrace is how long, past the deadline, an attestation waits for the
// attestors that honour ctx to say why they had no answer (a kubelet's
// 403, a container not listed): their reason then reaches the caller.
const defaultLateGrace = 50 * time.Millisecond

// maxLateReason bounds each reason the caller is told: it comes from a
// daemon (a kubelet's answer) and goes to a caller not yet identified.
const maxLateReason = 512

// addLate records why an attestor that answered after the deadline had no
// answer in time.
func (g *merge) addLate(r pluginResult) {
	if r.err == nil || g.ctx.Err() != nil {
		return
	}
	reason := r.err.Error()
	if len(reason) > maxLateReason {
		reason = reason[:maxLateReason] + "..."
	}
	g.late = append(g.late, g.m.plugins[r.plugin].Name+": "+reason)
}

// collectLate records the reasons of attestors that return within
// m.lateGrace of the deadline.
func (g *merge) collectLate(results <-chan pluginResult, waiting int) {
	timer := time.NewTimer(g.m.lateGrace)
	defer timer.Stop()
	for ; waiting > 0; waiting-- {
		select {
		case r := <-results:
			g.addLate(r)
		case <-timer.C:
			return
		}
	}
}

// admit refuses a call to plugin i while MaxStuckCalls of its calls are
// still running past their attestation: an attestor that ignores ctx would
// otherwise take a goroutine for every fetch, for good.
func (m *MultiAttestor) admit(i int) error {
	s := &m.stuck[i]
	if s.n.Load() < MaxStuckCalls {
		if s.capped.CompareAndSwap(true, false) {
			m.log.Info("Workload attestor answers again", "attestor", m.plugins[i].Name)
		}
		return nil
	}
	if s.capped.CompareAndSwap(false, true) {
		m.log.Error("Workload attestor has too many calls stuck past their deadline; failing its calls until they return", "attestor", m.plugins[i].Name, "stuck", MaxStuckCalls)
	}
	return fmt.Errorf("%w: %s has %d calls still running past their deadline", ErrAttestorTimeout, m.plugins[i].Name, MaxStuckCalls)
}

// abandon marks the calls still running as stuck.
func abandon(m *MultiAttestor, calls []*call) {
	for i, c := range calls {
		if c != nil && c.state.CompareAndSwap(callRunning, callAbandoned) {
			m.stuck[i].n.Add(1)
		}
	}
}

// merge gathers the answers of one attestation.
type merge struct {
	m        *MultiAttestor
	ctx      context.Context // the caller's
	actx     context.Context // the caller's within the deadline
	p        Process
	answered []bool
	all      []selector.Selector
	failed   []string
	late     []string // why attestors past the deadline had no answer
}

// add takes one attestor's answer; an error ends the attestation.
func (g *merge) add(r pluginResult) error {
	name := g.m.plugins[r.plugin].Name
	switch {
	case r.err == nil:
		g.answered[r.plugin] = true
		if g.all == nil {
			// The attestor's slice is the caller's: no copy for the
			// usual single attestor.
			g.all = r.sels
		} else {
			g.all = append(g.all, r.sels...)
		}
	case IsRefusal(r.err):
		// Nothing the others find can be trusted.
		return fmt.Errorf("%s: %w", name, r.err)
	case g.actx.Err() != nil:
		// It gave up because the deadline passed or the caller left.
		g.addLate(r)
		return g.ended()
	default:
		g.answered[r.plugin] = true
		g.m.logFailure(r.plugin, g.p, r.err)
		g.failed = append(g.failed, fmt.Sprintf("%s: %v", name, r.err))
	}
	return nil
}

// ended is the error of an attestation cut short: the caller left, or the
// deadline passed before every attestor answered.
func (g *merge) ended() error {
	if err := g.ctx.Err(); err != nil {
		return fmt.Errorf("workload attestation of pid %d: the caller gave up: %w", g.p.PID, err)
	}
	err := g.m.timedOut(g.p, g.answered)
	if len(g.late) > 0 {
		err = fmt.Errorf("%w; %s", err, strings.Join(g.late, "; "))
	}
	return err
}

func (g *merge) result() ([]selector.Selector, error) {
	if len(g.all) == 0 {
		if len(g.failed) > 0 {
			return nil, fmt.Errorf("%w: %s", ErrNoSelectors, strings.Join(g.failed, "; "))
		}
		return nil, ErrNoSelectors
	}
	return selector.Sort(g.all), nil
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
