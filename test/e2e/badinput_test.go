package e2e

import (
	"context"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// rawCodec sends bytes as they are, to put malformed messages on the wire.
type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error)      { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(data []byte, v any) error { *(v.(*[]byte)) = data; return nil }
func (rawCodec) Name() string                       { return "proto" }

func TestMalformedAndOversizedRequests(t *testing.T) {
	a := startAgent(t, baseConfig)
	conn := a.rawConn(t)
	ctx := withHeader(testContext(t))
	before, err := a.client(t).FetchX509SVID(testContext(t))
	if err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		name string
		body []byte
		want codes.Code
	}{
		{"not protobuf", []byte{0xff, 0xff, 0xff, 0xff, 0x0f, 0x01}, codes.Internal},
		{"wrong field types", []byte{0x0a, 0x05, 0x01}, codes.Internal},
		{"oversized", make([]byte, 1<<20), codes.ResourceExhausted},
	} {
		var out []byte
		err := conn.Invoke(ctx, "/SpiffeWorkloadAPI/ValidateJWTSVID", &tc.body, &out, grpc.ForceCodec(rawCodec{}))
		if status.Code(err) != tc.want {
			t.Errorf("%s: %v, want %s", tc.name, err, tc.want)
		}
	}
	// A huge but well-formed token is refused as invalid, not crashed on.
	_, err = workload.NewSpiffeWorkloadAPIClient(conn).ValidateJWTSVID(ctx, &workload.ValidateJWTSVIDRequest{Audience: "a", Svid: strings.Repeat("a.", 50000)})
	if status.Code(err) != codes.InvalidArgument {
		t.Errorf("a 100 KB junk token: %v, want InvalidArgument", err)
	}

	// The agent is still up and still serves the same SVID: nothing cached was lost.
	after, err := a.client(t).FetchX509SVID(testContext(t))
	if err != nil {
		t.Fatal(err)
	}
	if !after.Certificates[0].Equal(before.Certificates[0]) {
		t.Fatal("bad input changed the cached SVID")
	}
}

func TestSIGTERMWithOpenStreamsExitsPromptly(t *testing.T) {
	a := startAgent(t, baseConfig)
	ctx, cancel := context.WithCancel(withHeader(context.Background()))
	defer cancel()
	stream, err := workload.NewSpiffeWorkloadAPIClient(a.rawConn(t)).FetchX509SVID(ctx, &workload.X509SVIDRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Recv(); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := a.Cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-a.Exited:
	case <-time.After(20 * time.Second):
		t.Fatal("the agent did not exit within 20s of SIGTERM with a stream open")
	}
	if a.ExitErr != nil {
		t.Fatalf("exit after SIGTERM: %v, want status 0\n%s", a.ExitErr, a.Logs.String())
	}
	t.Logf("exited %s after SIGTERM with a stream open", time.Since(start).Round(time.Millisecond))
	// The stream ends; the client sees the server go away.
	if _, err := stream.Recv(); err == nil {
		t.Fatal("the stream is still delivering after the agent exited")
	}
}
