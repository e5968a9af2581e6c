package k8s

import (
	"sync"
	"time"
)

// The Broker endpoint checks a streamed pod again every few seconds, so
// the same pod is asked about over and over: these caches keep that off
// the API server.
const (
	// reviewTTL is how long an allowed review stands. A grant revoked
	// takes effect within it (the API server's webhook authorizer caches
	// allowed answers for 5 minutes by default). Denials are not kept: a
	// grant added takes effect at once.
	reviewTTL = 30 * time.Second
	// maxCached bounds each cache; a full cache is swept, then emptied.
	maxCached = 4096
)

type reviewKey struct{ user, namespace, name string }

// reviewCache remembers allowed SubjectAccessReviews until they expire.
type reviewCache struct {
	mu      sync.Mutex
	allowed map[reviewKey]time.Time // expiry
}

func (c *reviewCache) has(k reviewKey, now time.Time) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	exp, ok := c.allowed[k]
	return ok && now.Before(exp)
}

func (c *reviewCache) remember(k reviewKey, now time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.allowed == nil {
		c.allowed = make(map[reviewKey]time.Time)
	}
	if len(c.allowed) >= maxCached {
		for k, exp := range c.allowed {
			if !now.Before(exp) {
				delete(c.allowed, k)
			}
		}
		if len(c.allowed) >= maxCached {
			clear(c.allowed)
		}
	}
	c.allowed[k] = now.Add(reviewTTL)
}

// podNames remembers where the API server had a pod of a UID. A pod's UID
// is never reused and its namespace and name never change, so once the
// GET by that name answers another UID or none, that pod is gone: no
// cluster-wide list is needed to say NotFound.
type podNames struct {
	mu    sync.Mutex
	byUID map[string][2]string
}

func (c *podNames) get(uid string) (namespace, name string, ok bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	n, ok := c.byUID[uid]
	return n[0], n[1], ok
}

func (c *podNames) put(uid, namespace, name string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.byUID == nil || len(c.byUID) >= maxCached {
		c.byUID = make(map[string][2]string)
	}
	c.byUID[uid] = [2]string{namespace, name}
}
