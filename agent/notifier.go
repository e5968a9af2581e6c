package agent

import (
	"slices"
	"sync"
	"sync/atomic"
)

// notifier tells subscribers that the store changed. It has its own lock,
// taken after the store's is released, so that a woken stream never waits
// for the writer that woke it.
type notifier struct {
	mu   sync.Mutex
	subs map[*Subscription]struct{}
}

// Subscription is told, through C, whenever the cache changes in a way that
// may concern it. C holds at most one pending signal: a slow reader sees one
// wake-up for many changes.
type Subscription struct {
	C        chan struct{}
	notifier *notifier
	// entries are the entry IDs the subscriber's last answer was built
	// from; a new SVID for any other entry does not wake it. Nil means
	// every change wakes it.
	entries atomic.Pointer[[]string]
}

// WatchEntries narrows the SVID changes that wake the subscriber to those of
// the given entries. Entry and bundle changes always wake it.
func (s *Subscription) WatchEntries(ids []string) {
	s.entries.Store(&ids)
}

func (n *notifier) subscribe() *Subscription {
	s := &Subscription{C: make(chan struct{}, 1), notifier: n}
	n.mu.Lock()
	if n.subs == nil {
		n.subs = map[*Subscription]struct{}{}
	}
	n.subs[s] = struct{}{}
	n.mu.Unlock()
	return s
}

// Close ends the subscription.
func (s *Subscription) Close() {
	s.notifier.mu.Lock()
	delete(s.notifier.subs, s)
	s.notifier.mu.Unlock()
}

// all wakes every subscriber.
func (n *notifier) all() {
	n.mu.Lock()
	defer n.mu.Unlock()
	for s := range n.subs {
		s.signal()
	}
}

// entries wakes the subscribers that hold any of the entries.
func (n *notifier) entries(ids []string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	for s := range n.subs {
		watched := s.entries.Load()
		if watched == nil || slices.ContainsFunc(*watched, func(id string) bool { return slices.Contains(ids, id) }) {
			s.signal()
		}
	}
}

func (s *Subscription) signal() {
	select {
	case s.C <- struct{}{}:
	default:
	}
}
