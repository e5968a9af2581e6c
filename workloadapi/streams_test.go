package workloadapi

import (
	"bytes"
	"context"
	"os"
	"testing"
	"time"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
)

// Streams lists each open X509-SVID and SDS stream with what it last sent,
// follows a rotation, and drops a stream once its client leaves.
func TestStreamsRecordOpenStreams(t *testing.T) {
	entry := newEntry("/svc", 1, mySelector())
	entry.X509SVIDTTL = 3 * time.Second
	streams := NewStreams()
	e := newTestEnv(t, envOptions{entries: []*agent.Entry{entry}, noJWTKey: true, streams: streams})

	ctx, cancel := context.WithCancel(callCtx(t))
	x509, err := e.client(t).FetchX509SVID(ctx, &workload.X509SVIDRequest{})
	if err != nil {
		t.Fatal(err)
	}
	first, err := x509.Recv()
	if err != nil {
		t.Fatal(err)
	}
	sds := (&sdsEnv{testEnv: e, client: secretv3.NewSecretDiscoveryServiceClient(testkit.Dial(t, e.socket))}).stream(t)
	sds.send(t, &discoveryv3.DiscoveryRequest{Node: envoyNode(16, nil), ResourceNames: []string{"default"}})
	sds.next(t, "the SDS response")

	var open []OpenStream
	testkit.WaitFor(t, waitLimit, "both streams recorded with their SVID", func() bool {
		open = streams.List()
		return len(open) == 2 && len(open[0].SVIDs) == 1 && len(open[1].SVIDs) == 1
	})
	apis := map[string]bool{}
	for _, o := range open {
		apis[o.API] = true
		if o.PID != int32(os.Getpid()) || o.UID != uint32(os.Getuid()) || o.SVIDs[0].ID != entry.SPIFFEID {
			t.Errorf("stream %+v, want this process holding %s", o, entry.SPIFFEID)
		}
	}
	if !apis["x509"] || !apis["sds"] {
		t.Errorf("streams %v, want one x509 and one sds", apis)
	}

	// The SVID rotates at half its life: the record follows what was sent.
	if _, err := x509.Recv(); err != nil {
		t.Fatal(err)
	}
	firstCert := first.Svids[0].X509Svid
	testkit.WaitFor(t, waitLimit, "the rotated SVID in the record", func() bool {
		for _, o := range streams.List() {
			if o.API == "x509" && len(o.SVIDs) == 1 && !bytes.HasPrefix(firstCert, o.SVIDs[0].Chain[0].Raw) {
				return true
			}
		}
		return false
	})

	cancel()
	testkit.WaitFor(t, waitLimit, "the X509-SVID stream to leave the record", func() bool {
		for _, o := range streams.List() {
			if o.API == "x509" {
				return false
			}
		}
		return true
	})
}
