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
	// gen is the store's change counter (nil in tests of the notifier
	// alone): Watch reads it.
	gen *atomic.Uint64
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

// Watch narrows the SVID changes that wake the subscriber to those of the
// entries of snap, its last answer. Entry and bundle changes always wake
// it. Call it once snap is sent.
//
// A new SVID stored since snap was built (while it was sent) was checked
// against the entries watched until now, which may lack one snap added:
// the subscriber is woken now if the store changed since snap, and looks
// again (an extra look at worst, once per send). Watching snap's entries
// before it was built cannot work: they are known only from it; watching
// every change until Watch would wake the stream for every SVID signed
// anywhere while it sends.
func (s *Subscription) Watch(snap *X509Snapshot) {
	s.watchEntries(snap.EntryIDs())
	// After the store above: a change that read the entries watched before
	// counted gen before it did (entryStore.put), so it shows here.
	if s.notifier.gen != nil && s.notifier.gen.Load() != snap.gen {
		s.signal()
	}
}

func (s *Subscription) watchEntries(ids []string) {
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
