package interop

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/test/spire/spiretest"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// TestSpireServerOutage kills the real spire-server under an open stream:
// every fetch succeeds while the SVID is valid, an agent killed and
// restarted during the outage serves the SVID it saved, and rotation
// resumes once the server is back.
func TestSpireServerOutage(t *testing.T) {
	webID := "spiffe://example.org/web"
	s, n, l := startServing(t, webID, spiretest.WithX509SVIDTTL(40*time.Second))
	stream := openX509Stream(t, n.socket)
	first := stream.next(t, 30*time.Second)
	if first.err != nil {
		t.Fatal(first.err)
	}
	leaf := first.svids[0][0]

	s.Stop()
	// While the SVID is valid, every fetch succeeds, each on a new connection.
	for i := range 12 {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		svid, err := workloadapi.FetchX509SVID(ctx, workloadapi.WithAddr("unix://"+n.socket))
		cancel()
		if err != nil {
			t.Fatalf("fetch %d with spire-server down: %v", i, err)
		}
		if !svid.Certificates[0].Equal(leaf) {
			t.Fatalf("fetch %d served another SVID than the stream's", i)
		}
		time.Sleep(250 * time.Millisecond)
	}

	// The open stream saw no error through the outage.
	for drained := false; !drained; {
		select {
		case m, ok := <-stream.msgs:
			if !ok || m.err != nil {
				t.Fatalf("the open stream failed during the outage: %v", m.err)
			}
		default:
			drained = true
		}
	}

	// The agent dies too, and starts again while the server is still down.
	waitFor(t, 10*time.Second, "the cache to be saved", func() bool {
		data, err := os.ReadFile(filepath.Join(n.data, "cache.json"))
		return err == nil && strings.Contains(string(data), `"x509_svids":[{`)
	})
	if err := l.Cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	<-l.Exited
	restarted := n.start()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	svid, err := workloadapi.FetchX509SVID(ctx, workloadapi.WithAddr("unix://"+n.socket))
	if err != nil {
		t.Fatalf("no SVID from the restarted agent while spire-server is down: %v\n%s", err, restarted.logs.String())
	}
	if !svid.Certificates[0].Equal(leaf) {
		t.Fatal("the restarted agent served another SVID than the saved one")
	}

	// Rotation resumes once the server is back, on an open stream.
	watcher := openX509Stream(t, n.socket)
	if m := watcher.next(t, 10*time.Second); m.err != nil || !m.svids[0][0].Equal(leaf) {
		t.Fatalf("first message after the restart: %v", m.err)
	}
	s.Start()
	got := watcher.until(t, 90*time.Second, "a renewed SVID after spire-server returned", func(m x509Msg) bool {
		return !m.svids[0][0].Equal(leaf)
	})
	renewed := got[len(got)-1].svids[0][0]
	if !renewed.NotAfter.After(leaf.NotAfter) {
		t.Fatalf("the renewed SVID expires %v, not after the old one's %v", renewed.NotAfter, leaf.NotAfter)
	}
}
