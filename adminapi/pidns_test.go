package adminapi

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"

	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/lanyard-dev/lanyard/internal/testkit/attestkit"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	delegatedv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/agent/delegatedidentity/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

// childSocketEnv names the admin socket to a copy of this test binary that
// runs as a delegate in a PID namespace of its own.
const childSocketEnv = "LANYARD_TEST_PIDNS_ADMIN_SOCKET"

// TestMain lets the test binary be that delegate: it asks for PID 1, which
// in its namespace is itself, and prints the status code it gets.
func TestMain(m *testing.M) {
	if socket := os.Getenv(childSocketEnv); socket != "" {
		fmt.Println(askForPIDOne(socket))
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func askForPIDOne(socket string) string {
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return "dial: " + err.Error()
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), waitLimit)
	defer cancel()
	_, err = delegatedv1.NewDelegatedIdentityClient(conn).FetchJWTSVIDs(ctx, &delegatedv1.FetchJWTSVIDsRequest{Audience: []string{"a"}, Pid: 1})
	return status.Code(err).String()
}

// A delegate in a PID namespace of its own (a pod without hostPID) names
// PIDs of its namespace, which are other processes in the agent's: PID 1
// would be the host's init. It is refused, FailedPrecondition, rather than
// handed that process's identity.
func TestDelegateInAChildPIDNamespaceIsRefused(t *testing.T) {
	testkit.RequireRoot(t, "to make a PID namespace")
	env := newTestEnv(t, []spiffeid.ID{delegateID}, attestkit.Entry(delegateID, 1, attestkit.MySelector()))
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childSocketEnv+"="+env.socket)
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWPID, Pdeathsig: syscall.SIGKILL}
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("the delegate in its own PID namespace: %v", err)
	}
	if got := strings.TrimSpace(string(out)); got != "FailedPrecondition" {
		t.Fatalf("a delegate in a child PID namespace asking for PID 1 got %s, want FailedPrecondition", got)
	}
}
