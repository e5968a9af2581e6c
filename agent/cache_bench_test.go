package agent

import (
	"context"
	"fmt"
	"runtime"
	"testing"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/attestor/selector"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// The cache's part of every Workload API call: finding the caller's
// entries and answering from memory. Run with -benchmem; compare versions
// with benchstat.

// benchCache is a ready cache with n entries, one of which matches sels
// (unix:uid:1000 with its user and group); the others match uids no caller
// has.
func benchCache(b testing.TB, n int) (*SVIDManager, []selector.Selector) {
	b.Helper()
	up := newTestUpstream(b)
	c := NewSVIDManager(hclog.NewNullLogger(), up)
	c.SetEntries(benchEntries(n))
	c.SetBundles(up.bundle(), nil)
	sels := mustSels("unix:uid:1000", "unix:user:app", "unix:gid:1000", "unix:group:app", "unix:supplementary_gid:1000", "unix:supplementary_group:app")
	ctx := context.Background()
	if _, err := c.X509Identities(ctx, sels); err != nil { // mint
		b.Fatal(err)
	}
	if _, err := c.JWTSVIDs(ctx, sels, []string{"bench"}, spiffeid.ID{}); err != nil {
		b.Fatal(err)
	}
	return c, sels
}

func benchEntries(n int) []*Entry {
	entries := make([]*Entry, n)
	entries[0] = testEntry("e0", "spiffe://example.org/app", 1, "unix:uid:1000")
	for i := 1; i < n; i++ {
		entries[i] = testEntry(fmt.Sprintf("e%d", i), fmt.Sprintf("spiffe://example.org/w/%d", i), int64(i+1), fmt.Sprintf("unix:uid:%d", 100000+i))
	}
	return entries
}

var entryCounts = []int{1, 10000}

// BenchmarkX509Identities is the lookup behind every FetchX509SVID
// message, for an SVID already minted.
func BenchmarkX509Identities(b *testing.B) {
	for _, n := range entryCounts {
		b.Run(fmt.Sprintf("entries=%d", n), func(b *testing.B) {
			c, sels := benchCache(b, n)
			ctx := context.Background()
			b.ReportAllocs()
			for b.Loop() {
				snap, err := c.X509Identities(ctx, sels)
				if err != nil || len(snap.SVIDs) != 1 {
					b.Fatalf("%d SVIDs, %v", len(snap.SVIDs), err)
				}
			}
		})
	}
}

// BenchmarkX509IdentitiesParallel is the same from many callers at once,
// which share the cache's lock.
func BenchmarkX509IdentitiesParallel(b *testing.B) {
	c, sels := benchCache(b, 1)
	ctx := context.Background()
	b.ReportAllocs()
	b.SetParallelism(8)
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := c.X509Identities(ctx, sels); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

// BenchmarkJWTSVIDs is FetchJWTSVID's lookup of a cached token.
func BenchmarkJWTSVIDs(b *testing.B) {
	for _, n := range entryCounts {
		b.Run(fmt.Sprintf("entries=%d", n), func(b *testing.B) {
			c, sels := benchCache(b, n)
			ctx := context.Background()
			aud := []string{"bench"}
			b.ReportAllocs()
			for b.Loop() {
				svids, err := c.JWTSVIDs(ctx, sels, aud, spiffeid.ID{})
				if err != nil || len(svids) != 1 {
					b.Fatalf("%d JWT-SVIDs, %v", len(svids), err)
				}
			}
		})
	}
}

// BenchmarkSubscribe is what every stream pays to be told of changes.
func BenchmarkSubscribe(b *testing.B) {
	c, _ := benchCache(b, 1)
	b.ReportAllocs()
	for b.Loop() {
		c.Subscribe().Close()
	}
}

// BenchmarkSetEntries is a sync that brings 10,000 entries of which none
// changed, and the heap the cache holds for them.
func BenchmarkSetEntries(b *testing.B) {
	const n = 10000
	runtime.GC()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	c, _ := benchCache(b, n)
	runtime.GC()
	runtime.ReadMemStats(&after)
	b.ReportAllocs()
	for b.Loop() {
		c.SetEntries(benchEntries(n))
	}
	// After the loop: b.Loop's start resets reported metrics.
	b.ReportMetric(float64(after.HeapAlloc-before.HeapAlloc)/n, "heap-B/entry")
}

// BenchmarkPersist saves a cache of 10,000 entries with one minted SVID to
// the data directory: what every change to a large node's cache costs.
func BenchmarkPersist(b *testing.B) {
	c, sels := benchCache(b, 10000)
	if _, err := c.X509Identities(context.Background(), sels); err != nil {
		b.Fatal(err)
	}
	c.persister.path = b.TempDir() + "/" + cacheFileName
	b.ReportAllocs()
	for b.Loop() {
		c.store.mu.Lock()
		c.store.changedLocked()
		c.store.mu.Unlock()
		c.persister.persist()
	}
}

// TestX509IdentitiesVerifiesNoSignature: the fetch path checks that a
// served SVID chains to the bundle once per bundle, not per call. Checking
// it per call verified a signature on every fetch (100 µs and 17 allocs
// instead of 0.7 µs and 4, BenchmarkX509Identities).
func TestX509IdentitiesVerifiesNoSignature(t *testing.T) {
	c, sels := benchCache(t, 1)
	ctx := context.Background()
	if _, err := c.X509Identities(ctx, sels); err != nil {
		t.Fatal(err)
	}
	allocs := testing.AllocsPerRun(20, func() {
		if _, err := c.X509Identities(ctx, sels); err != nil {
			t.Fatal(err)
		}
	})
	if allocs > 4 {
		t.Errorf("X509Identities allocates %v times a call, want at most 4: is it verifying signatures?", allocs)
	}
}
