package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testkit"
	adminv1 "github.com/lanyard-dev/lanyard/proto/lanyard/admin/v1"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/protobuf/encoding/protojson"
)

// `lanyard status` against the real agent: its own identity, its cache,
// and a workload holding an X509-SVID stream open, in the table and in
// JSON; the stream's row goes when the workload leaves.
func TestStatusShowsTheWorkloadsAndTheirIdentities(t *testing.T) {
	bin := buildLanyard(t)
	dir := testkit.ShortDir(t, "status-")
	body, socket := localConfig(dir)
	admin := filepath.Join(dir, "private", "admin.sock")
	body = strings.Replace(body, "socket_path  =", fmt.Sprintf("admin_socket_path = %q\n  socket_path  =", admin), 1)
	config := filepath.Join(dir, "agent.conf")
	if err := os.WriteFile(config, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	p, err := testkit.Start(t, bin, "run", "-config", config)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.WaitServing(socket, 30*time.Second); err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), waitLimit)
	defer cancel()
	client, err := workloadapi.New(ctx, workloadapi.WithAddr("unix://"+socket))
	if err != nil {
		t.Fatal(err)
	}
	svids := make(chan *x509svid.SVID, 1)
	watchCtx, stopWatch := context.WithCancel(ctx)
	watched := make(chan error, 1)
	go func() {
		watched <- client.WatchX509Context(watchCtx, watcher{func(c *workloadapi.X509Context) {
			select {
			case svids <- c.DefaultSVID():
			default:
			}
		}})
	}()
	var svid *x509svid.SVID
	select {
	case svid = <-svids:
	case <-ctx.Done():
		t.Fatal("no X509-SVID on the stream")
	}

	status := func() *adminv1.GetStatusResponse {
		t.Helper()
		var out, errOut bytes.Buffer
		if code := runStatus([]string{"-config", config, "-json"}, &out, &errOut); code != 0 {
			t.Fatalf("lanyard status -json exited %d: %s", code, errOut.String())
		}
		var resp adminv1.GetStatusResponse
		if err := protojson.Unmarshal(out.Bytes(), &resp); err != nil || !json.Valid(out.Bytes()) {
			t.Fatalf("status -json printed %q: %v", out.String(), err)
		}
		return &resp
	}
	var got *adminv1.GetStatusResponse
	testkit.WaitFor(t, waitLimit, "the stream in the status", func() bool {
		got = status()
		return len(got.Workloads) == 1 && len(got.Workloads[0].Identities) == 1
	})
	a := got.Agent
	if !a.Ready || a.Upstream != "local" || a.TrustDomain != "example.org" || a.Entries != 1 ||
		!strings.HasPrefix(a.SpiffeId, "spiffe://example.org/spire/agent/local/") || a.SvidExpiresAt <= time.Now().Unix() || a.LastSync == 0 {
		t.Errorf("agent = %v", a)
	}
	w := got.Workloads[0]
	if w.Pid != int32(os.Getpid()) || w.Uid != uint32(os.Getuid()) || w.Api != "x509" ||
		w.Identities[0].SpiffeId != svid.ID.String() || w.Identities[0].ExpiresAt != svid.Certificates[0].NotAfter.Unix() {
		t.Errorf("workload = %v, want this process holding %s until %v", w, svid.ID, svid.Certificates[0].NotAfter)
	}

	var out, errOut bytes.Buffer
	if code := runStatus([]string{"-adminSocketPath", admin}, &out, &errOut); code != 0 {
		t.Fatalf("lanyard status exited %d: %s", code, errOut.String())
	}
	for _, want := range []string{"spiffe://example.org/spire/agent/local/", "State     ready", "1 workload stream(s)", svid.ID.String(), fmt.Sprint(os.Getpid())} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("the table lacks %q:\n%s", want, out.String())
		}
	}

	stopWatch()
	<-watched
	client.Close()
	testkit.WaitFor(t, waitLimit, "the stream to leave the status", func() bool { return len(status().Workloads) == 0 })
}

// Without an admin socket, status says what to set.
func TestStatusWithoutAnAdminSocket(t *testing.T) {
	dir := t.TempDir()
	body, _ := localConfig(dir)
	config := filepath.Join(dir, "agent.conf")
	if err := os.WriteFile(config, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	var out, errOut bytes.Buffer
	if code := runStatus([]string{"-config", config}, &out, &errOut); code != 1 || !strings.Contains(errOut.String(), "sets no agent.admin_socket_path") {
		t.Errorf("exit %d, stderr %q", code, errOut.String())
	}
}

type watcher struct {
	update func(*workloadapi.X509Context)
}

func (w watcher) OnX509ContextUpdate(c *workloadapi.X509Context) { w.update(c) }
func (watcher) OnX509ContextWatchError(error)                    {}

// An admin socket that is not there is told in words that say what to do.
func TestStatusErrors(t *testing.T) {
	dir := testkit.ShortDir(t, "stat-")
	var out, errOut bytes.Buffer
	if code := runStatus([]string{"-adminSocketPath", filepath.Join(dir, "none.sock"), "-timeout", "2s"}, &out, &errOut); code != 1 ||
		!strings.Contains(errOut.String(), "is the agent running with this admin_socket_path?") {
		t.Errorf("no socket: exit %d, %q", code, errOut.String())
	}
}
