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
	// haSlowFetch: slower fetches are logged with their time, to be
	// matched with the kills and restarts.
	haSlowFetch = 100 * time.Millisecond
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
		a, _ := c.startAgents(kind, r.cfg.LanyardBin, 1, "INFO")
		agents = append(agents, a...)
		r.report.HA.Failover[kind] = &HAFailover{}
	}
	defer stopAgents(agents)
	lanyard := agents[0]
	// Both agents sync with the servers before the first kill.
	time.Sleep(haSettle + rand.N(haSyncInterval))

	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	workloads := make([]*haWorkload, len(agents))
	windows := make([][]haWindow, len(agents))
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
		k, err := c.killAndWatch(used, survivor, agents)
		if err != nil {
			cancel()
			wg.Wait()
			tb.Fatalf("HA failover round %d: %v", round+1, err)
		}
		line := ""
		for i, a := range agents {
			f := r.report.HA.Failover[a.kind]
			f.Rounds = append(f.Rounds, k.took[i])
			windows[i] = append(windows[i], haWindow{k.at, k.at.Add(k.took[i])})
			line += fmt.Sprintf("  %s %s", a.kind, k.took[i].Round(time.Millisecond))
			if k.due[i] >= 0 {
				f.AfterDue = append(f.AfterDue, k.took[i]-k.due[i])
				line += fmt.Sprintf(" (%s after its sync was due)", (k.took[i] - k.due[i]).Round(time.Millisecond))
			}
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
		summarize(workloads[i].fetches, windows[i], r.report.HA.Failover[a.kind])
		for _, x := range workloads[i].fetches {
			if x.lat > haSlowFetch {
				r.logf("HA failover: %s: a fetch at %s took %s", a.kind, x.at.Format("15:04:05.000"), x.lat.Round(time.Millisecond))
			}
		}
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

// haKill is one kill's readings, per agent.
type haKill struct {
	at time.Time
	// took is how long after the kill the survivor first answered.
	took []time.Duration
	// due is how long after the kill the agent's next sync was due: one
	// sync_interval after a server last answered it (both agents time
	// their syncs from the end of the last one), or -1 when unknown.
	due []time.Duration
}

// killAndWatch kills server dead and watches the agents' connections to
// survivor until it answered every agent.
func (c *haCluster) killAndWatch(dead, survivor string, agents []*haAgent) (*haKill, error) {
	k := &haKill{took: make([]time.Duration, len(agents)), due: make([]time.Duration, len(agents))}
	to := []string{"dst", netAddr{IP: survivor, Port: c.port}.String()}
	before, err := sockets(to...)
	if err != nil {
		return nil, err
	}
	all, err := sockets("dport", "=", fmt.Sprintf(":%d", c.port))
	if err != nil {
		return nil, err
	}
	inodes := make([]map[string]bool, len(agents))
	for i, a := range agents {
		if inodes[i], err = socketInodes(a.proc.PID); err != nil {
			return nil, err
		}
		k.due[i] = -1
		if last, ok := lastAnswer(all, inodes[i]); ok {
			k.due[i] = max(0, haSyncInterval-last)
		}
	}
	c.servers[dead].Stop()
	k.at = time.Now()
	left := len(agents)
	for left > 0 {
		if time.Since(k.at) > haFailoverBound {
			return nil, fmt.Errorf("not every agent got an answer from %s within %s of the kill: %v", survivor, haFailoverBound, k.took)
		}
		time.Sleep(haPoll)
		now, err := sockets(to...)
		if err != nil {
			return nil, err
		}
		at := time.Since(k.at)
		for i, a := range agents {
			if k.took[i] > 0 {
				continue
			}
			// New connections since the kill count too.
			if inodes[i], err = socketInodes(a.proc.PID); err != nil {
				return nil, err
			}
			if answered(before, now, inodes[i]) {
				k.took[i] = at
				left--
			}
		}
	}
	return k, nil
}

// answered reports whether one of inodes' connections received bytes
// between the two readings.
func answered(before, now map[string]ssSocket, inodes map[string]bool) bool {
	for ino, n := range now {
		if inodes[ino] && n.Received > before[ino].Received {
			return true
		}
	}
	return false
}

// lastAnswer is how long ago a server last sent the agent data, on any of
// inodes' connections (false: none shows).
func lastAnswer(socks map[string]ssSocket, inodes map[string]bool) (time.Duration, bool) {
	last, ok := time.Duration(0), false
	for ino, s := range socks {
		if inodes[ino] && s.LastData >= 0 && (!ok || s.LastData < last) {
			last, ok = s.LastData, true
		}
	}
	return last, ok
}

// haWorkload fetches an X509-SVID every haFetchEvery, each time on a new
// connection.
type haWorkload struct {
	fetches []haFetch
}

type haFetch struct {
	at  time.Time
	lat time.Duration
	err error
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
		w.fetches = append(w.fetches, haFetch{at: start, lat: time.Since(start), err: err})
	}
}

// haWindow is one failover: from the kill to the agent's first answer
// from the other server.
type haWindow struct{ from, to time.Time }

// summarize puts the fetches' figures into f: failures over the whole
// section, latencies over it and over the failover windows alone.
func summarize(fetches []haFetch, windows []haWindow, f *HAFailover) {
	var all, during []time.Duration
	for _, x := range fetches {
		f.Fetches++
		if x.err != nil {
			f.Failed++
			if f.FirstFailure == "" {
				f.FirstFailure = x.at.Format(time.TimeOnly) + ": " + x.err.Error()
			}
			continue
		}
		all = append(all, x.lat)
		for _, w := range windows {
			if !x.at.Before(w.from) && x.at.Before(w.to) {
				during = append(during, x.lat)
				break
			}
		}
	}
	f.Latency, f.DuringFailover = PercentilesOf(all), PercentilesOf(during)
	f.FetchesDuringFailover = len(during)
}
