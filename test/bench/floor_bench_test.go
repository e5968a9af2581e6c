package bench

import (
	"context"
	"testing"
)

// BenchmarkFloor is workloadapi's BenchmarkFetch against the floor server,
// in this process: what is left for the gRPC client and a server that does
// nothing but read the caller's /proc status. Compare the two with
// benchstat to see what Lanyard's fetch path adds.
func BenchmarkFloor(b *testing.B) {
	socket, stop, err := startSizedFloor()
	if err != nil {
		b.Fatal(err)
	}
	defer stop()
	for _, kind := range Kinds {
		b.Run(string(kind), func(b *testing.B) {
			f, err := newFetcher(kind, socket)
			if err != nil {
				b.Fatal(err)
			}
			defer f.close()
			hctx := WithHeader(context.Background())
			if err := f.fetch(hctx); err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			for b.Loop() {
				if err := f.fetch(hctx); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
