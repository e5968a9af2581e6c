package attestor

import (
	"net"
	"os"
	"path/filepath"
	"testing"

	"github.com/lanyard-dev/lanyard/internal/testkit"
)

// BenchmarkVerify is the check after every attestation that the caller is
// still the process that connected, with its credentials.
func BenchmarkVerify(b *testing.B) {
	for _, tr := range trackers {
		b.Run(tr.name, func(b *testing.B) {
			c := &Caller{}
			c.init(int32(os.Getpid()), uint32(os.Geteuid()), uint32(os.Getegid()), -1, tr.procDir)
			if c.err != nil || c.kind != tr.want {
				b.Fatalf("tracking this process: kind %d, err %v", c.kind, c.err)
			}
			defer c.releaseFD()
			b.ReportAllocs()
			for b.Loop() {
				if err := c.Verify(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkServerHandshake is what a new Workload API connection costs the
// server before gRPC sees it: accept, SO_PEERCRED, and pinning the caller.
// The client's connect is in the loop too.
func BenchmarkServerHandshake(b *testing.B) {
	dir := testkit.ShortDir(b, "hs-")
	l, err := net.Listen("unix", filepath.Join(dir, "s.sock"))
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	creds := Credentials()
	b.ReportAllocs()
	for b.Loop() {
		client, err := net.Dial("unix", l.Addr().String())
		if err != nil {
			b.Fatal(err)
		}
		server, err := l.Accept()
		if err != nil {
			b.Fatal(err)
		}
		conn, info, err := creds.ServerHandshake(server)
		if err != nil {
			b.Fatal(err)
		}
		if c := info.(*AuthInfo).Caller; c.err != nil {
			b.Fatal(c.err)
		}
		conn.Close()
		client.Close()
	}
}
