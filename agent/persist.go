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
	"time"

	"github.com/lanyard-dev/lanyard/attestor"
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
}

type storedSVID struct {
	EntryID string   `json:"entry_id"`
	Chain   [][]byte `json:"chain"`
	Key     []byte   `json:"key"`
}

// PersistTo makes the cache save itself to dir (see RunPersist) and loads
// what an earlier run saved there. A file that cannot be used is logged with
// what was wrong, moved aside, and the cache starts empty: the upstream
// rebuilds it.
func (c *Cache) PersistTo(dir string, td spiffeid.TrustDomain) {
	c.persistPath = filepath.Join(dir, cacheFileName)
	err := c.load(td)
	if err == nil || errors.Is(err, os.ErrNotExist) {
		return
	}
	aside := c.persistPath + ".corrupt"
	c.log.Error("The saved cache cannot be used; starting empty and rebuilding it from the upstream",
		"path", c.persistPath, "moved_to", aside, "error", err)
	if rerr := os.Rename(c.persistPath, aside); rerr != nil {
		c.log.Error("Could not move the unusable cache aside", "path", c.persistPath, "error", rerr)
	}
}

func (c *Cache) load(want spiffeid.TrustDomain) error {
	data, err := ReadPrivateFile(c.persistPath)
	if err != nil {
		return err
	}
	var f cacheFile
	if err := json.Unmarshal(data, &f); err != nil {
		return fmt.Errorf("not valid JSON (%d bytes, truncated or overwritten?): %w", len(data), err)
	}
	if f.Version != cacheFileVersion {
		return fmt.Errorf("format version %d, this agent reads %d", f.Version, cacheFileVersion)
	}
	entries := make([]*Entry, 0, len(f.Entries))
	for i, se := range f.Entries {
		e, err := se.entry()
		if err != nil {
			return fmt.Errorf("entry %d (%s): %w", i, se.ID, err)
		}
		entries = append(entries, e)
	}
	td, err := spiffeid.TrustDomainFromString(f.TrustDomain)
	if err != nil {
		return fmt.Errorf("trust domain: %w", err)
	}
	if td != want {
		return fmt.Errorf("saved for trust domain %s, the agent's is %s", td, want)
	}
	if len(f.Local) == 0 {
		return errors.New("no local bundle")
	}
	local, err := spiffebundle.Parse(td, f.Local)
	if err != nil {
		return fmt.Errorf("local bundle: %w", err)
	}
	var federated []*spiffebundle.Bundle
	for name, raw := range f.Federated {
		td, err := spiffeid.TrustDomainFromString(name)
		if err != nil {
			return fmt.Errorf("federated bundle %q: %w", name, err)
		}
		b, err := spiffebundle.Parse(td, raw)
		if err != nil {
			return fmt.Errorf("federated bundle %s: %w", name, err)
		}
		federated = append(federated, b)
	}
	for _, e := range entries {
		if e.SPIFFEID.TrustDomain() != td {
			return fmt.Errorf("entry %s is in trust domain %s, the cache's is %s", e.ID, e.SPIFFEID.TrustDomain(), td)
		}
	}
	byID := make(map[string]*Entry, len(entries))
	for _, e := range entries {
		byID[e.ID] = e
	}
	now := c.now()
	svids := make(map[string]*X509SVID, len(f.SVIDs))
	expired := 0
	for i, ss := range f.SVIDs {
		e := byID[ss.EntryID]
		if e == nil {
			return fmt.Errorf("X509-SVID %d belongs to entry %s, which is not saved", i, ss.EntryID)
		}
		svid, err := ss.svid(e, now)
		if err != nil {
			return fmt.Errorf("X509-SVID %d (%s): %w", i, e.SPIFFEID, err)
		}
		if !now.Before(svid.NotAfter) {
			expired++
			continue
		}
		svids[e.ID] = svid
	}

	c.SetEntries(entries)
	c.SetBundles(local, federated)
	c.mu.Lock()
	for id, svid := range svids {
		if e := c.entries.get(id); e != nil && svid.chainsTo(c.local) {
			c.svids[id] = svid
		}
	}
	c.dirty = false
	c.mu.Unlock()
	c.log.Info("Loaded the saved cache", "path", c.persistPath, "saved_at", f.SavedAt,
		"entries", len(entries), "x509_svids", len(svids), "expired_dropped", expired)
	return nil
}

func (se storedEntry) entry() (*Entry, error) {
	id, err := spiffeid.FromString(se.SPIFFEID)
	if err != nil {
		return nil, err
	}
	e := &Entry{
		ID: se.ID, SPIFFEID: id, X509SVIDTTL: se.X509SVIDTTL, JWTSVIDTTL: se.JWTSVIDTTL,
		Hint: se.Hint, DNSNames: se.DNSNames, CreatedAt: se.CreatedAt, RevisionNumber: se.RevisionNumber,
	}
	if se.ID == "" || len(se.Selectors) == 0 {
		return nil, errors.New("no ID or no selectors")
	}
	for _, raw := range se.Selectors {
		s, err := attestor.ParseSelector(raw)
		if err != nil {
			return nil, err
		}
		e.Selectors = append(e.Selectors, s)
	}
	e.Selectors = attestor.SortSelectors(e.Selectors)
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

// RunPersist saves the cache whenever it changes, at most once per
// persistEvery, and once more when ctx ends.
func (c *Cache) RunPersist(ctx context.Context) {
	if c.persistPath == "" {
		return
	}
	ticker := time.NewTicker(persistEvery)
	defer ticker.Stop()
	for {
		select {
		case <-ctx.Done():
			c.persist()
			return
		case <-ticker.C:
			c.persist()
		}
	}
}

func (c *Cache) persist() {
	c.mu.Lock()
	if !c.dirty || c.local == nil || !c.haveEntries {
		c.mu.Unlock()
		return
	}
	c.dirty = false
	// Entries, SVIDs and bundles are immutable: take the pointers and
	// encode outside the lock.
	snap := persistSnapshot{
		savedAt:   c.now(),
		local:     c.local,
		entries:   c.entries.byID,
		svids:     make([]*X509SVID, 0, len(c.svids)),
		federated: make([]*Bundle, 0, len(c.federated)),
	}
	for _, svid := range c.svids {
		snap.svids = append(snap.svids, svid)
	}
	for _, b := range c.federated {
		snap.federated = append(snap.federated, b)
	}
	c.mu.Unlock()
	err := WriteFileAtomicFunc(c.persistPath, snap.encode)
	c.ReportSave(c.persistPath, err)
	if err != nil {
		c.persistWarn.Do(func() {
			c.log.Warn("Could not save the cache; retrying every second (this warning repeats once a minute while it fails)", "path", c.persistPath, "error", err)
		})
		c.mu.Lock()
		c.dirty = true
		c.mu.Unlock()
		return
	}
	c.persistWarn = rate.Sometimes{First: 1, Interval: saveWarnEvery}
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
