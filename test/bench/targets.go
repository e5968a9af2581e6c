package bench

import (
	"fmt"
	"time"
)

// The targets of issue 5, checked on every run.
const (
	minFloorThroughput = 0.90 // of the floor's, on every fetch workload
	maxFloorP99        = 1.20 // of the floor's p99
	maxIdleRSS         = 25e6 // bytes
	maxStreamsRSS      = 0.5  // of spire-agent's, holding the open streams
	maxEntriesRSS      = 1.0 / 3
	maxRotationSpread  = 50 * time.Millisecond
	maxNewWorkload     = time.Second
	// Of spire-agent's, in the Kubernetes burst (issue 10).
	maxBurstKubeletRequests = 0.5
	maxBurstPeakGrowth      = 0.5
)

// Check is one target, met or not.
type Check struct {
	Name   string `json:"name"`
	Met    bool   `json:"met"`
	Detail string `json:"detail"`
}

func (r *Report) addCheck(name string, met bool, format string, args ...any) {
	r.Checks = append(r.Checks, Check{Name: name, Met: met, Detail: fmt.Sprintf(format, args...)})
}

// check compares the figures with the targets.
func (r *Report) check() {
	r.Checks = nil
	for _, row := range r.Fetch {
		l, f := row.Targets[NameLanyard], row.Targets[NameFloor]
		if l == nil || f == nil || f.Throughput == 0 {
			continue
		}
		p := fmt.Sprintf("%s c=%d", row.Kind, row.Clients)
		tr := l.Throughput / f.Throughput
		r.addCheck(p+" throughput >= 90% of the floor's", tr >= minFloorThroughput,
			"%.0f/s vs %.0f/s (%.0f%%)", l.Throughput, f.Throughput, 100*tr)
		pr := float64(l.Latency.P99) / float64(f.Latency.P99)
		r.addCheck(p+" p99 within 20% of the floor's", pr <= maxFloorP99,
			"%s vs %s (%+.0f%%)", ms(l.Latency.P99), ms(f.Latency.P99), 100*(pr-1))
		if l.Errors > 0 {
			r.addCheck(p+" no errors", false, "%d errors, first: %s", l.Errors, l.FirstErr)
		}
	}
	if idle, ok := r.Idle[NameLanyard]; ok {
		r.addCheck("idle RSS <= 25 MB", idle <= maxIdleRSS, "%s", mb(idle))
	}
	ls, ss := r.Streams[NameLanyard], r.Streams[NameSpire]
	if ls != nil && ss != nil && len(ls.Rounds) > 0 && len(ss.Rounds) > 0 {
		r.addCheck(fmt.Sprintf("RSS with %d streams <= half of spire-agent's", ls.Streams),
			float64(ls.RSS) <= maxStreamsRSS*float64(ss.RSS), "%s vs %s (%.2fx)", mb(ls.RSS), mb(ss.RSS), float64(ls.RSS)/float64(ss.RSS))
		r.addCheck(fmt.Sprintf("rotation reaches all %d streams within 50 ms of the first", ls.Streams),
			ls.Spread <= maxRotationSpread, "spread %s (spire-agent %s)", ms(ls.Spread), ms(ss.Spread))
	}
	le, se := r.Entries[NameLanyard], r.Entries[NameSpire]
	if le != nil && se != nil && le.Entries > 0 {
		r.addCheck(fmt.Sprintf("RSS with %d entries <= a third of spire-agent's", le.Entries),
			float64(le.RSS) <= maxEntriesRSS*float64(se.RSS), "%s vs %s (%.2fx)", mb(le.RSS), mb(se.RSS), float64(le.RSS)/float64(se.RSS))
	}
	// SPIRE Server serves agents from an entry cache it reloads every 5 s
	// by default, which hides a new entry from every agent for up to that
	// long; the target is read where the server's cache is fresh, so that
	// it measures the agent.
	lf, sf := r.FreshProbe[NameLanyard], r.FreshProbe[NameSpire]
	if lf != nil && sf != nil && len(lf.NewWorkload) > 0 {
		nw := maxDur(lf.NewWorkload)
		r.addCheck(fmt.Sprintf("a workload connecting right after its entry was created has its SVID within 1 s (agents at default settings, spire-server cache reload %s)", r.Config.FreshServerReload),
			nw <= maxNewWorkload, "slowest %s (spire-agent %s)",
			nw.Round(time.Millisecond), maxDur(sf.NewWorkload).Round(time.Millisecond))
	}
	lk, sk := r.K8sBurst[NameLanyard], r.K8sBurst[NameSpire]
	if lk != nil && sk != nil {
		p := fmt.Sprintf("k8s burst of %d workloads, %d pods:", lk.Workloads, lk.Pods)
		r.addCheck(p+" kubelet requests <= half of spire-agent's", float64(lk.KubeletRequests) <= maxBurstKubeletRequests*float64(sk.KubeletRequests),
			"%d vs %d", lk.KubeletRequests, sk.KubeletRequests)
		r.addCheck(p+" peak RSS growth <= half of spire-agent's", float64(lk.PeakGrowth()) <= maxBurstPeakGrowth*float64(sk.PeakGrowth()),
			"%s vs %s", mb(lk.PeakGrowth()), mb(sk.PeakGrowth()))
		r.addCheck(p+" time to SVID p99 no worse than spire-agent's", lk.TimeToSVID.P99 <= sk.TimeToSVID.P99,
			"%s vs %s", ms(lk.TimeToSVID.P99), ms(sk.TimeToSVID.P99))
	}
	r.checkHA()
}

// Missed lists the targets not met.
func (r *Report) Missed() []Check {
	var out []Check
	for _, c := range r.Checks {
		if !c.Met {
			out = append(out, c)
		}
	}
	return out
}
