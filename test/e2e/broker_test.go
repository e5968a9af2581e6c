package e2e

import (
	"crypto/x509"
	"net"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/lanyard-dev/lanyard/test/delegate"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/exp/proto/spiffe/broker"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/anypb"
)

const brokerID = "spiffe://example.org/broker"

// brokerConfig serves the Broker Endpoint on a Unix socket and on
// loopback TCP; the test process (root) is the broker, and a process of
// podUID its workload.
const brokerConfig = `
agent {
  trust_domain = "example.org"
  data_dir     = "@DATA@"
  socket_path  = "@SOCKET@"
  experimental {
    broker {
      socket_path  = "@BROKER@"
      bind_address = "127.0.0.1:@PORT@"
      brokers = [
        {
          id = "` + brokerID + `"
          allowed_reference_types = [ { type_url = "type.googleapis.com/spiffe.broker.WorkloadPIDReference" } ]
        }
      ]
    }
  }
}
plugins {
  WorkloadAttestor "unix" { plugin_data {} }
  UpstreamAuthority "local" {
    plugin_data {
      entry {
        spiffe_id = "` + brokerID + `"
        selectors = ["unix:uid:@UID@"]
      }
      entry {
        spiffe_id = "` + podID + `"
        selectors = ["unix:uid:47102"]
        hint      = "pod"
      }
    }
  }
}
`

// TestBrokerEndpointServesAWorkloadByPID is a broker's path through the
// real binary: its own SVID from the Workload API, mutual TLS with the
// agent, which presents its own SVID; a real process of another uid named
// by PID gets its X509-SVID, verified against the bundle; a PID reference
// over TCP, which the config does not allow, and a call without the
// broker.spiffe.io header are refused with the spec's codes.
func TestBrokerEndpointServesAWorkloadByPID(t *testing.T) {
	testkit.RequireRoot(t, "to run the workload under another uid")
	dir := newAgentDir(t)
	socket := filepath.Join(dir, "broker", "broker.sock")
	port := testkit.FreePort(t)
	a := startAgentIn(t, dir, strings.NewReplacer("@BROKER@", socket, "@PORT@", strconv.Itoa(port)).Replace(brokerConfig))
	pod := delegate.StartWorkload(t, podUID)

	ctx := testkit.Context(t, delegateBound)
	source, err := workloadapi.NewX509Source(ctx, workloadapi.WithClientOptions(workloadapi.WithAddr("unix://"+a.socket)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { source.Close() })
	if svid, err := source.GetX509SVID(); err != nil || svid.ID.String() != brokerID {
		t.Fatalf("the broker's own SVID: %v, %v", svid, err)
	}
	var agentID spiffeid.ID
	authorizeAgent := tlsconfig.AdaptMatcher(func(id spiffeid.ID) error {
		agentID = id
		return nil
	})
	dial := func(target string) broker.APIClient {
		conn, err := grpc.NewClient(target, grpc.WithTransportCredentials(credentials.NewTLS(tlsconfig.MTLSClientConfig(source, source, authorizeAgent))))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		return broker.NewAPIClient(conn)
	}
	ref, err := anypb.New(&broker.WorkloadPIDReference{Pid: int32(pod.Cmd.Process.Pid)})
	if err != nil {
		t.Fatal(err)
	}
	req := &broker.SubscribeToX509SVIDRequest{Reference: &broker.WorkloadReference{Reference: ref}}
	withHeader := metadata.AppendToOutgoingContext(ctx, "broker.spiffe.io", "true")

	unix := dial("unix://" + socket)
	stream, err := unix.SubscribeToX509SVID(withHeader, req)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := stream.Recv()
	if err != nil {
		t.Fatalf("SubscribeToX509SVID by PID: %v", err)
	}
	if !strings.HasPrefix(agentID.Path(), "/spire/agent/local/") || agentID.TrustDomain().Name() != "example.org" {
		t.Errorf("the agent presented %s, want its own SVID under /spire/agent/local/", agentID)
	}
	if len(resp.Svids) != 1 || resp.Svids[0].SpiffeId != podID || resp.Svids[0].Hint != "pod" {
		t.Fatalf("the workload's SVIDs: %v, want one for %s with hint pod", resp.Svids, podID)
	}
	got := resp.Svids[0]
	chain, err := x509.ParseCertificates(got.X509Svid)
	if err != nil {
		t.Fatal(err)
	}
	roots, err := x509.ParseCertificates(got.Bundle)
	if err != nil {
		t.Fatal(err)
	}
	if id, _, err := x509svid.Verify(chain, x509bundle.FromX509Authorities(agentID.TrustDomain(), roots)); err != nil || id.String() != podID {
		t.Fatalf("the workload's SVID does not verify against its bundle: %v %v", id, err)
	}
	if _, err := x509.ParsePKCS8PrivateKey(got.X509SvidKey); err != nil {
		t.Fatalf("the SVID's key: %v", err)
	}

	tcp := dial("passthrough:///" + net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
	overTCP, err := tcp.FetchJWTSVID(withHeader, &broker.FetchJWTSVIDRequest{Reference: req.Reference, Audience: []string{"db"}})
	if status.Code(err) != codes.PermissionDenied {
		t.Errorf("a PID reference over TCP, which the config does not allow: %v, %v; want PermissionDenied", overTCP, err)
	}
	if _, err := unix.FetchJWTSVID(ctx, &broker.FetchJWTSVIDRequest{Reference: req.Reference, Audience: []string{"db"}}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("a call without the broker.spiffe.io header: %v, want InvalidArgument", err)
	}

	// The workload exits: its stream ends, NotFound (ctx bounds the wait).
	_ = pod.Cmd.Process.Kill()
	<-pod.Exited
	for {
		_, err := stream.Recv()
		if err != nil {
			if status.Code(err) != codes.NotFound {
				t.Fatalf("the stream of an exited PID ended with %v, want NotFound", err)
			}
			break
		}
	}
}
