package agent

import (
	"cmp"
	"hash/maphash"
	"iter"
	"slices"
	"strings"

	"github.com/lanyard-dev/lanyard/attestor/selector"
)

// entrySet is the cache's registration entries, kept in two sorted slices
// rather than maps: one by entry ID, one by selector hash. A node may hold
// tens of thousands of entries; as maps (ID to entry, selector to entries)
// they cost ~150 B an entry, and about twice that in resident memory once
// the garbage collector's headroom is counted. The slices cost 8 B an entry
// plus ~24 B a selector, and a lookup reads one hash bucket. An entrySet is
// immutable: a change builds a new one.
type entrySet struct {
	byID  []*Entry      // sorted by ID; IDs are unique
	bySel []selectorRef // sorted by hash
	// buckets[b] is the first of bySel whose hash has b in its top bits;
	// a lookup reads one bucket instead of binary-searching bySel.
	buckets []uint32
	shift   uint // 64 - log2(len(buckets)-1)
}

// selectorRef says that byID[entry].Selectors[sel] hashes to hash. Hashes
// may collide, so a lookup compares that selector. Indexes rather than a
// pointer keep the slice free of pointers for the collector to scan.
type selectorRef struct {
	hash  uint64
	entry uint32
	sel   uint32
}

var selectorSeed = maphash.MakeSeed()

func selectorHash(s selector.Selector) uint64 {
	// Collisions are harmless (lookups compare the selector itself), so a
	// plain combination of the two parts' hashes will do.
	return maphash.String(selectorSeed, s.Type)*0x9E3779B97F4A7C15 ^ maphash.String(selectorSeed, s.Value)
}

// sortEntries returns entries sorted by ID, without duplicate IDs (the
// last one given wins), and with every entry equal to one in prev replaced
// by prev's, so that what was minted for it stays attached. It reports
// whether the result differs from prev.
func sortEntries(entries []*Entry, prev []*Entry) ([]*Entry, bool) {
	sorted := slices.Clone(entries)
	slices.SortStableFunc(sorted, func(a, b *Entry) int { return strings.Compare(a.ID, b.ID) })
	out := sorted[:0]
	for i, e := range sorted {
		if i+1 < len(sorted) && sorted[i+1].ID == e.ID {
			continue
		}
		out = append(out, e)
	}
	clear(sorted[len(out):])
	changed := len(out) != len(prev)
	for i, e := range out {
		if old := entryByID(prev, e.ID); old != nil && old.equal(e) {
			out[i] = old
		} else {
			changed = true
		}
	}
	return slices.Clip(out), changed
}

// newEntrySet indexes entries, which sortEntries returned.
func newEntrySet(entries []*Entry) entrySet {
	n := 0
	for _, e := range entries {
		n += len(e.Selectors)
	}
	refs := make([]selectorRef, 0, n)
	for i, e := range entries {
		for j, s := range e.Selectors {
			refs = append(refs, selectorRef{hash: selectorHash(s), entry: uint32(i), sel: uint32(j)})
		}
	}
	return indexRefs(entries, refs)
}

// indexRefs sorts refs and lays out the hash buckets over them.
func indexRefs(entries []*Entry, refs []selectorRef) entrySet {
	slices.SortFunc(refs, func(a, b selectorRef) int { return cmp.Compare(a.hash, b.hash) })
	// About one selector per bucket: a power of two at least len(refs).
	bits := uint(0)
	for 1<<bits < len(refs) {
		bits++
	}
	set := entrySet{byID: entries, bySel: refs, buckets: make([]uint32, 1<<bits+1), shift: 64 - bits}
	i := 0
	for b := range set.buckets {
		for i < len(refs) && refs[i].hash>>set.shift < uint64(b) {
			i++
		}
		set.buckets[b] = uint32(i)
	}
	return set
}

func entryByID(sorted []*Entry, id string) *Entry {
	i, found := slices.BinarySearchFunc(sorted, id, func(e *Entry, id string) int { return strings.Compare(e.ID, id) })
	if !found {
		return nil
	}
	return sorted[i]
}

// get returns the entry with this ID, or nil.
func (s *entrySet) get(id string) *Entry { return entryByID(s.byID, id) }

func (s *entrySet) len() int { return len(s.byID) }

// withSelector yields the entries that have sel among their selectors.
func (s *entrySet) withSelector(sel selector.Selector) iter.Seq[*Entry] {
	return func(yield func(*Entry) bool) {
		if len(s.bySel) == 0 {
			return
		}
		h := selectorHash(sel)
		b := h >> s.shift
		for i := s.buckets[b]; i < s.buckets[b+1]; i++ {
			if s.bySel[i].hash != h {
				continue
			}
			e := s.byID[s.bySel[i].entry]
			if e.Selectors[s.bySel[i].sel] == sel && !yield(e) {
				return
			}
		}
	}
}
