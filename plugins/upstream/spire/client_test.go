package spire

import (
	"context"
	"errors"
	"testing"

	"github.com/hashicorp/go-hclog"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/spire-api-sdk/proto/spire/api/types"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/status"
)

// newTestClient is a client of a server that is never dialed: gRPC
// connects on the first RPC, which these tests do not make.
func newTestClient(t *testing.T, refused func(error)) *serverClient {
	t.Helper()
	id := &agentIdentity{td: td}
	return &serverClient{
		log:      hclog.NewNullLogger(),
		addr:     "127.0.0.1:1",
		serverID: spiffeid.RequireFromPath(td, "/spire/server"),
		creds:    id,
		refused:  refused,
	}
}

func denied(reason types.PermissionDeniedDetails_Reason) error {
	st, err := status.New(codes.PermissionDenied, "no").WithDetails(&types.PermissionDeniedDetails{Reason: reason})
	if err != nil {
		panic(err)
	}
	return st.Err()
}

// A retired connection stays open for the calls on it and closes after the
// last one; the next call gets a new connection.
func TestConnectionHandOver(t *testing.T) {
	c := newTestClient(t, func(error) {})
	old, _, err := c.acquire()
	if err != nil {
		t.Fatal(err)
	}
	c.retire()
	if old.cc.GetState() == connectivity.Shutdown {
		t.Fatal("a retired connection closed under a call in progress")
	}
	next, _, err := c.acquire()
	if err != nil {
		t.Fatal(err)
	}
	if next == old {
		t.Fatal("a call after the hand-over got the retired connection")
	}
	c.release(old)
	if old.cc.GetState() != connectivity.Shutdown {
		t.Fatal("the retired connection stayed open after its last call")
	}
	c.release(next)
	if next.cc.GetState() == connectivity.Shutdown {
		t.Fatal("the current connection closed when idle")
	}
	c.retire()
	if next.cc.GetState() != connectivity.Shutdown {
		t.Fatal("an idle connection was not closed when retired")
	}
}

// The identity hears of refusals on the current connection only: one on
// the previous SVID's connection is answered by the new SVID.
func TestCallReportsRefusals(t *testing.T) {
	var got []error
	c := newTestClient(t, func(err error) { got = append(got, err) })
	refusal := denied(types.PermissionDeniedDetails_AGENT_BANNED)
	err := c.call(context.Background(), func(context.Context, *grpc.ClientConn) error { return refusal })
	if !errors.Is(err, refusal) || len(got) != 1 || got[0] != refusal {
		t.Fatalf("call = %v, refusals reported %v; want the refusal returned and reported once", err, got)
	}
	err = c.call(context.Background(), func(context.Context, *grpc.ClientConn) error {
		c.retire() // the SVID was renewed while the call ran
		return refusal
	})
	if err == nil || len(got) != 1 {
		t.Fatalf("a refusal on a retired connection was reported: %v", got)
	}
	if err := c.call(context.Background(), func(context.Context, *grpc.ClientConn) error { return nil }); err != nil || len(got) != 1 {
		t.Fatalf("a successful call: %v, %v", err, got)
	}
}
