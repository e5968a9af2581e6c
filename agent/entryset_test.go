package agent

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/lanyard-dev/lanyard/attestor/selector"
)

func collect(s *entrySet, sel selector.Selector) []string {
	var ids []string
	for e := range s.withSelector(sel) {
		ids = append(ids, e.ID)
	}
	slices.Sort(ids)
	return ids
}

// TestEntrySetMatchesBruteForce looks every selector up in sets of many
// sizes (so that buckets hold zero, one and several selectors) and compares
// with a scan of the entries.
func TestEntrySetMatchesBruteForce(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, n := range []int{0, 1, 2, 3, 17, 300} {
		var entries []*Entry
		for i := range n {
			var sels []string
			for range 1 + rng.IntN(3) {
				sels = append(sels, fmt.Sprintf("unix:uid:%d", rng.IntN(n/2+1)))
			}
			e := testEntry(fmt.Sprintf("e%03d", i), fmt.Sprintf("spiffe://example.org/w/%d", i), int64(i), sels...)
			e.Selectors = selector.Sort(e.Selectors)
			entries = append(entries, e)
		}
		sorted, _ := sortEntries(entries, nil)
		set := newEntrySet(sorted)
		if set.len() != n {
			t.Fatalf("n=%d: len %d", n, set.len())
		}
		for _, e := range entries {
			if set.get(e.ID) != e {
				t.Fatalf("n=%d: get(%s) did not return the entry", n, e.ID)
			}
		}
		if set.get("absent") != nil {
			t.Fatalf("n=%d: get of an absent ID returned an entry", n)
		}
		for u := range n/2 + 2 {
			sel := selector.Selector{Type: "unix", Value: fmt.Sprintf("uid:%d", u)}
			var want []string
			for _, e := range entries {
				if slices.Contains(e.Selectors, sel) {
					want = append(want, e.ID)
				}
			}
			if got := collect(&set, sel); !slices.Equal(got, want) {
				t.Fatalf("n=%d: entries with %v: got %v, want %v", n, sel, got, want)
			}
		}
	}
}

// TestEntrySetHashCollision: an entry found under a selector's hash but
// for another selector is not yielded, whether the colliding selector is
// another entry's or the same entry's.
func TestEntrySetHashCollision(t *testing.T) {
	a := testEntry("a", "spiffe://example.org/a", 1, "unix:uid:1")
	b := testEntry("b", "spiffe://example.org/b", 2, "unix:uid:2")
	sel1 := a.Selectors[0]
	h := selectorHash(sel1)
	// b's selector forged to collide with a's.
	set := indexRefs([]*Entry{a, b}, []selectorRef{{hash: h, entry: 0, sel: 0}, {hash: h, entry: 1, sel: 0}})
	if got := collect(&set, sel1); !slices.Equal(got, []string{"a"}) {
		t.Fatalf("entries with %v: %v, want [a]", sel1, got)
	}
	// c has both selectors, forged to collide: looking one up must yield c
	// once, or matchLocked would count it as holding both.
	c := testEntry("c", "spiffe://example.org/c", 3, "unix:uid:1", "unix:uid:2")
	set = indexRefs([]*Entry{c}, []selectorRef{{hash: h, entry: 0, sel: 0}, {hash: h, entry: 0, sel: 1}})
	if got := collect(&set, sel1); !slices.Equal(got, []string{"c"}) {
		t.Fatalf("entries with %v: %v, want [c] once", sel1, got)
	}
}

func TestSortEntries(t *testing.T) {
	a1 := testEntry("a", "spiffe://example.org/a", 1, "unix:uid:1")
	a2 := testEntry("a", "spiffe://example.org/a2", 1, "unix:uid:1")
	b := testEntry("b", "spiffe://example.org/b", 2, "unix:uid:2")
	got, changed := sortEntries([]*Entry{b, a1, a2}, nil)
	if !changed || len(got) != 2 || got[0] != a2 || got[1] != b {
		t.Fatalf("duplicate IDs: the last given must win: %v %v", got, changed)
	}
	// An equal entry in a new allocation is replaced by the old one, so
	// that the SVIDs minted for it stay.
	bCopy := testEntry("b", "spiffe://example.org/b", 2, "unix:uid:2")
	again, changed := sortEntries([]*Entry{bCopy, a2}, got)
	if changed || again[1] != b {
		t.Fatalf("an unchanged set was reported changed (%v) or not given the old entries", changed)
	}
	if _, changed := sortEntries([]*Entry{a2}, got); !changed {
		t.Fatal("a removed entry was not a change")
	}
	bNew := testEntry("b", "spiffe://example.org/b", 2, "unix:uid:3")
	if out, changed := sortEntries([]*Entry{a2, bNew}, got); !changed || out[1] != bNew {
		t.Fatal("a changed entry was not taken")
	}
}
