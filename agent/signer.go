package agent

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"fmt"
	"math/big"
	"slices"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
)

const (
	// maxBatch is the most SVIDs signed in one upstream call (SPIRE's limit
	// for BatchNewX509SVID).
	maxBatch = 500
	// mintTimeout bounds one upstream signing call. Minting runs detached
	// from the caller that asked, so that one client hanging up does not
	// fail the others waiting on the same SVID; it ends sooner when the
	// agent stops (Rotator.detach).
	mintTimeout = 30 * time.Second
)

// signer has the upstream sign X509-SVIDs, in batches, and shares a signing
// in flight with every caller that needs the same entry.
//
// It keeps its own claim table rather than golang.org/x/sync/singleflight:
// singleflight runs one function per key, so the 500 entries of a rotation
// or of a caller with many identities would be 500 upstream calls instead
// of one BatchNewX509SVID; here a caller claims every entry it needs that
// no one is signing, signs those in one batch, and waits on the others'.
type signer struct {
	log      hclog.Logger
	upstream Upstream
	now      func() time.Time
	newKey   func() (*ecdsa.PrivateKey, error) // an SVID's key
	// report is told how each upstream call went (the health source).
	report func(error)
	// deliver stores what a batch signed (nil where it failed) before the
	// calls complete, so that a waiter finds it stored.
	deliver func(calls []*mintCall, svids []*X509SVID)
	// completed is told of the calls once they are no longer in flight.
	completed func(calls []*mintCall)

	mu       sync.Mutex
	inflight map[string]*mintCall
}

type mintCall struct {
	entry *Entry
	done  chan struct{}
	err   error
	// byRotator marks the rotator's own renewals, whose outcome its loop
	// sees without being woken.
	byRotator bool
}

func newSigner(log hclog.Logger, upstream Upstream, now func() time.Time, report func(error)) *signer {
	return &signer{
		log:      log,
		upstream: upstream,
		now:      now,
		newKey:   func() (*ecdsa.PrivateKey, error) { return ecdsa.GenerateKey(elliptic.P256(), rand.Reader) },
		report:   report,
		inflight: map[string]*mintCall{},
	}
}

// claim returns, for each entry, the signing in flight for it (theirs) or a
// new one the caller must do (mine). An entry for which needed, when set,
// reports false is left out: another signing completed since the caller
// looked. Asked under the lock, after which a completed signing's SVID is
// stored (see mintBatch), so that an entry is never signed twice.
func (s *signer) claim(entries []*Entry, needed func(*Entry) bool) (mine, theirs []*mintCall) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, e := range entries {
		if call := s.inflight[e.ID]; call != nil {
			theirs = append(theirs, call)
			continue
		}
		if needed != nil && !needed(e) {
			continue
		}
		call := &mintCall{entry: e, done: make(chan struct{})}
		s.inflight[e.ID] = call
		mine = append(mine, call)
	}
	return mine, theirs
}

// signing reports whether a signing for the entry is in flight.
func (s *signer) signing(entryID string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.inflight[entryID] != nil
}

// inFlight counts the signings in flight.
func (s *signer) inFlight() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.inflight)
}

// wait waits for calls and returns the first error, or ctx's.
func wait(ctx context.Context, calls []*mintCall) error {
	for _, call := range calls {
		select {
		case <-call.done:
			if call.err != nil {
				return call.err
			}
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

// mintBatch signs the calls' SVIDs in batches and completes the calls.
func (s *signer) mintBatch(ctx context.Context, calls []*mintCall) {
	for chunk := range slices.Chunk(calls, maxBatch) {
		svids, errs := s.sign(ctx, chunk)
		for i, call := range chunk {
			call.err = errs[i]
		}
		s.deliver(chunk, svids)
		s.mu.Lock()
		for _, call := range chunk {
			if s.inflight[call.entry.ID] == call {
				delete(s.inflight, call.entry.ID)
			}
			close(call.done)
		}
		s.mu.Unlock()
		s.completed(chunk)
	}
}

// sign generates keys and has the upstream sign them.
func (s *signer) sign(ctx context.Context, calls []*mintCall) ([]*X509SVID, []error) {
	svids := make([]*X509SVID, len(calls))
	errs := make([]error, len(calls))
	// Only calls with a key are sent: a request without one would reach
	// the upstream with a nil key.
	reqs := make([]X509Request, 0, len(calls))
	sent := make([]int, 0, len(calls)) // the call of each request
	for i, call := range calls {
		key, err := s.newKey()
		if err != nil {
			errs[i] = fmt.Errorf("generating a key for %s: %w", call.entry.SPIFFEID, err)
			continue
		}
		reqs = append(reqs, X509Request{Entry: call.entry, Key: key})
		sent = append(sent, i)
	}
	if len(reqs) > 0 {
		results, err := s.upstream.MintX509SVIDs(ctx, reqs)
		if err == nil && len(results) != len(reqs) {
			err = fmt.Errorf("the upstream answered %d of %d signing requests", len(results), len(reqs))
		}
		s.report(err)
		for r, i := range sent {
			switch {
			case err != nil:
				errs[i] = err
			case results[r].Err != nil:
				errs[i] = results[r].Err
			default:
				svids[i], errs[i] = newX509SVID(calls[i].entry, reqs[r].Key.(*ecdsa.PrivateKey), results[r].Chain, s.now())
			}
		}
	}
	for i, call := range calls {
		if errs[i] != nil {
			s.log.Warn("Could not sign an X509-SVID", "spiffe_id", call.entry.SPIFFEID, "entry_id", call.entry.ID, "error", errs[i])
		}
	}
	return svids, errs
}

func newX509SVID(e *Entry, key *ecdsa.PrivateKey, chain []*x509.Certificate, now time.Time) (*X509SVID, error) {
	if len(chain) == 0 {
		return nil, fmt.Errorf("the upstream returned an empty chain for %s", e.SPIFFEID)
	}
	leaf := chain[0]
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != e.SPIFFEID.String() {
		return nil, fmt.Errorf("the upstream signed an SVID for %v, not %s", leaf.URIs, e.SPIFFEID)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("encoding the key of %s: %w", e.SPIFFEID, err)
	}
	return newX509SVIDFromKey(e, key, keyDER, chain, now)
}

func newX509SVIDFromKey(e *Entry, key crypto.Signer, keyDER []byte, chain []*x509.Certificate, now time.Time) (*X509SVID, error) {
	leaf := chain[0]
	var chainDER []byte
	for _, cert := range chain {
		chainDER = append(chainDER, cert.Raw...)
	}
	return &X509SVID{
		EntryID:   e.ID,
		ID:        e.SPIFFEID,
		Chain:     chain,
		Key:       key,
		ChainDER:  chainDER,
		KeyDER:    keyDER,
		NotBefore: leaf.NotBefore,
		NotAfter:  leaf.NotAfter,
		RenewAt:   renewAt(now, leaf.NotAfter),
	}, nil
}

// minRenewInterval keeps a certificate whose life is nearly over (capped by
// an expiring CA) from being renewed in a tight loop.
const minRenewInterval = 500 * time.Millisecond

// renewAt is half of the remaining lifetime with +-10% jitter of the half,
// as SPIRE does, so SVIDs minted together are not renewed together. It
// counts from the time of minting, not from NotBefore, which signers
// backdate to allow for clock skew.
func renewAt(now, notAfter time.Time) time.Time {
	half := notAfter.Sub(now) / 2
	jitter := time.Duration(0)
	if span := int64(half / 5); span > 0 {
		n, err := rand.Int(rand.Reader, big.NewInt(span))
		if err == nil {
			jitter = time.Duration(n.Int64()) - half/10
		}
	}
	return now.Add(max(half+jitter, minRenewInterval))
}
