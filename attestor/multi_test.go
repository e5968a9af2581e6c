package attestor

import (
	"context"
	"errors"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/attestor/selector"
	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/lanyard-dev/lanyard/telemetry"
	"github.com/lanyard-dev/lanyard/telemetry/metrictest"
)

// attestorFunc adapts a function to WorkloadAttestor.
type attestorFunc func(ctx context.Context, p Process) ([]selector.Selector, error)

func (f attestorFunc) Attest(ctx context.Context, p Process) ([]selector.Selector, error) {
	return f(ctx, p)
}

// stuck is an attestor that ignores ctx and answers only once released, as
// a plugin blocked in a call without a deadline would.
func stuck(release <-chan struct{}) WorkloadAttestor {
	return attestorFunc(func(context.Context, Process) ([]selector.Selector, error) {
		<-release
		return []selector.Selector{{Type: "slow", Value: "late"}}, nil
	})
}

// sleeper honours ctx, as an HTTP call to a hung kubelet would.
func sleeper(d time.Duration) WorkloadAttestor {
	return attestorFunc(func(ctx context.Context, _ Process) ([]selector.Selector, error) {
		select {
		case <-time.After(d):
			return []selector.Selector{{Type: "slow", Value: "late"}}, nil
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	})
}

func answering(sels ...selector.Selector) WorkloadAttestor {
	return attestorFunc(func(context.Context, Process) ([]selector.Selector, error) { return sels, nil })
}

func failing(err error) WorkloadAttestor {
	return attestorFunc(func(context.Context, Process) ([]selector.Selector, error) { return nil, err })
}

// TestMultiAttestorDeadline: an attestor that does not answer within the
// deadline, whether it ignores ctx or honours it, fails the attestation
// with ErrAttestorTimeout at the deadline, logged at Warn with its name,
// even when another attestor answered.
func TestMultiAttestorDeadline(t *testing.T) {
	release := make(chan struct{})
	defer close(release)
	const timeout = 100 * time.Millisecond
	for name, slow := range map[string]WorkloadAttestor{"ignores ctx": stuck(release), "honours ctx": sleeper(time.Hour)} {
		t.Run(name, func(t *testing.T) {
			log, logs := testkit.NewLogger(hclog.Debug)
			m := NewMultiAttestor(log, timeout, Plugin{Name: "unix", Attestor: answering(selector.Selector{Type: "unix", Value: "uid:1"})}, Plugin{Name: "kubelet", Attestor: slow})
			start := time.Now()
			sels, err := m.Attest(context.Background(), Process{PID: 42})
			took := time.Since(start)
			if !errors.Is(err, ErrAttestorTimeout) || !strings.Contains(err.Error(), "kubelet") || strings.Contains(err.Error(), "unix") {
				t.Fatalf("Attest = %v, %v; want ErrAttestorTimeout naming kubelet only", sels, err)
			}
			if IsRefusal(err) || errors.Is(err, ErrNoSelectors) {
				t.Errorf("a timeout is a refusal or a verdict: %v", err)
			}
			if took < timeout || took > timeout+2*time.Second {
				t.Errorf("Attest returned after %v, want about %v", took, timeout)
			}
			out := logs.String()
			if !strings.Contains(out, "[WARN]") || !strings.Contains(out, "did not answer within its deadline") || !strings.Contains(out, "attestor=kubelet") || !strings.Contains(out, "timeout=100ms") {
				t.Errorf("log %q does not warn about kubelet's deadline", out)
			}
		})
	}
}

// TestMultiAttestorAlone: the common case of one attestor, slow or not.
func TestMultiAttestorAlone(t *testing.T) {
	log, _ := testkit.NewLogger(hclog.Debug)
	m := NewMultiAttestor(log, 50*time.Millisecond, Plugin{Name: "unix", Attestor: sleeper(time.Hour)})
	if _, err := m.Attest(context.Background(), Process{PID: 42}); !errors.Is(err, ErrAttestorTimeout) {
		t.Fatalf("Attest of a slow attestor = %v, want ErrAttestorTimeout", err)
	}
	m = NewMultiAttestor(log, time.Minute, Plugin{Name: "unix", Attestor: sleeper(10 * time.Millisecond)})
	sels, err := m.Attest(context.Background(), Process{PID: 42})
	if err != nil || len(sels) != 1 || sels[0] != (selector.Selector{Type: "slow", Value: "late"}) {
		t.Fatalf("Attest within the deadline = %v, %v", sels, err)
	}
}

// TestMultiAttestorMerges: selectors of every attestor that answered,
// sorted without duplicates; a failed attestor contributes nothing.
func TestMultiAttestorMerges(t *testing.T) {
	log, logs := testkit.NewLogger(hclog.Debug)
	m := NewMultiAttestor(log, time.Minute,
		Plugin{Name: "unix", Attestor: answering(selector.Selector{Type: "unix", Value: "uid:1"}, selector.Selector{Type: "unix", Value: "gid:2"})},
		Plugin{Name: "docker", Attestor: failing(errors.New("engine unreachable"))},
		Plugin{Name: "k8s", Attestor: answering(selector.Selector{Type: "k8s", Value: "ns:a"}, selector.Selector{Type: "unix", Value: "uid:1"})},
	)
	sels, err := m.Attest(context.Background(), Process{PID: 42})
	want := []selector.Selector{{Type: "k8s", Value: "ns:a"}, {Type: "unix", Value: "gid:2"}, {Type: "unix", Value: "uid:1"}}
	if err != nil || len(sels) != len(want) {
		t.Fatalf("Attest = %v, %v; want %v", sels, err, want)
	}
	for i := range want {
		if sels[i] != want[i] {
			t.Fatalf("Attest = %v, want %v", sels, want)
		}
	}
	if out := logs.String(); !strings.Contains(out, "attestor=docker") || !strings.Contains(out, "engine unreachable") {
		t.Errorf("log %q does not name the failed attestor", out)
	}

	m = NewMultiAttestor(log, time.Minute, Plugin{Name: "docker", Attestor: failing(errors.New("engine unreachable"))})
	if _, err := m.Attest(context.Background(), Process{PID: 42}); !errors.Is(err, ErrNoSelectors) || !strings.Contains(err.Error(), "docker: engine unreachable") {
		t.Errorf("Attest of a failing attestor = %v, want ErrNoSelectors with its reason", err)
	}
	if _, err := NewMultiAttestor(log, time.Minute).Attest(context.Background(), Process{PID: 42}); !errors.Is(err, ErrNoSelectors) {
		t.Errorf("Attest with no attestor = %v, want ErrNoSelectors", err)
	}
}

// TestMultiAttestorRefusalFirst: a refusal answers at once, without
// waiting for a slow attestor, and wins over every other result.
func TestMultiAttestorRefusalFirst(t *testing.T) {
	release := make(chan struct{})
	defer close(release)
	log, _ := testkit.NewLogger(hclog.Debug)
	m := NewMultiAttestor(log, time.Minute, Plugin{Name: "kubelet", Attestor: stuck(release)}, Plugin{Name: "unix", Attestor: failing(ErrCallerChanged)})
	done := make(chan error, 1)
	go func() {
		_, err := m.Attest(context.Background(), Process{PID: 42})
		done <- err
	}()
	err := testkit.Receive(t, done, 10*time.Second, "the refusal (it must not wait for the slow attestor)")
	if !errors.Is(err, ErrCallerChanged) || !IsRefusal(err) || !strings.Contains(err.Error(), "unix") {
		t.Fatalf("Attest = %v, want the unix attestor's ErrCallerChanged", err)
	}
}

// TestMultiAttestorCallerGone: when the caller's ctx ends first, the error
// is the caller's, not a timeout.
func TestMultiAttestorCallerGone(t *testing.T) {
	release := make(chan struct{})
	defer close(release)
	log, logs := testkit.NewLogger(hclog.Debug)
	m := NewMultiAttestor(log, time.Minute, Plugin{Name: "kubelet", Attestor: stuck(release)})
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	_, err := m.Attest(ctx, Process{PID: 42})
	if !errors.Is(err, context.DeadlineExceeded) || errors.Is(err, ErrAttestorTimeout) {
		t.Fatalf("Attest after the caller's deadline = %v, want its context.DeadlineExceeded", err)
	}
	if strings.Contains(logs.String(), "within its deadline") {
		t.Errorf("the caller's deadline was logged as the attestor's: %s", logs.String())
	}
}

// BenchmarkMultiAttestor is the cost the deadline adds to every
// attestation of the common case, one attestor that answers at once.
func BenchmarkMultiAttestor(b *testing.B) {
	log, _ := testkit.NewLogger(hclog.Debug)
	m := NewMultiAttestor(log, DefaultTimeout, Plugin{Name: "unix", Attestor: answering(selector.Selector{Type: "unix", Value: "uid:1"})})
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := m.Attest(ctx, Process{PID: 42}); err != nil {
			b.Fatal(err)
		}
	}
}

// TestMultiAttestorInProcess: an attestor that runs on the caller's
// goroutine is bounded by the same deadline (through ctx), its refusal
// still ends the attestation, and it is merged with the others.
func TestMultiAttestorInProcess(t *testing.T) {
	log, logs := testkit.NewLogger(hclog.Debug)
	m := NewMultiAttestor(log, 50*time.Millisecond, Plugin{Name: "unix", Attestor: sleeper(time.Hour), InProcess: true})
	if _, err := m.Attest(context.Background(), Process{PID: 42}); !errors.Is(err, ErrAttestorTimeout) {
		t.Fatalf("Attest of a slow in-process attestor = %v, want ErrAttestorTimeout", err)
	}
	if !strings.Contains(logs.String(), "attestor=unix") {
		t.Errorf("the deadline was not logged with the attestor's name: %s", logs.String())
	}
	m = NewMultiAttestor(log, time.Minute, Plugin{Name: "unix", Attestor: failing(ErrCallerGone), InProcess: true},
		Plugin{Name: "k8s", Attestor: answering(selector.Selector{Type: "k8s", Value: "ns:a"})})
	if _, err := m.Attest(context.Background(), Process{PID: 42}); !errors.Is(err, ErrCallerGone) {
		t.Fatalf("Attest with an in-process refusal = %v, want ErrCallerGone", err)
	}
	m = NewMultiAttestor(log, time.Minute, Plugin{Name: "unix", Attestor: answering(selector.Selector{Type: "unix", Value: "uid:1"}), InProcess: true},
		Plugin{Name: "k8s", Attestor: answering(selector.Selector{Type: "k8s", Value: "ns:a"})})
	sels, err := m.Attest(context.Background(), Process{PID: 42})
	want := []selector.Selector{{Type: "k8s", Value: "ns:a"}, {Type: "unix", Value: "uid:1"}}
	if err != nil || !slices.Equal(sels, want) {
		t.Fatalf("Attest = %v, %v, want %v", sels, err, want)
	}
}

// BenchmarkMultiAttestorInProcess is the cost of the deadline for the
// common case as the agent runs it: the unix attestor alone, in process.
func BenchmarkMultiAttestorInProcess(b *testing.B) {
	log, _ := testkit.NewLogger(hclog.Debug)
	m := NewMultiAttestor(log, DefaultTimeout, Plugin{Name: "unix", Attestor: answering(selector.Selector{Type: "unix", Value: "uid:1"}), InProcess: true})
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := m.Attest(ctx, Process{PID: 42}); err != nil {
			b.Fatal(err)
		}
	}
}

// TestMultiAttestorCapsStuckCalls: an attestor that ignores ctx holds at
// most MaxStuckCalls goroutines; past that its calls fail at once with
// ErrAttestorTimeout, logged once, until the stuck calls return.
func TestMultiAttestorCapsStuckCalls(t *testing.T) {
	release := make(chan struct{})
	var started atomic.Int32
	blocked := attestorFunc(func(context.Context, Process) ([]selector.Selector, error) {
		if started.Add(1) > MaxStuckCalls+1 {
			return []selector.Selector{{Type: "engine", Value: "ok"}}, nil
		}
		<-release
		return nil, errors.New("too late")
	})
	log, logs := testkit.NewLogger(hclog.Debug)
	m := NewMultiAttestor(log, time.Millisecond, Plugin{Name: "engine", Attestor: blocked})
	for i := 0; i < MaxStuckCalls; i++ {
		if _, err := m.Attest(context.Background(), Process{PID: 42}); !errors.Is(err, ErrAttestorTimeout) {
			t.Fatalf("attestation %d = %v, want ErrAttestorTimeout", i, err)
		}
	}
	_, err := m.Attest(context.Background(), Process{PID: 42})
	if !errors.Is(err, ErrAttestorTimeout) || !strings.Contains(err.Error(), "still running") {
		t.Fatalf("attestation past the cap = %v, want ErrAttestorTimeout naming the stuck calls", err)
	}
	if n := started.Load(); n != MaxStuckCalls {
		t.Fatalf("the attestor was called %d times, want %d: the cap must not start another call", n, MaxStuckCalls)
	}
	if got := strings.Count(logs.String(), "too many calls stuck"); got != 1 {
		t.Errorf("the cap was logged %d times, want once:\n%s", got, logs)
	}
	close(release)
	testkit.WaitFor(t, 10*time.Second, "the stuck calls to be counted out", func() bool {
		return m.stuck[0].n.Load() == 0
	})
	// The next call gets the first answer past the blocked ones.
	started.Store(MaxStuckCalls + 1)
	m.timeout = time.Minute
	sels, err := m.Attest(context.Background(), Process{PID: 42})
	if err != nil || len(sels) != 1 {
		t.Fatalf("attestation after the stuck calls returned = %v, %v", sels, err)
	}
	if !strings.Contains(logs.String(), "answers again") {
		t.Errorf("the end of the cap was not logged:\n%s", logs)
	}
}

// TestMultiAttestorTimeoutSaysWhy: an attestor that honours ctx and says
// why it had no answer (a kubelet's 403) has that reason in the timeout
// error the caller gets, bounded.
func TestMultiAttestorTimeoutSaysWhy(t *testing.T) {
	reasoned := attestorFunc(func(ctx context.Context, _ Process) ([]selector.Selector, error) {
		<-ctx.Done()
		return nil, errors.New("the kubelet answered 403 Forbidden: grant get on nodes/proxy " + strings.Repeat("x", 2000))
	})
	log, _ := testkit.NewLogger(hclog.Debug)
	for name, inProcess := range map[string]bool{"on a worker": false, "in process": true} {
		m := NewMultiAttestor(log, 20*time.Millisecond, Plugin{Name: "k8s", Attestor: reasoned, InProcess: inProcess})
		m.lateGrace = time.Minute // answered at once; a loaded machine must not miss it
		_, err := m.Attest(context.Background(), Process{PID: 42})
		if !errors.Is(err, ErrAttestorTimeout) || !strings.Contains(err.Error(), "k8s: the kubelet answered 403 Forbidden: grant get on nodes/proxy") {
			t.Errorf("%s: Attest = %v, want ErrAttestorTimeout with the attestor's reason", name, err)
		}
		if err != nil && len(err.Error()) > 1000 {
			t.Errorf("%s: the reason is not bounded: %d bytes", name, len(err.Error()))
		}
	}
}

// TestMultiAttestorLogsAFailureOncePerCause: an attestor that keeps failing
// for one cause (no D-Bus, an engine down) is warned about once, not on
// every fetch; a new cause is warned about at once.
func TestMultiAttestorLogsAFailureOncePerCause(t *testing.T) {
	cause := errors.New("the system bus is not reachable")
	var current atomic.Pointer[error]
	current.Store(&cause)
	failingNow := attestorFunc(func(context.Context, Process) ([]selector.Selector, error) { return nil, *current.Load() })
	log, logs := testkit.NewLogger(hclog.Debug)
	m := NewMultiAttestor(log, time.Minute, Plugin{Name: "unix", Attestor: answering(selector.Selector{Type: "unix", Value: "uid:1"}), InProcess: true}, Plugin{Name: "systemd", Attestor: failingNow})
	for range 5 {
		if _, err := m.Attest(context.Background(), Process{PID: 42}); err != nil {
			t.Fatal(err)
		}
	}
	if got := strings.Count(logs.String(), "Workload attestor failed"); got != 1 {
		t.Fatalf("5 failures for one cause logged %d times, want once:\n%s", got, logs)
	}
	other := errors.New("the bus sees the agent under another PID")
	current.Store(&other)
	if _, err := m.Attest(context.Background(), Process{PID: 42}); err != nil {
		t.Fatal(err)
	}
	if got := strings.Count(logs.String(), "Workload attestor failed"); got != 2 || !strings.Contains(logs.String(), "another PID") {
		t.Fatalf("a new cause was not logged at once:\n%s", logs)
	}
}

// Each attestor's answers are timed and its failures counted by reason;
// the attestation as a whole is timed too.
func TestMultiAttestorMetrics(t *testing.T) {
	log := hclog.NewNullLogger()
	metrics := telemetry.New()
	release := make(chan struct{})
	defer close(release)
	m := NewMultiAttestor(log, time.Minute,
		Plugin{Name: "unix", Attestor: answering(selector.Selector{Type: "unix", Value: "uid:1"}), InProcess: true},
		Plugin{Name: "docker", Attestor: failing(errors.New("engine unreachable"))})
	m.Observe(metrics)
	if _, err := m.Attest(context.Background(), Process{PID: 42}); err != nil {
		t.Fatal(err)
	}
	slow := NewMultiAttestor(log, 10*time.Millisecond, Plugin{Name: "k8s", Attestor: stuck(release)})
	slow.Observe(metrics)
	if _, err := slow.Attest(context.Background(), Process{PID: 42}); !errors.Is(err, ErrAttestorTimeout) {
		t.Fatalf("a stuck attestor: %v", err)
	}
	f := metrictest.Gather(t, metrics.Registry())
	for _, c := range []struct {
		name   string
		labels map[string]string
		want   float64
	}{
		{telemetry.AttestorDuration.Name, map[string]string{"attestor": "unix"}, 1},
		{telemetry.AttestorDuration.Name, map[string]string{"attestor": "docker"}, 1},
		{telemetry.AttestorFailures.Name, map[string]string{"attestor": "docker", "reason": telemetry.AttestorError}, 1},
		{telemetry.AttestorFailures.Name, map[string]string{"attestor": "k8s", "reason": telemetry.AttestorTimeout}, 1},
		{telemetry.AttestationDuration.Name, nil, 2},
	} {
		if v, _ := f.Value(c.name, c.labels); v != c.want {
			t.Errorf("%s%v = %v, want %v; series: %s", c.name, c.labels, v, c.want, f.Labels(c.name))
		}
	}
	if _, ok := f.Value(telemetry.AttestorFailures.Name, map[string]string{"attestor": "unix"}); ok {
		t.Error("the attestor that answered has failures")
	}
}
