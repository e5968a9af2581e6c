package testkit

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"net"
	"testing"

	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/protobuf/proto"
)

// WatchX509 runs c.WatchX509Context with w until the test ends.
func WatchX509(t testing.TB, c *workloadapi.Client, w workloadapi.X509ContextWatcher) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = c.WatchX509Context(ctx, w)
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
}

// H2Conn is a raw HTTP/2 connection to a gRPC server, for clients no gRPC
// library would be: one that never reads, one that floods.
type H2Conn struct {
	Conn   net.Conn
	Framer *http2.Framer
}

// DialH2 connects to the Unix socket, sends the client preface and
// settings, and closes the connection when the test ends.
func DialH2(t testing.TB, socket string, settings ...http2.Setting) *H2Conn {
	t.Helper()
	conn, err := net.Dial("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	if _, err := io.WriteString(conn, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	fr := http2.NewFramer(conn, bufio.NewReader(conn))
	if err := fr.WriteSettings(settings...); err != nil {
		t.Fatal(err)
	}
	return &H2Conn{Conn: conn, Framer: fr}
}

// Call starts a Workload API call (with the security header) on stream id
// with req as its only message.
func (c *H2Conn) Call(t testing.TB, id uint32, method string, req proto.Message) {
	t.Helper()
	var hdr bytes.Buffer
	enc := hpack.NewEncoder(&hdr)
	fields := []string{":method", "POST", ":scheme", "http", ":path", "/SpiffeWorkloadAPI/" + method,
		":authority", "localhost", "content-type", "application/grpc", "te", "trailers", "workload.spiffe.io", "true"}
	for i := 0; i+1 < len(fields); i += 2 {
		if err := enc.WriteField(hpack.HeaderField{Name: fields[i], Value: fields[i+1]}); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.Framer.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: hdr.Bytes(), EndHeaders: true}); err != nil {
		t.Fatal(err)
	}
	body, err := proto.Marshal(req)
	if err != nil {
		t.Fatal(err)
	}
	// gRPC's message framing: uncompressed, then the length.
	msg := make([]byte, 5, 5+len(body))
	binary.BigEndian.PutUint32(msg[1:], uint32(len(body)))
	if err := c.Framer.WriteData(id, true, append(msg, body...)); err != nil {
		t.Fatal(err)
	}
}
