package unix

import (
	"context"
	"os"
	"strconv"
	"testing"
)

// BenchmarkAttestParallel is the unix attestor under concurrent callers,
// which share its name and hash caches (BenchmarkAttest in unix_test.go is
// one caller at a time).
func BenchmarkAttestParallel(b *testing.B) {
	a := newTestAttestor(b, "")
	proc := processOf(b, int32(os.Getpid()))
	ctx := context.Background()
	if _, err := a.Attest(ctx, proc); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.SetParallelism(8)
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := a.Attest(ctx, proc); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

// BenchmarkReadStatus is the one /proc read each attestation makes; most
// of an attestation is the kernel writing this file.
func BenchmarkReadStatus(b *testing.B) {
	path := "/proc/" + strconv.Itoa(os.Getpid()) + "/status"
	bufp := statusBufs.Get().(*[]byte)
	defer statusBufs.Put(bufp)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := readStatus(path, bufp); err != nil {
			b.Fatal(err)
		}
	}
}
