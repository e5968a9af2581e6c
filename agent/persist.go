package agent

import (
	"context"
	"crypto"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/attestor/selector"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/time/rate"
)

// The cache is saved to the data directory so that an agent restarted while
// its upstream is unreachable serves every still-valid SVID at once. The
// file holds private keys: mode 0600, written atomically.
const (
	cacheFileName    = "cache.json"
	cacheFileVersion = 1
	// persistEvery bounds how often the file is rewritten: a burst of
	// changes (a rotation of thousands of SVIDs) costs one write.
	persistEvery = time.Second
)

type cacheFile struct {
	Version     int               `json:"version"`
	SavedAt     time.Time         `json:"saved_at"`
	TrustDomain string            `json:"trust_domain"`
	Entries     []storedEntry     `json:"entries"`
	Local       json.RawMessage   `json:"local_bundle"`
	Federated   map[string][]byte `json:"federated_bundles,omitempty"`
	SVIDs       []storedSVID      `json:"x509_svids"`
}

type storedEntry struct {
	ID             string        `json:"id"`
	SPIFFEID       string        `json:"spiffe_id"`
	Selectors      []string      `json:"selectors"`
	X509SVIDTTL    time.Duration `json:"x509_svid_ttl,omitempty"`
	JWTSVIDTTL     time.Duration `json:"jwt_svid_ttl,omitempty"`
	Hint           string        `json:"hint,omitempty"`
	DNSNames       []string      `json:"dns_names,omitempty"`
	FederatesWith  []string      `json:"federates_with,omitempty"`
	CreatedAt      int64         `json:"created_at"`
	RevisionNumber int64         `json:"revision_number"`
	Admin          bool          `json:"admin,omitempty"`
	Downstream     bool          `json:"downstream,omitempty"`
	// FlagsKnown is set by agents that save Admin and Downstream. An entry
	// saved before them may be either: it is loaded as admin, withheld from
	// delegates and brokers until the next sync says what it is.
	FlagsKnown bool `json:"flags_known,omitempty"`
}

type storedSVID struct {
	EntryID string   `json:"entry_id"`
	Chain   [][]byte `json:"chain"`
	Key     []byte   `json:"key"`
}

// Persister saves the store to the data directory whenever it changes (see
// Run) and loads what an earlier run saved there.
type Persister struct {
	log    hclog.Logger
	now    func() time.Time
	store  *entryStore
	report func(path string, err error) // the health source
	path   string                       // empty: not persisted

	saved atomic.Uint64 // the store's gen when last saved
	warn  rate.Sometimes
}

func newPersister(log hclog.Logger, now func() time.Time, store *entryStore, report func(string, error)) *Persister {
	return &Persister{log: log, now: now, store: store, report: report, warn: rate.Sometimes{First: 1, Interval: saveWarnEvery}}
}

// Name names the service.
func (p *Persister) Name() string { return "cache-persister" }

// loadFrom makes the persister save to dir and loads what an earlier run
// saved there, returning the entries whose SVIDs it loaded. A file that
// cannot be used is logged with what was wrong, moved aside, and the store
// starts empty: the upstream rebuilds it.
func (p *Persister) loadFrom(dir string, td spiffeid.TrustDomain) []string {
	p.path = filepath.Join(dir, cacheFileName)
	loaded, err := p.load(td)
	if err == nil || errors.Is(err, os.ErrNotExist) {
		return loaded
	}
	aside := p.path + ".corrupt"
	p.log.Error("The saved cache cannot be used; starting empty and rebuilding it from the upstream",
		"path", p.path, "moved_to", aside, "error", err)
	if rerr := os.Rename(p.path, aside); rerr != nil {
		p.log.Error("Could not move the unusable cache aside", "path", p.path, "error", rerr)
	}
	return nil
}

func (p *Persister) load(want spiffeid.TrustDomain) ([]string, error) {
	data, err := ReadPrivateFile(p.path)
	if err != nil {
		return nil, err
	}
	var f cacheFile
	if err := json.Unmarshal(data, &f); err != nil {
		return nil, fmt.Errorf("not valid JSON (%d bytes, truncated or overwritten?): %w", len(data), err)
	}
	if f.Version != cacheFileVersion {
		return nil, fmt.Errorf("format version %d, this agent reads %d", f.Version, cacheFileVersion)
	}
	entries := make([]*Entry, 0, len(f.Entries))
	for i, se := range f.Entries {
		e, err := se.entry()
		if err != nil {
			return nil, fmt.Errorf("entry %d (%s): %w", i, se.ID, err)
		}
		entries = append(entries, e)
	}
	td, err := spiffeid.TrustDomainFromString(f.TrustDomain)
	if err != nil {
		return nil, fmt.Errorf("trust domain: %w", err)
	}
	if td != want {
		return nil, fmt.Errorf("saved for trust domain %s, the agent's is %s", td, want)
	}
	if len(f.Local) == 0 {
		return nil, errors.New("no local bundle")
	}
	local, err := spiffebundle.Parse(td, f.Local)
	if err != nil {
		return nil, fmt.Errorf("local bundle: %w", err)
	}
	var federated []*spiffebundle.Bundle
	for name, raw := range f.Federated {
		td, err := spiffeid.TrustDomainFromString(name)
		if err != nil {
			return nil, fmt.Errorf("federated bundle %q: %w", name, err)
		}
		b, err := spiffebundle.Parse(td, raw)
		if err != nil {
			return nil, fmt.Errorf("federated bundle %s: %w", name, err)
		}
		federated = append(federated, b)
	}
	for _, e := range entries {
		if e.SPIFFEID.TrustDomain() != td {
			return nil, fmt.Errorf("entry %s is in trust domain %s, the cache's is %s", e.ID, e.SPIFFEID.TrustDomain(), td)
		}
	}
	byID := make(map[string]*Entry, len(entries))
	for _, e := range entries {
		byID[e.ID] = e
	}
	now := p.now()
	var svids []*X509SVID
	var owners []*Entry
	expired := 0
	for i, ss := range f.SVIDs {
		e := byID[ss.EntryID]
		if e == nil {
			return nil, fmt.Errorf("X509-SVID %d belongs to entry %s, which is not saved", i, ss.EntryID)
		}
		svid, err := ss.svid(e, now)
		if err != nil {
			return nil, fmt.Errorf("X509-SVID %d (%s): %w", i, e.SPIFFEID, err)
		}
		if !now.Before(svid.NotAfter) {
			expired++
			continue
		}
		svids, owners = append(svids, svid), append(owners, e)
	}

	p.store.setEntries(entries)
	p.store.setBundles(local, federated)
	loaded := p.store.putLoaded(owners, svids)
	p.saved.Store(p.store.gen.Load())
	p.log.Info("Loaded the saved cache", "path", p.path, "saved_at", f.SavedAt,
		"entries", len(entries), "x509_svids", len(svids), "expired_dropped", expired)
	return loaded, nil
}

func (se storedEntry) entry() (*Entry, error) {
	id, err := spiffeid.FromString(se.SPIFFEID)
	if err != nil {
		return nil, err
	}
	e := &Entry{
		ID: se.ID, SPIFFEID: id, X509SVIDTTL: se.X509SVIDTTL, JWTSVIDTTL: se.JWTSVIDTTL,
		Hint: se.Hint, DNSNames: se.DNSNames, CreatedAt: se.CreatedAt, RevisionNumber: se.RevisionNumber,
		Admin: se.Admin || !se.FlagsKnown, Downstream: se.Downstream,
	}
	if se.ID == "" || len(se.Selectors) == 0 {
		return nil, errors.New("no ID or no selectors")
	}
	for _, raw := range se.Selectors {
		s, err := selector.Parse(raw)
		if err != nil {
			return nil, err
		}
		e.Selectors = append(e.Selectors, s)
	}
	e.Selectors = selector.Sort(e.Selectors)
	for _, raw := range se.FederatesWith {
		td, err := spiffeid.TrustDomainFromString(raw)
		if err != nil {
			return nil, err
		}
		e.FederatesWith = append(e.FederatesWith, td)
	}
	return e, nil
}

func storeEntry(e *Entry) storedEntry {
	se := storedEntry{
		ID: e.ID, SPIFFEID: e.SPIFFEID.String(), X509SVIDTTL: e.X509SVIDTTL, JWTSVIDTTL: e.JWTSVIDTTL,
		Hint: e.Hint, DNSNames: e.DNSNames, CreatedAt: e.CreatedAt, RevisionNumber: e.RevisionNumber,
		Admin: e.Admin, Downstream: e.Downstream, FlagsKnown: true,
	}
	for _, s := range e.Selectors {
		se.Selectors = append(se.Selectors, s.String())
	}
	for _, td := range e.FederatesWith {
		se.FederatesWith = append(se.FederatesWith, td.Name())
	}
	return se
}

func (ss storedSVID) svid(e *Entry, now time.Time) (*X509SVID, error) {
	if len(ss.Chain) == 0 {
		return nil, errors.New("empty chain")
	}
	chain := make([]*x509.Certificate, len(ss.Chain))
	for i, der := range ss.Chain {
		cert, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, err
		}
		chain[i] = cert
	}
	key, err := x509.ParsePKCS8PrivateKey(ss.Key)
	if err != nil {
		return nil, fmt.Errorf("key: %w", err)
	}
	signer, ok := key.(crypto.Signer)
	if !ok || !publicKeyMatches(signer.Public(), chain[0].PublicKey) {
		return nil, errors.New("the key does not belong to the certificate")
	}
	return newX509SVIDFromKey(e, signer, ss.Key, chain, now)
}

func publicKeyMatches(a, b crypto.PublicKey) bool {
	k, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && k.Equal(b)
}

// Run saves the store whenever it changes, at most once per persistEvery,
// and once more when ctx ends. Without a data directory it only waits.
func (p *Persister) Run(ctx context.Context) error {
	if p.path == "" {
		<-ctx.Done()
		return nil
	}
	ticker := time.NewTicker(persistEvery)
	defer ticker.Stop()
	for {
		select {
		case <-ctx.Done():
			p.persist()
			return nil
		case <-ticker.C:
			p.persist()
		}
	}
}

func (p *Persister) persist() {
	snap, gen, ok := p.store.persistSnapshot(p.now(), p.saved.Load())
	if !ok {
		return
	}
	err := WriteFileAtomicFunc(p.path, snap.encode)
	p.report(p.path, err)
	if err != nil {
		p.warn.Do(func() {
			p.log.Warn("Could not save the cache; retrying every second (this warning repeats once a minute while it fails)", "path", p.path, "error", err)
		})
		return
	}
	p.saved.Store(gen)
	p.warn = rate.Sometimes{First: 1, Interval: saveWarnEvery}
}

// persistSnapshot returns what to save and the gen it shows, or false when
// nothing changed since gen saved or there is nothing to save yet.
// Entries, SVIDs and bundles are immutable: it takes the pointers, and the
// file is encoded outside the lock.
func (s *entryStore) persistSnapshot(now time.Time, saved uint64) (*persistSnapshot, uint64, bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	gen := s.gen.Load()
	if gen == saved || s.local == nil || !s.haveEntries {
		return nil, 0, false
	}
	snap := &persistSnapshot{
		savedAt:   now,
		local:     s.local,
		entries:   s.entries.byID,
		svids:     make([]*X509SVID, 0, len(s.svids)),
		federated: make([]*Bundle, 0, len(s.federated)),
	}
	for _, svid := range s.svids {
		snap.svids = append(snap.svids, svid)
	}
	for _, b := range s.federated {
		snap.federated = append(snap.federated, b)
	}
	return snap, gen, true
}

// putLoaded stores SVIDs read from the saved cache, those whose entry is
// held and that chain to the local bundle, and returns their entries.
func (s *entryStore) putLoaded(entries []*Entry, svids []*X509SVID) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var ids []string
	for i, svid := range svids {
		if e := s.entries.get(entries[i].ID); e != nil && svid.chainsTo(s.local) {
			s.svids[e.ID] = svid
			ids = append(ids, e.ID)
		}
	}
	s.changedLocked()
	return ids
}

// saveWarnEvery spaces the warnings while a file cannot be saved (a full
// disk): once a second would bury every other line of the log.
const saveWarnEvery = time.Minute

type persistSnapshot struct {
	savedAt   time.Time
	local     *Bundle
	federated []*Bundle
	entries   []*Entry
	svids     []*X509SVID
}

// encode writes the snapshot as a cacheFile, one entry and one SVID at a
// time: with tens of thousands of entries, marshalling the whole file at
// once would hold megabytes of garbage on the heap.
func (p *persistSnapshot) encode(w io.Writer) error {
	local, err := p.local.Marshal()
	if err != nil {
		return err
	}
	federated := make(map[string][]byte, len(p.federated))
	for _, b := range p.federated {
		raw, err := b.Marshal()
		if err != nil {
			return err
		}
		federated[b.TrustDomain().Name()] = raw
	}
	enc := json.NewEncoder(w)
	var werr error
	put := func(s string) {
		if werr == nil {
			_, werr = io.WriteString(w, s)
		}
	}
	value := func(v any) {
		if werr == nil {
			werr = enc.Encode(v)
		}
	}
	put(`{"version":`)
	value(cacheFileVersion)
	put(`,"saved_at":`)
	value(p.savedAt)
	put(`,"trust_domain":`)
	value(p.local.TrustDomain().Name())
	put(`,"local_bundle":`)
	value(json.RawMessage(local))
	put(`,"federated_bundles":`)
	value(federated)
	put(`,"entries":[`)
	for i, e := range p.entries {
		if i > 0 {
			put(",")
		}
		value(storeEntry(e))
	}
	put(`],"x509_svids":[`)
	for i, svid := range p.svids {
		if i > 0 {
			put(",")
		}
		ss := storedSVID{EntryID: svid.EntryID, Key: svid.KeyDER, Chain: make([][]byte, len(svid.Chain))}
		for j, cert := range svid.Chain {
			ss.Chain[j] = cert.Raw
		}
		value(ss)
	}
	put("]}\n")
	return werr
}

// SavedBundle returns the local trust bundle that the cache saved in dir,
// or nil when there is none: what workloads were last handed, for an
// upstream that must say what changed since.
func SavedBundle(dir string, td spiffeid.TrustDomain) (*spiffebundle.Bundle, error) {
	data, err := ReadPrivateFile(filepath.Join(dir, cacheFileName))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var f struct {
		Local json.RawMessage `json:"local_bundle"`
	}
	if err := json.Unmarshal(data, &f); err != nil {
		return nil, err
	}
	if len(f.Local) == 0 {
		return nil, nil
	}
	return spiffebundle.Parse(td, f.Local)
}
