// Command client is a Delegated Identity API client, as a node proxy
// (Cilium, ztunnel) is one: it fetches its own X509-SVID from the Workload
// API, then makes one call on the admin socket and prints every response
// as a line, "<kind> <protojson>", and the call's end as
// "end <code> <message>". The end-to-end and interop suites run it, the
// same binary against Lanyard and against spire-agent, under the uids
// whose behaviour they check (test/delegate reads its output).
//
//	client [-workload SOCKET] -admin SOCKET x509|jwt|x509bundles|jwtbundles [-selector type:value]... [-pid N] [-audience A]...
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/workloadapi"
	delegatedv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/agent/delegatedidentity/v1"
	"github.com/spiffe/spire-api-sdk/proto/spire/api/types"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
)

// lifetime bounds the client in case its test never stops it.
const lifetime = 3 * time.Minute

type list []string

func (l *list) String() string     { return strings.Join(*l, ",") }
func (l *list) Set(v string) error { *l = append(*l, v); return nil }

func main() {
	workloadSocket := flag.String("workload", "", "the Workload API socket, for the client's own X509-SVID (none: skip)")
	adminSocket := flag.String("admin", "", "the admin socket")
	pid := flag.Int("pid", 0, "the PID of the workload")
	var selectors, audience list
	flag.Var(&selectors, "selector", "a selector of the workload, type:value (repeatable)")
	flag.Var(&audience, "audience", "a JWT-SVID audience (repeatable)")
	flag.Parse()
	if flag.NArg() != 1 || *adminSocket == "" {
		fmt.Fprintln(os.Stderr, "usage: client [-workload SOCKET] -admin SOCKET x509|jwt|x509bundles|jwtbundles [flags]")
		os.Exit(2)
	}
	// Its test closes stdin to stop it.
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		os.Exit(0)
	}()
	ctx, cancel := context.WithTimeout(context.Background(), lifetime)
	defer cancel()

	if *workloadSocket != "" {
		svid, err := workloadapi.FetchX509SVID(ctx, workloadapi.WithAddr("unix://"+*workloadSocket))
		if err != nil {
			end("self-error", err)
			return
		}
		fmt.Println("self", svid.ID)
	}
	conn, err := grpc.NewClient("unix://"+*adminSocket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		end("end", err)
		return
	}
	defer conn.Close()
	end("end", call(ctx, delegatedv1.NewDelegatedIdentityClient(conn), flag.Arg(0), request{pid: int32(*pid), selectors: selectors, audience: audience}))
}

type request struct {
	pid       int32
	selectors []string
	audience  []string
}

// protoSelectors splits each "type:value" at its first colon; malformed
// ones are sent as they are, for the server to refuse.
func (r request) protoSelectors() []*types.Selector {
	var out []*types.Selector
	for _, s := range r.selectors {
		typ, value, _ := strings.Cut(s, ":")
		out = append(out, &types.Selector{Type: typ, Value: value})
	}
	return out
}

func call(ctx context.Context, c delegatedv1.DelegatedIdentityClient, kind string, r request) error {
	switch kind {
	case "x509":
		s, err := c.SubscribeToX509SVIDs(ctx, &delegatedv1.SubscribeToX509SVIDsRequest{Selectors: r.protoSelectors(), Pid: r.pid})
		if err != nil {
			return err
		}
		return printAll(kind, s.Recv)
	case "x509bundles":
		s, err := c.SubscribeToX509Bundles(ctx, &delegatedv1.SubscribeToX509BundlesRequest{})
		if err != nil {
			return err
		}
		return printAll(kind, s.Recv)
	case "jwtbundles":
		s, err := c.SubscribeToJWTBundles(ctx, &delegatedv1.SubscribeToJWTBundlesRequest{})
		if err != nil {
			return err
		}
		return printAll(kind, s.Recv)
	case "jwt":
		resp, err := c.FetchJWTSVIDs(ctx, &delegatedv1.FetchJWTSVIDsRequest{Audience: r.audience, Selectors: r.protoSelectors(), Pid: r.pid})
		if err != nil {
			return err
		}
		return line(kind, resp)
	}
	return fmt.Errorf("unknown call %q", kind)
}

// printAll prints every message of a stream until it ends.
func printAll[M proto.Message](kind string, recv func() (M, error)) error {
	for {
		m, err := recv()
		if err != nil {
			return err
		}
		if err := line(kind, m); err != nil {
			return err
		}
	}
}

func line(kind string, m proto.Message) error {
	b, err := protojson.Marshal(m)
	if err != nil {
		return err
	}
	fmt.Println(kind, string(b))
	return nil
}

// end prints how the call ended: "OK" for a stream the server closed
// cleanly, else the gRPC status.
func end(kind string, err error) {
	if errors.Is(err, io.EOF) {
		err = nil
	}
	st := status.Convert(err)
	fmt.Println(kind, st.Code().String(), strings.ReplaceAll(st.Message(), "\n", " "))
}
