package workloadapi

import (
	"fmt"
	"testing"

	"github.com/lanyard-dev/lanyard/agent"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/proto"
)

// benchSnapshot is an answer of n SVIDs with the sizes of real ones: a
// leaf and an intermediate of about 600 bytes each, a P-256 PKCS#8 key, a
// bundle of one root.
func benchSnapshot(n int) *agent.X509Snapshot {
	cert := make([]byte, 600)
	snap := &agent.X509Snapshot{Local: &agent.Bundle{Bundle: spiffebundle.New(tdExample), X509DER: cert}}
	for i := range n {
		snap.SVIDs = append(snap.SVIDs, &agent.X509SVID{
			ID:       spiffeid.RequireFromPath(tdExample, fmt.Sprintf("/w/%d", i)),
			ChainDER: append(append([]byte(nil), cert...), cert...),
			KeyDER:   make([]byte, 138),
		})
		snap.Hints = append(snap.Hints, "")
	}
	return snap
}

// BenchmarkX509Response is building the FetchX509SVID message from the
// cache's snapshot and encoding it, as gRPC does on Send.
func BenchmarkX509Response(b *testing.B) {
	for _, n := range []int{1, 10} {
		snap := benchSnapshot(n)
		b.Run(fmt.Sprintf("svids=%d/build", n), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if resp := x509Response(snap); len(resp.Svids) != n {
					b.Fatal(len(resp.Svids))
				}
			}
		})
		b.Run(fmt.Sprintf("svids=%d/build+marshal", n), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := proto.Marshal(x509Response(snap)); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
