package unix

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testkit"
	sysunix "golang.org/x/sys/unix"
)

// sparseFile creates a file of size bytes that is one hole, cheap on disk
// however large, and returns its descriptor and version.
func sparseFile(t *testing.T, path string, size int64) (int, hashKey) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	var st sysunix.Stat_t
	if err := sysunix.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	return int(f.Fd()), keyOf(&st)
}

func (c *hashCache) inflightLen() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.inflight)
}

// checkReleased waits until c holds nothing for a call any more: no
// goroutine, descriptor or in-flight entry, and caches no partial sum.
func checkReleased(t *testing.T, c *hashCache, fds, goroutines int) {
	t.Helper()
	testkit.WaitFor(t, 10*time.Second, "every compute goroutine to end", func() bool { return c.computes.Load() == 0 })
	testkit.WaitFor(t, 10*time.Second, "the descriptors to be closed", func() bool { return testkit.OpenFDs(t) <= fds })
	testkit.WaitFor(t, 10*time.Second, "the goroutines to end", func() bool { return runtime.NumGoroutine() <= goroutines })
	if n := c.inflightLen(); n != 0 {
		t.Errorf("%d calls still in flight", n)
	}
	if n := c.running.Load(); n != 0 {
		t.Errorf("%d hashes still hold a slot", n)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.sums) != 0 {
		t.Errorf("abandoned hashes were cached: %v", c.sums)
	}
}

// TestHashesBoundedAndReleased is the attack of a caller that touches a
// huge binary before each call and cancels: many file versions missed at
// once, by callers that give up.
func TestHashesBoundedAndReleased(t *testing.T) {
	const versions = 8
	const size = 64 << 30 // far longer to hash than the test runs
	c := newHashCache(maxHashEntries)
	dir := t.TempDir()
	fds := make([]int, versions)
	keys := make([]hashKey, versions)
	for i := range versions {
		fds[i], keys[i] = sparseFile(t, filepath.Join(dir, "big"+strconv.Itoa(i)), size)
	}
	fdsBefore, goroutinesBefore := testkit.OpenFDs(t), runtime.NumGoroutine()

	cancels := make([]context.CancelFunc, versions)
	errcs := make([]chan error, versions)
	for i := range versions {
		ctx, cancel := context.WithCancel(context.Background())
		cancels[i], errcs[i] = cancel, make(chan error, 1)
		go func() {
			_, err := c.get(ctx, keys[i], fds[i])
			errcs[i] <- err
		}()
	}
	defer func() {
		for _, cancel := range cancels {
			cancel()
		}
	}()
	testkit.WaitFor(t, 10*time.Second, "every version to be in flight and the slots to fill", func() bool {
		return c.inflightLen() == versions && c.running.Load() >= maxConcurrentHashes
	})

	// The callers of the versions waiting for a slot leave first, while
	// the slots are still held: they say what they waited for.
	c.mu.Lock()
	var waiting, started []int
	for i, k := range keys {
		if c.inflight[k].started.Load() {
			started = append(started, i)
		} else {
			waiting = append(waiting, i)
		}
	}
	c.mu.Unlock()
	if len(started) != maxConcurrentHashes {
		t.Fatalf("%d hashes started, want %d", len(started), maxConcurrentHashes)
	}
	for _, i := range append(waiting, started...) {
		cancels[i]()
		err := testkit.Receive(t, errcs[i], 10*time.Second, fmt.Sprintf("caller %d to return after its cancel", i))
		if !errors.Is(err, context.Canceled) {
			t.Errorf("caller %d: got %v, want context.Canceled", i, err)
		}
		if slices.Contains(waiting, i) && !strings.Contains(err.Error(), "free slot") {
			t.Errorf("caller %d waited for a slot, but its error %q does not say so", i, err)
		}
	}
	if p := c.peak.Load(); p > maxConcurrentHashes {
		t.Errorf("%d hashes ran at once, limit is %d", p, maxConcurrentHashes)
	}
	checkReleased(t, c, fdsBefore, goroutinesBefore)
	if p := c.peak.Load(); p > maxConcurrentHashes {
		t.Errorf("%d hashes ran at once, limit is %d", p, maxConcurrentHashes)
	}

	// The attack loop: each call misses (an abandoned version is
	// forgotten, as a new ctime would make it) and is cancelled at once.
	errc := make(chan error, versions)
	for range 50 {
		for i := range versions {
			ctx, cancel := context.WithCancel(context.Background())
			go func() {
				_, err := c.get(ctx, keys[i], fds[i])
				errc <- err
			}()
			cancel()
		}
		for range versions {
			if err := <-errc; !errors.Is(err, context.Canceled) {
				t.Fatalf("got %v, want context.Canceled", err)
			}
		}
	}
	checkReleased(t, c, fdsBefore, goroutinesBefore)
	if p := c.peak.Load(); p > maxConcurrentHashes {
		t.Errorf("%d hashes ran at once, limit is %d", p, maxConcurrentHashes)
	}
	t.Logf("%d files read, %d MiB hashed of %d GiB offered", c.reads.Load(), c.hashed.Load()>>20, 51*versions*size>>30)
}

// TestAbandonedHashStops: a hash whose only caller gives up stops being
// read, and the next caller starts afresh.
func TestAbandonedHashStops(t *testing.T) {
	const size = 4 << 30
	c := newHashCache(maxHashEntries)
	fd, key := sparseFile(t, filepath.Join(t.TempDir(), "big"), size)
	fdsBefore, goroutinesBefore := testkit.OpenFDs(t), runtime.NumGoroutine()

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	errc := make(chan error, 1)
	go func() {
		_, err := c.get(ctx, key, fd)
		errc <- err
	}()
	testkit.WaitFor(t, 10*time.Second, "the read to begin", func() bool { return c.hashed.Load() > 0 })
	cancel()
	start := time.Now()
	if err := testkit.Receive(t, errc, 10*time.Second, "the caller to return after its cancel"); !errors.Is(err, context.Canceled) {
		t.Errorf("got %v, want context.Canceled", err)
	}
	atCancel := c.hashed.Load()
	checkReleased(t, c, fdsBefore, goroutinesBefore)
	stopped := time.Since(start)
	hashed := c.hashed.Load()
	t.Logf("stopped %v after the cancel, %d KiB hashed, %d KiB of them after the caller left", stopped, hashed>>10, (hashed-atCancel)>>10)
	if hashed >= size {
		t.Fatalf("the whole %d GiB file was hashed for a caller that left", size>>30)
	}

	// A later caller starts a new read rather than joining the stopped one.
	ctx, cancel = context.WithCancel(context.Background())
	go func() {
		_, err := c.get(ctx, key, fd)
		errc <- err
	}()
	testkit.WaitFor(t, 10*time.Second, "a second read to begin", func() bool { return c.reads.Load() == 2 })
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Errorf("second caller: got %v, want context.Canceled", err)
	}
	checkReleased(t, c, fdsBefore, goroutinesBefore)
}

// BenchmarkHashFd is the rate of one hash: sha256 of a hole, whose reads
// cost the kernel only a copy of zeroes.
func BenchmarkHashFd(b *testing.B) {
	const size = 256 << 20
	f, err := os.Create(filepath.Join(b.TempDir(), "hole"))
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		b.Fatal(err)
	}
	c := newHashCache(1)
	buf := make([]byte, hashBufSize)
	b.SetBytes(size)
	for b.Loop() {
		if _, err := c.hashFd(int(f.Fd()), buf, nil); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkCachedWhileHashing is a cached attestation while hashes of
// endless files run, the cost of maxConcurrentHashes to everyone else; 8
// is what the agent ran before the bound when 8 callers missed at once.
func BenchmarkCachedWhileHashing(b *testing.B) {
	for _, n := range []int{0, 1, maxConcurrentHashes, 8} {
		b.Run(strconv.Itoa(n), func(b *testing.B) {
			c := newHashCache(maxHashEntries)
			c.slots = make(chan struct{}, max(n, 1))
			ctx, cancel := context.WithCancel(context.Background())
			for i := range n {
				f, err := os.Create(filepath.Join(b.TempDir(), strconv.Itoa(i)))
				if err != nil {
					b.Fatal(err)
				}
				defer f.Close()
				if err := f.Truncate(1 << 40); err != nil {
					b.Fatal(err)
				}
				go func() { _, _ = c.get(ctx, hashKey{ino: uint64(i)}, int(f.Fd())) }()
			}
			// Cancelled before the files close: the hashes stop first.
			defer func() {
				cancel()
				for c.computes.Load() != 0 {
					runtime.Gosched()
				}
			}()
			a := newTestAttestor(b, "discover_workload_path = true")
			proc := processOf(b, int32(os.Getpid()))
			if _, err := a.Attest(ctx, proc); err != nil {
				b.Fatal(err)
			}
			for b.Loop() {
				if _, err := a.Attest(ctx, proc); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
