package bench

import (
	"context"
	"encoding/json"
	"encoding/xml"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestMain(m *testing.M) {
	// Child processes of the harness are this test binary in a role.
	RunRole()
	os.Exit(m.Run())
}

// TestHarnessSmoke runs the harness end to end in its smallest form:
// Lanyard on its embedded CA and the floor (no SPIRE), every fetch
// workload for a fraction of a second, and a few open streams. It checks
// that every figure was measured and that the report files are written
// and readable, not how fast anything is.
func TestHarnessSmoke(t *testing.T) {
	bin, err := BuildLanyard(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	cfg := DefaultConfig(true)
	cfg.Log = io.Discard
	cfg.LanyardBin = bin
	cfg.LocalOnly = true
	cfg.Warmup, cfg.Window = 50*time.Millisecond, 200*time.Millisecond
	cfg.Clients = []int{1, 4}
	cfg.Streams = 20
	r := Run(t, cfg)
	if t.Failed() {
		return
	}

	if r.Idle[NameLanyard] == 0 || r.Idle[NameFloor] == 0 {
		t.Errorf("idle RSS not measured: %v", r.Idle)
	}
	if got, want := len(r.Fetch), len(Kinds)*len(cfg.Clients); got != want {
		t.Fatalf("%d fetch rows, want %d", got, want)
	}
	for _, row := range r.Fetch {
		for _, name := range []string{NameLanyard, NameFloor} {
			s := row.Targets[name]
			switch {
			case s == nil:
				t.Errorf("%s c=%d: %s not measured", row.Kind, row.Clients, name)
			case s.Ops == 0 || s.Throughput <= 0 || s.Latency.P50 <= 0 || s.Latency.P99 < s.Latency.P50:
				t.Errorf("%s c=%d %s: %+v", row.Kind, row.Clients, name, s)
			case s.Errors > 0:
				t.Errorf("%s c=%d %s: %d errors, first: %s", row.Kind, row.Clients, name, s.Errors, s.FirstErr)
			}
		}
	}
	if s := r.Streams[NameLanyard]; s == nil || len(s.Rounds) != 1 || s.RSS == 0 {
		t.Errorf("streams not measured: %+v", s)
	}
	if len(r.Checks) == 0 {
		t.Error("no target was checked")
	}

	paths, err := r.WriteFiles(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		switch filepath.Ext(p) {
		case ".json":
			var back Report
			if err := json.Unmarshal(b, &back); err != nil {
				t.Errorf("%s: %v", p, err)
			} else if len(back.Fetch) != len(r.Fetch) {
				t.Errorf("%s: %d fetch rows, want %d", p, len(back.Fetch), len(r.Fetch))
			}
		case ".svg":
			checkXML(t, p, b)
		case ".txt":
			for _, want := range []string{"x509-new-conn c=4 fetches/s", "idle RSS", "Targets:"} {
				if !strings.Contains(string(b), want) {
					t.Errorf("%s lacks %q:\n%s", p, want, b)
				}
			}
		}
	}
}

func checkXML(t *testing.T, name string, b []byte) {
	t.Helper()
	d := xml.NewDecoder(strings.NewReader(string(b)))
	for {
		_, err := d.Token()
		if errors.Is(err, io.EOF) {
			return
		}
		if err != nil {
			t.Fatalf("%s is not well-formed XML: %v", name, err)
		}
	}
}

func TestPercentiles(t *testing.T) {
	var lat []time.Duration
	for i := 100; i >= 1; i-- {
		lat = append(lat, time.Duration(i)*time.Millisecond)
	}
	p := PercentilesOf(lat)
	if p.P50 != 50*time.Millisecond || p.P90 != 90*time.Millisecond || p.P99 != 99*time.Millisecond || p.Max != 100*time.Millisecond {
		t.Errorf("percentiles of 1..100 ms = %+v", p)
	}
	if one := PercentilesOf([]time.Duration{7}); one.P50 != 7 || one.P99 != 7 {
		t.Errorf("percentiles of one sample = %+v", one)
	}
	if (PercentilesOf(nil) != Percentiles{}) {
		t.Error("percentiles of nothing are not zero")
	}
}

func TestProc(t *testing.T) {
	self := Proc{PID: os.Getpid()}
	// Burn a little CPU so that the tick counter moves.
	deadline := time.Now().Add(50 * time.Millisecond)
	for x := 0; time.Now().Before(deadline); x++ {
		_ = x * x
	}
	cpu, err := self.CPUSeconds()
	if err != nil || cpu <= 0 {
		t.Errorf("CPUSeconds = %v, %v", cpu, err)
	}
	rss, err := self.RSS()
	if err != nil || rss < 1<<20 {
		t.Errorf("RSS = %d, %v", rss, err)
	}
	peak, err := self.PeakRSS()
	if err != nil || peak < rss/2 {
		t.Errorf("PeakRSS = %d (RSS %d), %v", peak, rss, err)
	}
	m, err := self.Memory()
	if err != nil || m.RSS == 0 || m.Anon == 0 || m.Anon+m.File != m.RSS {
		t.Errorf("Memory = %+v, %v", m, err)
	}
	if _, err := (Proc{PID: 1 << 30}).CPUSeconds(); err == nil {
		t.Error("CPUSeconds of a missing process: no error")
	}
}

func TestSocketOwner(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	pid, err := SocketOwner(path)
	if err != nil || pid != os.Getpid() {
		t.Errorf("SocketOwner = %d, %v; want %d", pid, err, os.Getpid())
	}
	if _, err := SocketOwner(filepath.Join(t.TempDir(), "none.sock")); err == nil {
		t.Error("SocketOwner of a missing socket: no error")
	}
}

// TestLoadCountsErrors drives a closed loop at a server that refuses every
// call, which must show as errors, not as fetches.
func TestLoadCountsErrors(t *testing.T) {
	path := filepath.Join(t.TempDir(), "floor.sock")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	// A floor whose answers have no SVID fails every fetch.
	go func() { done <- ServeFloor(ctx, path, &Floor{}) }()
	defer func() {
		cancel()
		<-done
	}()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := SocketOwner(path); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the floor did not listen")
		}
		time.Sleep(10 * time.Millisecond)
	}
	res, err := Load(context.Background(), path, NewConn, 2, 0, 100*time.Millisecond, nil)
	if err != nil || res.Ops != 0 || res.Errors == 0 || res.FirstErr == "" {
		t.Errorf("new-connection fetches from a server without SVIDs: %d fetches, %d errors (%q), %v", res.Ops, res.Errors, res.FirstErr, err)
	}
	res, err = Load(context.Background(), path, Reused, 2, 0, 100*time.Millisecond, nil)
	if err == nil {
		t.Fatalf("Load against a server without SVIDs succeeded: %+v", res)
	}
	res, err = Load(context.Background(), path, JWT, 2, 0, 100*time.Millisecond, nil)
	if err == nil {
		t.Fatalf("Load against a server without JWT-SVIDs succeeded: %+v", res)
	}
}

func TestSVGWithoutFigures(t *testing.T) {
	r := newReport(DefaultConfig(true))
	checkXML(t, "empty report", []byte(r.SVG()))
}

func TestPerEntry(t *testing.T) {
	for _, c := range []struct {
		es   EntriesStats
		want float64
	}{
		{EntriesStats{Absent: 1000, NoEntriesRSS: 20 << 20, AbsentRSS: 20<<20 + 512000}, 512},
		{EntriesStats{Absent: 0, NoEntriesRSS: 1, AbsentRSS: 2}, 0},
		// The RSS fell (the collector returned memory): no figure, not a wrapped one.
		{EntriesStats{Absent: 10, NoEntriesRSS: 5 << 20, AbsentRSS: 4 << 20}, 0},
	} {
		if got := c.es.PerEntry(); got != c.want {
			t.Errorf("%+v: PerEntry = %v, want %v", c.es, got, c.want)
		}
	}
}
