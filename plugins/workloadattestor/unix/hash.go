package unix

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"

	"github.com/lanyard-dev/lanyard/attestor"
	"golang.org/x/sync/singleflight"
	sysunix "golang.org/x/sys/unix"
)

// maxHashEntries bounds the executable hash cache.
const maxHashEntries = 1024

// maxConcurrentHashes bounds the executables read at once. A hash keeps a
// core busy (sha256 at 0.75-1.4 GB/s here, BenchmarkHashFd), so before this
// bound every caller that missed took a core, a descriptor and a buffer
// for as long as its file lasted. On a 2-core machine, the smallest the
// agent runs on, a cached attestation took 10 µs with no hash running,
// 10-19 µs with one or two and 45-100 µs with eight
// (BenchmarkCachedWhileHashing): two keep the Workload API responsive on
// the smallest machines and still let a rollout of different binaries
// hash two at a time on larger ones. Callers whose version waits for a
// slot wait no longer than their own deadline.
const maxConcurrentHashes = 2

// hashBufSize is the read size of a hash: a large read costs about the
// same system call as a small one.
const hashBufSize = 256 << 10

// hashBufs holds read buffers: at most maxConcurrentHashes are in use at
// once, and the pool lets an idle agent give them back to the heap.
var hashBufs = sync.Pool{New: func() any { b := make([]byte, hashBufSize); return &b }}

// errHashAbandoned ends a hash that every caller waiting for it has given
// up on; nobody receives it, but it keeps the partial sum out of the cache.
var errHashAbandoned = errors.New("hashing stopped: every caller waiting for it gave up")

// hashKey identifies one version of a file. ctime is in it besides mtime
// because a file's owner can set mtime back (utimes) after rewriting it, but
// any write or utimes moves ctime to now.
type hashKey struct {
	dev, ino     uint64
	size         int64
	mtime, ctime sysunix.Timespec
}

func keyOf(st *sysunix.Stat_t) hashKey {
	return hashKey{dev: st.Dev, ino: st.Ino, size: st.Size, mtime: st.Mtim, ctime: st.Ctim}
}

// hashCache maps file versions to their sha256 selector value
// ("sha256:<hex>", built once so that a hit allocates nothing), evicting
// the oldest entry when full. Concurrent misses on one file share a single
// read (singleflight), so a rollout of many replicas of one binary hashes
// it once.
//
// A caller can make the agent read any file it can execute, of any size
// when workload_size_limit is 0, and a new ctime makes a new version. So
// at most maxConcurrentHashes files are read at once, and a read that no
// caller waits for any more stops between two reads and is not cached:
// what a caller costs the agent ends with its call. singleflight alone
// would finish a read nobody waits for, and hand it to the next caller of
// that version, so the cache counts each read's waiters beside it.
type hashCache struct {
	max     int
	slots   chan struct{} // a token per running hash, maxConcurrentHashes
	flights singleflight.Group

	// For tests.
	reads    atomic.Int64 // files whose reading began
	hashed   atomic.Int64 // bytes hashed
	computes atomic.Int64 // hash goroutines alive
	running  atomic.Int64 // hashes holding a slot
	peak     atomic.Int64 // the most hashes that held a slot at once

	mu   sync.Mutex
	sums map[hashKey]string
	// order is the insertion order, a ring once full; next is its oldest
	// entry then.
	order []hashKey
	next  int
	// inflight holds a read while a caller waits for it; a read is in
	// flights under its flight key exactly while it is here.
	inflight map[hashKey]*hashCall
}

// hashCall is the waiters of one file version being hashed.
type hashCall struct {
	flight  string        // its key in flights
	stop    chan struct{} // closed when the last waiter leaves, under mu
	waiters int           // callers waiting for the result; under mu
	started atomic.Bool   // the hash holds a slot
}

func newHashCache(max int) *hashCache {
	return &hashCache{
		max:      max,
		slots:    make(chan struct{}, maxConcurrentHashes),
		sums:     make(map[hashKey]string),
		inflight: make(map[hashKey]*hashCall),
	}
}

// flightKey names a file version in flights.
func (k hashKey) flightKey() string {
	return fmt.Sprintf("%d:%d:%d:%d.%d:%d.%d", k.dev, k.ino, k.size, k.mtime.Sec, k.mtime.Nsec, k.ctime.Sec, k.ctime.Nsec)
}

// inspectExe opens the executable through /proc/<pid>/exe, which works when
// the binary was deleted or lives in another mount namespace, and returns
// its path and, unless workload_size_limit is negative, its sha256 selector
// value. The path is read from the opened file, so the two describe the
// same file even if the process execs meanwhile. The file must be the one
// the process ran when it connected: a process that connects and then
// executes a trusted binary does not get that binary's selectors.
func (a *Attestor) inspectExe(ctx context.Context, p attestor.Process, exe string) (path, sumValue string, err error) {
	pid := p.PID
	fd, err := openRetry(exe)
	if err != nil {
		return "", "", procErr(pid, "opening the executable "+exe, err)
	}
	defer sysunix.Close(fd)
	var st sysunix.Stat_t
	if err := sysunix.Fstat(fd, &st); err != nil {
		return "", "", procErr(pid, "stat of the executable "+exe, err)
	}
	if got := (attestor.FileID{Dev: st.Dev, Ino: st.Ino}); got != p.Exe {
		if p.Exe.IsZero() {
			return "", "", fmt.Errorf("pid %d: the executable it ran when it connected is unknown (the agent could not stat %s then), so its path cannot be vouched for", pid, exe)
		}
		return "", "", fmt.Errorf("%w: pid %d connected running the file at device %d inode %d but now runs device %d inode %d (it executed another program)", attestor.ErrCallerChanged, pid, p.Exe.Dev, p.Exe.Ino, st.Dev, st.Ino)
	}
	path, err = readlinkFd(fd)
	if err != nil {
		// Without our own /proc (HOST_PROC set, /proc not mounted), fall
		// back to the link itself.
		if path, err = readlink(exe); err != nil {
			return "", "", procErr(pid, "reading the executable path", err)
		}
	}
	if a.cfg.WorkloadSizeLimit < 0 {
		return path, "", nil
	}
	if limit := a.cfg.WorkloadSizeLimit; limit > 0 && st.Size > limit {
		return "", "", fmt.Errorf("pid %d: executable %s is %d bytes, over workload_size_limit of %d bytes: raise workload_size_limit, set it to 0 for no limit, or to -1 to skip the sha256 selector",
			pid, path, st.Size, limit)
	}
	sumValue, err = a.hashes.get(ctx, keyOf(&st), fd)
	if err != nil {
		return "", "", fmt.Errorf("pid %d: hashing the executable %s: %w", pid, path, err)
	}
	return path, sumValue, nil
}

// get returns the sha256 selector value of the file open as fd, whose
// version is key. fd stays the caller's; a miss hashes a duplicate of it on
// a goroutine of its own, shared with the callers that miss on the same
// version meanwhile. It is cached when complete; when the ctx of every
// caller waiting for it has ended, it stops, and the next caller starts
// afresh.
func (c *hashCache) get(ctx context.Context, key hashKey, fd int) (string, error) {
	c.mu.Lock()
	if sum, ok := c.sums[key]; ok {
		c.mu.Unlock()
		return sum, nil
	}
	call, ok := c.inflight[key]
	var compute func() (any, error)
	if !ok {
		// Duplicated now: fd is closed once this caller returns.
		dup, err := sysunix.FcntlInt(uintptr(fd), sysunix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			c.mu.Unlock()
			return "", fmt.Errorf("duplicating the file descriptor: %w", err)
		}
		call = &hashCall{flight: key.flightKey(), stop: make(chan struct{})}
		c.inflight[key] = call
		c.computes.Add(1)
		compute = func() (any, error) { return c.compute(key, dup, call) }
	}
	// Under mu, so that flights has the flight exactly while inflight has
	// the call: a joining caller's DoChan joins it, and compute (which
	// only a new call passes) runs once.
	result := c.flights.DoChan(call.flight, compute)
	call.waiters++
	c.mu.Unlock()
	select {
	case r := <-result:
		if r.Err != nil {
			return "", r.Err
		}
		return r.Val.(string), nil
	case <-ctx.Done():
	}
	c.mu.Lock()
	call.waiters--
	// compute removes a call it finished; the last waiter removes and
	// stops one still running.
	if call.waiters == 0 && c.inflight[key] == call {
		c.forgetLocked(key, call)
		close(call.stop)
	}
	c.mu.Unlock()
	if !call.started.Load() {
		return "", fmt.Errorf("waiting for a free slot (%d executables are hashed at a time, the others wait): %w", maxConcurrentHashes, ctx.Err())
	}
	return "", ctx.Err()
}

// forgetLocked removes call from inflight and its flight from flights, so
// that the next caller of key starts a new read; c.mu must be held.
func (c *hashCache) forgetLocked(key hashKey, call *hashCall) {
	delete(c.inflight, key)
	c.flights.Forget(call.flight)
}

// compute hashes the file open as fd, which it closes, caches the sum when
// complete, and returns it for the read's waiters.
func (c *hashCache) compute(key hashKey, fd int, call *hashCall) (any, error) {
	defer c.computes.Add(-1)
	sum, err := c.hash(key, fd, call)
	sysunix.Close(fd)
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.inflight[key] == call {
		c.forgetLocked(key, call)
	}
	if err != nil {
		return nil, err
	}
	c.store(key, sum)
	return sum, nil
}

// hash waits for a slot and hashes the file open as fd, whose version must
// still be key at the end.
func (c *hashCache) hash(key hashKey, fd int, call *hashCall) (string, error) {
	select {
	case c.slots <- struct{}{}:
	case <-call.stop:
		return "", errHashAbandoned
	}
	defer func() { <-c.slots }()
	call.started.Store(true)
	n := c.running.Add(1)
	defer c.running.Add(-1)
	for p := c.peak.Load(); n > p && !c.peak.CompareAndSwap(p, n); p = c.peak.Load() {
	}
	c.reads.Add(1)
	bufp := hashBufs.Get().(*[]byte)
	defer hashBufs.Put(bufp)
	sum, err := c.hashFd(fd, *bufp, call.stop)
	if err != nil {
		return "", err
	}
	// A file rewritten during the read hashes to a mix of versions.
	var st sysunix.Stat_t
	if err := sysunix.Fstat(fd, &st); err != nil {
		return "", fmt.Errorf("stat after hashing: %w", err)
	}
	if keyOf(&st) != key {
		return "", errors.New("the file changed while it was being hashed; retry")
	}
	return sum, nil
}

// store adds an entry; c.mu must be held.
func (c *hashCache) store(key hashKey, sum string) {
	if _, ok := c.sums[key]; ok {
		return
	}
	if len(c.order) < c.max {
		c.order = append(c.order, key)
	} else {
		delete(c.sums, c.order[c.next])
		c.order[c.next] = key
		c.next = (c.next + 1) % c.max
	}
	c.sums[key] = sum
}

// hashFd returns the sha256 selector value of the file open as fd, read
// through buf, or errHashAbandoned once stop is closed.
func (c *hashCache) hashFd(fd int, buf []byte, stop <-chan struct{}) (string, error) {
	h := sha256.New()
	var off int64
	for {
		select {
		case <-stop:
			return "", errHashAbandoned
		default:
		}
		n, err := sysunix.Pread(fd, buf, off)
		if errors.Is(err, sysunix.EINTR) {
			continue
		}
		if err != nil {
			return "", fmt.Errorf("reading at offset %d: %w", off, err)
		}
		if n == 0 {
			return "sha256:" + hex.EncodeToString(h.Sum(nil)), nil
		}
		h.Write(buf[:n])
		off += int64(n)
		c.hashed.Add(int64(n))
	}
}

func readlinkFd(fd int) (string, error) {
	return readlink("/proc/self/fd/" + strconv.Itoa(fd))
}

// readlink reads a procfs link with one PATH_MAX buffer: os.Readlink starts
// at 128 bytes and doubles, and procfs never returns more than PATH_MAX.
func readlink(path string) (string, error) {
	var buf [sysunix.PathMax]byte
	for {
		n, err := sysunix.Readlink(path, buf[:])
		if errors.Is(err, sysunix.EINTR) {
			continue
		}
		if err != nil {
			return "", err
		}
		if n == len(buf) {
			return "", fmt.Errorf("readlink %s: target longer than %d bytes", path, len(buf))
		}
		return string(buf[:n]), nil
	}
}
