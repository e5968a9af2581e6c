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
	sysunix "golang.org/x/sys/unix"
)

// maxHashEntries bounds the executable hash cache.
const maxHashEntries = 1024

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
// read, so a rollout of many replicas of one binary hashes it once.
type hashCache struct {
	max   int
	reads atomic.Int64 // files actually read and hashed, for tests

	mu       sync.Mutex
	sums     map[hashKey]string
	order    []hashKey // insertion order, a ring once full
	next     int       // oldest entry of order once full
	inflight map[hashKey]*hashCall
}

type hashCall struct {
	done chan struct{}
	sum  string
	err  error
}

func newHashCache(max int) *hashCache {
	return &hashCache{
		max:      max,
		sums:     make(map[hashKey]string),
		inflight: make(map[hashKey]*hashCall),
	}
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
// version is key. fd stays the caller's; a miss hashes a duplicate of it in
// the background so that a caller whose ctx ends can return while the
// result is still computed and cached.
func (c *hashCache) get(ctx context.Context, key hashKey, fd int) (string, error) {
	c.mu.Lock()
	if sum, ok := c.sums[key]; ok {
		c.mu.Unlock()
		return sum, nil
	}
	call, ok := c.inflight[key]
	if !ok {
		dup, err := sysunix.FcntlInt(uintptr(fd), sysunix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			c.mu.Unlock()
			return "", fmt.Errorf("duplicating the file descriptor: %w", err)
		}
		call = &hashCall{done: make(chan struct{})}
		c.inflight[key] = call
		go c.compute(key, dup, call)
	}
	c.mu.Unlock()
	select {
	case <-call.done:
		return call.sum, call.err
	case <-ctx.Done():
		return "", ctx.Err()
	}
}

func (c *hashCache) compute(key hashKey, fd int, call *hashCall) {
	defer sysunix.Close(fd)
	c.reads.Add(1)
	call.sum, call.err = hashFd(fd)
	if call.err == nil {
		// A file rewritten during the read hashes to a mix of versions.
		var st sysunix.Stat_t
		if err := sysunix.Fstat(fd, &st); err != nil {
			call.err = err
		} else if keyOf(&st) != key {
			call.err = errors.New("the file changed while it was being hashed; retry")
		}
	}
	c.mu.Lock()
	delete(c.inflight, key)
	if call.err == nil {
		c.store(key, call.sum)
	}
	c.mu.Unlock()
	close(call.done)
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

// hashFd returns the sha256 selector value of the file open as fd.
func hashFd(fd int) (string, error) {
	h := sha256.New()
	buf := make([]byte, 256<<10)
	var off int64
	for {
		n, err := sysunix.Pread(fd, buf, off)
		if errors.Is(err, sysunix.EINTR) {
			continue
		}
		if err != nil {
			return "", err
		}
		if n == 0 {
			return "sha256:" + hex.EncodeToString(h.Sum(nil)), nil
		}
		h.Write(buf[:n])
		off += int64(n)
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
