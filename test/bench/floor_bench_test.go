package bench

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// BenchmarkFloor is workloadapi's BenchmarkFetch against the floor server,
// in this process: what is left for the gRPC client and a server that does
// nothing but read the caller's /proc status. Compare the two with
// benchstat to see what Lanyard's fetch path adds.
func BenchmarkFloor(b *testing.B) {
	dir, err := os.MkdirTemp("", "flb-")
	if err != nil {
		b.Fatal(err)
	}
	defer os.RemoveAll(dir)
	socket := filepath.Join(dir, "floor.sock")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- ServeFloor(ctx, socket, sizedFloor()) }()
	defer func() {
		cancel()
		<-done
	}()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := SocketOwner(socket); err == nil {
			break
		}
		if time.Now().After(deadline) {
			b.Fatal("the floor did not listen")
		}
		time.Sleep(10 * time.Millisecond)
	}
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
