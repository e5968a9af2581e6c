package fakeagent

import (
	"crypto/x509"
	"sync"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/agent"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
)

// Sink records every call an upstream makes, for tests of an upstream.
type Sink struct {
	mu          sync.Mutex
	entries     [][]*agent.Entry
	local       []*spiffebundle.Bundle
	federated   [][]*spiffebundle.Bundle
	x509Taints  [][]*x509.Certificate
	jwtTaints   [][]string
	upstreamErr []error
	saveErrs    map[string]error
	changed     chan struct{}
}

var _ agent.Sink = (*Sink)(nil)

// NewSink is an empty Sink.
func NewSink() *Sink {
	return &Sink{saveErrs: map[string]error{}, changed: make(chan struct{}, 1)}
}

func (s *Sink) SetEntries(entries []*agent.Entry) {
	s.record(func() { s.entries = append(s.entries, entries) })
}

func (s *Sink) SetBundles(local *spiffebundle.Bundle, federated []*spiffebundle.Bundle) {
	s.record(func() {
		s.local = append(s.local, local)
		s.federated = append(s.federated, federated)
	})
}

func (s *Sink) TaintX509Authorities(authorities []*x509.Certificate) {
	s.record(func() { s.x509Taints = append(s.x509Taints, authorities) })
}

func (s *Sink) TaintJWTAuthorities(keyIDs []string) {
	s.record(func() { s.jwtTaints = append(s.jwtTaints, keyIDs) })
}

func (s *Sink) ReportUpstream(err error) {
	s.record(func() { s.upstreamErr = append(s.upstreamErr, err) })
}

func (s *Sink) ReportSave(path string, err error) {
	s.record(func() { s.saveErrs[path] = err })
}

// record changes the state under the lock and wakes WaitFor.
func (s *Sink) record(change func()) {
	s.mu.Lock()
	change()
	s.mu.Unlock()
	select {
	case s.changed <- struct{}{}:
	default:
	}
}

// Entries is the last set of entries handed over, nil before the first.
func (s *Sink) Entries() []*agent.Entry {
	s.mu.Lock()
	defer s.mu.Unlock()
	return last(s.entries)
}

// EntriesByID is the last set of entries, keyed by entry ID.
func (s *Sink) EntriesByID() map[string]*agent.Entry {
	byID := map[string]*agent.Entry{}
	for _, e := range s.Entries() {
		byID[e.ID] = e
	}
	return byID
}

// EntrySets is how many times entries were handed over.
func (s *Sink) EntrySets() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.entries)
}

// LocalBundle and FederatedBundles are the bundles last handed over.
func (s *Sink) LocalBundle() *spiffebundle.Bundle {
	s.mu.Lock()
	defer s.mu.Unlock()
	return last(s.local)
}

func (s *Sink) FederatedBundles() []*spiffebundle.Bundle {
	s.mu.Lock()
	defer s.mu.Unlock()
	return last(s.federated)
}

// X509Taints and JWTTaints are every taint call's argument, in order.
func (s *Sink) X509Taints() [][]*x509.Certificate {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([][]*x509.Certificate(nil), s.x509Taints...)
}

func (s *Sink) JWTTaints() [][]string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([][]string(nil), s.jwtTaints...)
}

// UpstreamErr is the last ReportUpstream argument.
func (s *Sink) UpstreamErr() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return last(s.upstreamErr)
}

// SaveErr is the last ReportSave outcome for path.
func (s *Sink) SaveErr(path string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.saveErrs[path]
}

// WaitFor waits until cond holds, checking after every call the sink gets,
// and fails the test after bound. cond runs without the sink's lock, so it
// may call the accessors.
func (s *Sink) WaitFor(t testing.TB, bound time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.After(bound)
	for !cond() {
		select {
		case <-s.changed:
		case <-deadline:
			t.Fatalf("timed out after %s waiting for %s", bound, what)
		}
	}
}

func last[T any](s []T) T {
	var zero T
	if len(s) == 0 {
		return zero
	}
	return s[len(s)-1]
}
