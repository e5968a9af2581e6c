package k8s

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/internal/testkit"
	corev1 "k8s.io/api/core/v1"
)

// countingFetch is a fetch that records when each started (the podLists'
// own start time) and answers from answer.
type countingFetch struct {
	mu     sync.Mutex
	f      *podLists
	starts []time.Time
	answer func(n int) (*podList, error)
}

func (c *countingFetch) fetch(context.Context) (*podList, error) {
	c.f.mu.Lock()
	start := c.f.lastStart
	c.f.mu.Unlock()
	c.mu.Lock()
	c.starts = append(c.starts, start)
	n := len(c.starts)
	c.mu.Unlock()
	return c.answer(n)
}

func (c *countingFetch) count() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.starts)
}

func newCountingLists(interval time.Duration, answer func(n int) (*podList, error)) (*podLists, *countingFetch) {
	c := &countingFetch{answer: answer}
	c.f = newPodLists(c.fetch, interval, hclog.NewNullLogger())
	return c.f, c
}

func emptyList(int) (*podList, error) { return &podList{}, nil }

func TestPodListsSpacesFetchStarts(t *testing.T) {
	const interval = 20 * time.Millisecond
	f, c := newCountingLists(interval, emptyList)
	ctx := testkit.Context(t, time.Minute)
	var seen uint64
	for range 5 {
		list, err := f.next(ctx, seen)
		if err != nil {
			t.Fatal(err)
		}
		if list.version <= seen {
			t.Fatalf("version %d after %d", list.version, seen)
		}
		seen = list.version
	}
	for i := 1; i < len(c.starts); i++ {
		if d := c.starts[i].Sub(c.starts[i-1]); d < interval {
			t.Errorf("fetch %d started %s after the one before, under the interval %s", i+1, d, interval)
		}
	}
}

// A list answers whoever has not searched it until the next fetch may
// start; one who has waits for a newer one.
func TestPodListsReuse(t *testing.T) {
	f, c := newCountingLists(time.Hour, emptyList)
	ctx := testkit.Context(t, time.Minute)
	first, err := f.next(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	again, err := f.next(ctx, 0)
	if err != nil || again != first || c.count() != 1 {
		t.Fatalf("a new attestation got %p (fetches: %d), want the fresh list %p", again, c.count(), first)
	}
	// The next fetch may start only in an hour: an attestation that has
	// searched the list waits, and leaving cancels the scheduled fetch.
	short, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
	defer cancel()
	if _, err := f.next(short, first.version); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want DeadlineExceeded", err)
	}
	if n := f.waiting(); n != 0 {
		t.Errorf("%d still waiting", n)
	}
	f.mu.Lock()
	pending := f.pending
	f.mu.Unlock()
	if pending != nil || c.count() != 1 {
		t.Errorf("an abandoned fetch is still scheduled (%v) or ran (%d fetches)", pending != nil, c.count())
	}
}

func TestPodListsFailureKeepsLastGood(t *testing.T) {
	boom := errors.New("kubelet down")
	f, _ := newCountingLists(time.Millisecond, func(n int) (*podList, error) {
		if n == 1 {
			return &podList{}, nil
		}
		return nil, boom
	})
	ctx := testkit.Context(t, time.Minute)
	good, err := f.next(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	list, err := f.next(ctx, good.version)
	if !errors.Is(err, boom) || list != good {
		t.Fatalf("after a failed fetch: %p, %v; want the last good list %p and the error", list, err, good)
	}
	if f.lastGood() != good {
		t.Error("the failure replaced the last good list")
	}
}

// As in make bench's k8s burst: workloads connect at once and the kubelet
// lists their containers over the next while. Fetch starts stay spaced by
// the interval whatever the number of workloads.
func TestAttestBurstWhileContainersAppear(t *testing.T) {
	const (
		burst    = 100
		interval = 50 * time.Millisecond
		spread   = 200 * time.Millisecond
	)
	e := newSecureEnv(t, `poll_retry_interval = "50ms"`)
	pods := testPods(500)
	start := time.Now()
	e.kubelet.pods = func(int) []corev1.Pod {
		listed := make([]corev1.Pod, len(pods))
		copy(listed, pods)
		for i := range burst {
			if time.Since(start) < spread*time.Duration(i)/burst {
				listed[i].Status.ContainerStatuses = nil
			}
		}
		return listed
	}
	ctx := testkit.Context(t, time.Minute)
	var wg sync.WaitGroup
	errs := make(chan error, burst)
	for i := range burst {
		p := e.inPod(int32(6000+i), string(pods[i].UID), containerOf(pods[i], "app"))
		wg.Go(func() {
			_, err := e.a.Attest(ctx, p)
			errs <- err
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	n := e.kubelet.count()
	t.Logf("%d workloads, containers listed over %s: %d kubelet requests in %s", burst, spread, n, elapsed)
	if limit := 1 + int(elapsed/interval); n > limit {
		t.Errorf("%d kubelet requests in %s: more than one per %s", n, elapsed, interval)
	}
}
