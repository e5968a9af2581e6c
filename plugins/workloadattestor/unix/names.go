package unix

import (
	"errors"
	"os/user"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

const (
	// nameTTL bounds how stale a uid or gid name may be: os/user reads
	// /etc/passwd or /etc/group (or asks NSS) on every call, too slow for
	// every Workload API call, and accounts change rarely.
	nameTTL = 30 * time.Second
	// maxNameEntries bounds each name cache.
	maxNameEntries = 1024
)

// idEntry holds the ready-made selector values of one uid or gid, so that
// a cache hit allocates nothing. A name value is "" when the id has no name.
type idEntry struct {
	id, name         string // uid:N and user:NAME, or gid:N and group:NAME
	suppID, suppName string // supplementary_gid:N and supplementary_group:NAME (gids only)
	expires          time.Time
}

// lookupFunc resolves an id to its name. cacheable is false on errors that
// may be transient (an NSS backend failing), so they are retried next time.
type lookupFunc func(id uint32) (e idEntry, cacheable bool)

// idCache caches id -> name lookups for nameTTL, at most maxNameEntries.
type idCache struct {
	lookup  lookupFunc
	now     func() time.Time
	lookups atomic.Int64 // calls of lookup, for tests

	mu sync.Mutex
	m  map[uint32]idEntry
}

func newIDCache(lookup lookupFunc) *idCache {
	return &idCache{lookup: lookup, now: time.Now, m: make(map[uint32]idEntry)}
}

func (c *idCache) get(id uint32) idEntry {
	now := c.now()
	c.mu.Lock()
	e, ok := c.m[id]
	c.mu.Unlock()
	if ok && now.Before(e.expires) {
		return e
	}
	// Look up without the lock: a slow NSS lookup must not stall others.
	c.lookups.Add(1)
	e, cacheable := c.lookup(id)
	if !cacheable {
		return e
	}
	e.expires = now.Add(nameTTL)
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, present := c.m[id]; !present && len(c.m) >= maxNameEntries {
		for k, v := range c.m {
			if !now.Before(v.expires) {
				delete(c.m, k)
			}
		}
		// All live: drop an arbitrary one; a miss only costs a lookup.
		for k := range c.m {
			if len(c.m) < maxNameEntries {
				break
			}
			delete(c.m, k)
		}
	}
	c.m[id] = e
	return e
}

func lookupUser(uid uint32) (idEntry, bool) {
	s := strconv.FormatUint(uint64(uid), 10)
	e := idEntry{id: "uid:" + s}
	u, err := user.LookupId(s)
	if err != nil {
		// An unknown uid is a definite answer; anything else may pass.
		var unknown user.UnknownUserIdError
		return e, errors.As(err, &unknown)
	}
	e.name = "user:" + u.Username
	return e, true
}

func lookupGroup(gid uint32) (idEntry, bool) {
	s := strconv.FormatUint(uint64(gid), 10)
	e := idEntry{id: "gid:" + s, suppID: "supplementary_gid:" + s}
	g, err := user.LookupGroupId(s)
	if err != nil {
		var unknown user.UnknownGroupIdError
		return e, errors.As(err, &unknown)
	}
	e.name = "group:" + g.Name
	e.suppName = "supplementary_group:" + g.Name
	return e, true
}
