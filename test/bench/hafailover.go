package bench

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"time"
)

const (
	// haFetchEvery is how often the failover's workloads fetch, each time
	// on a new connection, as a short-lived process would.
	haFetchEvery = 100 * time.Millisecond
	// haFailoverBound bounds one failover: four sync intervals.
	haFailoverBound = 4 * haSyncInterval
	// haPoll is how often the connections are read during a failover.
	haPoll = 50 * time.Millisecond
	// haRoundPause lets spire-agent reconnect to the restarted server
	// (gRPC's reconnect backoff, from 1 s) and both agents sync once
	// before the next kill.
	haRoundPause = 6 * time.Second
)

// haFailover kills the server the Lanyard agent uses, rounds times, with
// one agent of each kind on the pair and a workload fetching from each
// every 100 ms; per kill and agent it measures the time until the other
// server first answered the agent: the first growth of the bytes received
// on the agent's connections to it (a connection that did not exist before
// the kill counts from 0). The killed server is restarted after each
// round.
func (r *run) haFailover(c *haCluster) {
	tb := r.tb
	r.logf("HA failover: one agent of each kind, a workload fetching from each every %s", haFetchEvery)
	var agents []*haAgent
	for _, kind := range []string{NameLanyard, NameSpire} {
		agents = append(agents, c.startAgents(kind, r.cfg.LanyardBin, 1, "INFO")...)
		r.report.HA.Failover[kind] = &HAFailover{}
	}
	defer stopAgents(agents)
	lanyard := agents[0]
	// Both agents sync with the servers before the first kill.
	time.Sleep(haSettle + rand.N(haSyncInterval))

	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	workloads := make([]*haWorkload, len(agents))
	for i, a := range agents {
		workloads[i] = &haWorkload{}
		wg.Go(func() { workloads[i].run(ctx, a.socket) })
	}
	for round := range r.cfg.HAFailoverRounds {
		used := c.usedServer(lanyard)
		survivor := haServerIPs[0]
		if survivor == used {
			survivor = haServerIPs[1]
		}
		took, err := c.killAndWatch(used, survivor, agents)
		if err != nil {
			cancel()
			wg.Wait()
			tb.Fatalf("HA failover round %d: %v", round+1, err)
		}
		line := ""
		for i, a := range agents {
			f := r.report.HA.Failover[a.kind]
			f.Rounds = append(f.Rounds, took[i])
			line += fmt.Sprintf("  %s %s", a.kind, took[i].Round(time.Millisecond))
		}
		r.logf("HA failover round %d: killed %s, first answer from %s after:%s", round+1, used, survivor, line)
		c.servers[used].Start()
		// A random part, so that the kills fall at independent points of
		// the agents' sync periods.
		time.Sleep(haRoundPause + rand.N(haSyncInterval))
	}
	cancel()
	wg.Wait()
	for i, a := range agents {
		workloads[i].into(r.report.HA.Failover[a.kind])
	}
}

// usedServer waits until the agent holds connections to one server only,
// and returns it.
func (c *haCluster) usedServer(a *haAgent) string {
	deadline := time.Now().Add(haFailoverBound)
	for {
		conns, _, err := c.conns([]*haAgent{a})
		if err != nil {
			c.tb.Fatal(err)
		}
		if len(conns) == 1 {
			for ip := range conns {
				return ip
			}
		}
		if time.Now().After(deadline) {
			c.tb.Fatalf("%s does not use one server: connections %v", a.kind, conns)
		}
		time.Sleep(haPoll)
	}
}

// killAndWatch kills server dead and returns, per agent, how long after
// the kill survivor first answered it.
func (c *haCluster) killAndWatch(dead, survivor string, agents []*haAgent) ([]time.Duration, error) {
	to := netAddr{IP: survivor, Port: c.port}
	before, err := receivedFrom(to)
	if err != nil {
		return nil, err
	}
	c.servers[dead].Stop()
	killed := time.Now()
	took := make([]time.Duration, len(agents))
	left := len(agents)
	for left > 0 {
		if time.Since(killed) > haFailoverBound {
			return nil, fmt.Errorf("not every agent got an answer from %s within %s of the kill: %v", survivor, haFailoverBound, took)
		}
		time.Sleep(haPoll)
		now, err := receivedFrom(to)
		if err != nil {
			return nil, err
		}
		at := time.Since(killed)
		for i, a := range agents {
			if took[i] > 0 {
				continue
			}
			inodes, err := socketInodes(a.proc.PID)
			if err != nil {
				return nil, err
			}
			if answered(before, now, inodes) {
				took[i] = at
				left--
			}
		}
	}
	return took, nil
}

// answered reports whether one of inodes' connections received bytes
// between the two readings.
func answered(before, now map[string]uint64, inodes map[string]bool) bool {
	for ino, n := range now {
		if inodes[ino] && n > before[ino] {
			return true
		}
	}
	return false
}

// haWorkload fetches an X509-SVID every haFetchEvery, each time on a new
// connection.
type haWorkload struct {
	lat      []time.Duration
	failures int
	firstErr string
}

func (w *haWorkload) run(ctx context.Context, socket string) {
	tick := time.NewTicker(haFetchEvery)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		start := time.Now()
		err := fetchOnce(socket)
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			w.failures++
			if w.firstErr == "" {
				w.firstErr = time.Now().Format(time.TimeOnly) + ": " + err.Error()
			}
			continue
		}
		w.lat = append(w.lat, time.Since(start))
	}
}

func (w *haWorkload) into(f *HAFailover) {
	f.Fetches = len(w.lat) + w.failures
	f.Failed, f.FirstFailure = w.failures, w.firstErr
	f.Latency = PercentilesOf(w.lat)
}
