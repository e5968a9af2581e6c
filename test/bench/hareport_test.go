package bench

import (
	"errors"
	"strings"
	"testing"
	"time"
)

func haLoadOf(conns map[string]int, idle, rss uint64) *HALoad {
	l := &HALoad{Agents: 50, Conns: conns, AgentsOn: conns, ServerIdleRSS: map[string]uint64{}, ServerRSS: map[string]uint64{}}
	for _, ip := range haServerIPs {
		l.ServerIdleRSS[ip], l.ServerRSS[ip] = idle, rss
	}
	return l
}

func TestHAChecks(t *testing.T) {
	r := &Report{HA: newHAStats()}
	r.HA.Servers = 2
	r.HA.Load[NameLanyard] = haLoadOf(map[string]int{"127.0.0.2": 27, "127.0.0.3": 23}, 90e6, 95e6)
	r.HA.Load[NameSpire] = haLoadOf(map[string]int{"127.0.0.2": 50, "127.0.0.3": 50}, 90e6, 100e6)
	ms := time.Millisecond
	r.HA.Failover[NameLanyard] = &HAFailover{Rounds: []time.Duration{4 * time.Second, time.Second, 2 * time.Second}, AfterDue: []time.Duration{20 * ms, 30 * ms, 10 * ms}, Fetches: 400}
	r.HA.Failover[NameSpire] = &HAFailover{Rounds: []time.Duration{3 * time.Second, time.Second, 5 * time.Second}, AfterDue: []time.Duration{-100 * ms, 400 * ms, 50 * ms}, Fetches: 400}
	r.checkHA()
	if len(r.Checks) != 5 || len(r.Missed()) != 0 {
		t.Fatalf("want 5 targets met, got %+v", r.Checks)
	}
	if l := r.HA.Load[NameLanyard]; l.TotalConns() != 50 || l.MaxConns() != 27 || l.ServerGrowth() != 10e6 {
		t.Errorf("lanyard: total %d, max %d, growth %d", l.TotalConns(), l.MaxConns(), l.ServerGrowth())
	}

	// Every agent on one server, a failed fetch, a failover slower than a
	// sync interval and than spire-agent's: all missed but the RSS.
	r.HA.Load[NameLanyard].Conns = map[string]int{"127.0.0.2": 50}
	r.HA.Failover[NameLanyard].Failed = 1
	r.HA.Failover[NameLanyard].Rounds[0] = haSyncInterval + 2*time.Second
	r.HA.Failover[NameLanyard].AfterDue = []time.Duration{200 * ms, 300 * ms, 2 * time.Second}
	r.Checks = nil
	r.checkHA()
	if got := len(r.Missed()); got != 4 {
		t.Errorf("want 3 targets missed, got %+v", r.Checks)
	}

	var b strings.Builder
	r.HA.writeTable(&b)
	for _, want := range []string{
		"50 agents: connections, all servers",
		"50 agents: connections to 127.0.0.3",
		"failover, 3 kills: to other server median (s)",
		"failover, 3 kills: failed fetches",
	} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("the table has no %q:\n%s", want, b.String())
		}
	}
}

func TestHATableWithoutLoad(t *testing.T) {
	// -ha-agents 0: failover only.
	h := newHAStats()
	h.Failover[NameLanyard] = &HAFailover{Rounds: []time.Duration{time.Second}}
	h.Failover[NameSpire] = &HAFailover{Rounds: []time.Duration{time.Second}}
	var b strings.Builder
	h.writeTable(&b)
	if strings.Contains(b.String(), "agents:") || !strings.Contains(b.String(), "failover, 1 kills") {
		t.Errorf("unexpected table:\n%s", b.String())
	}
}

func TestSummarizeFetches(t *testing.T) {
	t0 := time.Date(2026, 11, 30, 21, 0, 0, 0, time.UTC)
	at := func(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }
	fetches := []haFetch{
		{at: at(0), lat: 2 * time.Millisecond},
		{at: at(100), lat: 3 * time.Millisecond},  // in the window
		{at: at(200), lat: 40 * time.Millisecond}, // in the window
		{at: at(300), lat: 5 * time.Millisecond, err: errors.New("rpc error: code = Unavailable")},
		{at: at(400), lat: 90 * time.Millisecond}, // the window has closed
	}
	var f HAFailover
	summarize(fetches, []haWindow{{at(100), at(300)}}, &f)
	if f.Fetches != 5 || f.Failed != 1 || !strings.Contains(f.FirstFailure, "Unavailable") {
		t.Errorf("fetches %d, failed %d (%q)", f.Fetches, f.Failed, f.FirstFailure)
	}
	if f.FetchesDuringFailover != 2 || f.DuringFailover.Max != 40*time.Millisecond {
		t.Errorf("during the failover: %d fetches, %+v", f.FetchesDuringFailover, f.DuringFailover)
	}
	if f.Latency.Max != 90*time.Millisecond || f.Latency.P50 != 3*time.Millisecond {
		t.Errorf("all fetches: %+v", f.Latency)
	}
}
