package bench

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/lanyard-dev/lanyard/test/spire/spiretest"
	corev1 "k8s.io/api/core/v1"
)

// The Kubernetes burst: many new workloads attest at once on a node whose
// kubelet lists many pods. Each workload is a process the harness puts in
// the cgroup a kubelet would give its container
// (.../kubepods/besteffort/pod<uid>/<container id>, cgroupfs driver), and a
// kubelet-shaped server lists its pod among the others. As a kubelet does,
// it lists a new pod's container ID only some time after the container
// started (its status is refreshed by the kubelet's PLEG relist, every
// second): the burst's pods are listed as being created when their
// processes connect, and their container IDs show up spread over
// burstSpread. Both agents run the k8s workload attestor against their
// own such server, with SPIRE's config keys.

const (
	// k8sNodeID is the node alias of the burst's agents: they sync only
	// the burst's entries, not the earlier workloads'.
	k8sNodeID = "spiffe://example.org/bench/k8s-node"
	// burstBound bounds one burst, from the go to the last SVID.
	burstBound = 2 * time.Minute
	// burstSpread is how long after the go the kubelet lists the last
	// container ID, in burstSteps steps.
	burstSpread = time.Second
	burstSteps  = 10
)

// K8sBurstStats is one agent's figures for the burst.
type K8sBurstStats struct {
	Workloads       int         `json:"workloads"`
	Pods            int         `json:"pods"`
	KubeletRequests int64       `json:"kubelet_requests"`
	KubeletBytes    int64       `json:"kubelet_bytes"`
	RSSBefore       uint64      `json:"rss_before_bytes"`
	PeakRSS         uint64      `json:"peak_rss_bytes"`
	TimeToSVID      Percentiles `json:"time_to_svid"`
	Denied          int         `json:"denied"` // PermissionDenied answers before the SVIDs
}

// PeakGrowth is how far the burst raised the agent's RSS.
func (s *K8sBurstStats) PeakGrowth() uint64 {
	if s.PeakRSS < s.RSSBefore {
		return 0
	}
	return s.PeakRSS - s.RSSBefore
}

// k8sPlugins is the plugins block of both agents: unix for the harness's
// own readiness probe, k8s on the kubelet's read-only port.
func k8sPlugins(kubeletPort int) string {
	return strings.TrimSuffix(spiretest.AgentPlugins, "}\n") + fmt.Sprintf(`    WorkloadAttestor "k8s" {
        plugin_data {
            kubelet_read_only_port = %d
        }
    }
}
`, kubeletPort)
}

func (r *run) k8sBurstWorkload() {
	tb, cfg := r.tb, r.cfg
	root, err := cgroup2Root()
	if err != nil {
		r.logf("skipping the Kubernetes burst: %v", err)
		return
	}
	for _, a := range r.agents {
		a.Stop()
	}
	r.agents = nil

	// One extra workload warms each agent up (its entries synced, its
	// kubelet client started) before the burst is measured.
	works := make([]podWorkload, cfg.K8sBurst+1)
	entries := []spiretest.Entry{{SPIFFEID: workloadID, ParentID: k8sNodeID, Selectors: []string{"unix:uid:" + strconv.Itoa(os.Getuid())}}}
	for i := range works {
		works[i] = newPodWorkload(i)
		entries = append(entries, spiretest.Entry{
			SPIFFEID: fmt.Sprintf("spiffe://example.org/bench/k8s/%d", i), ParentID: k8sNodeID,
			Selectors: []string{"k8s:ns:" + works[i].Namespace, "k8s:sa:" + works[i].ServiceAccount},
		})
	}
	// The kubelet lists the burst's pods only once they start, as it
	// would: an agent's earlier pod list does not have them.
	warmPods := benchPods(cfg.K8sPods-cfg.K8sBurst, works[cfg.K8sBurst:])
	timeline := burstTimeline(benchPods(cfg.K8sBurst, works[:cfg.K8sBurst]), warmPods)
	dirs, err := placeCgroups(root, works)
	tb.Cleanup(func() { removeCgroups(dirs) })
	if err != nil {
		tb.Fatalf("making the workloads' cgroups: %v", err)
	}
	r.logf("creating %d registration entries by k8s selectors", len(entries))
	r.createEntries(entries)
	// The server's entry cache must hold them before the agents attest.
	time.Sleep(r.entriesSyncWait())

	for _, name := range []string{NameLanyard, NameSpire} {
		k, err := startKubelet(warmPods)
		if err != nil {
			tb.Fatal(err)
		}
		tb.Cleanup(k.close)
		token := r.spire.JoinToken(tb, k8sNodeID)
		var a Target
		if name == NameLanyard {
			a = startLanyardWith(tb, r.cfg.LanyardBin, r.spire, token, k8sPlugins(k.port))
		} else {
			a = startSPIREAgent(tb, r.spire, token, spiretest.WithAgentPlugins(k8sPlugins(k.port)))
		}
		if _, err := r.burst(a, works[len(works)-1:], dirs[len(dirs)-1:], nil); err != nil {
			tb.Fatalf("%s: the warm-up workload: %v", name, err)
		}
		k.reset()
		s := &K8sBurstStats{Workloads: cfg.K8sBurst, Pods: cfg.K8sPods}
		if err := a.Proc.ResetPeak(); err != nil {
			tb.Fatalf("%s: resetting the peak RSS: %v", name, err)
		}
		s.RSSBefore = a.rss(tb)
		took, err := r.burst(a, works[:cfg.K8sBurst], dirs[:cfg.K8sBurst], func() error {
			return k.setTimeline(burstSpread/burstSteps, timeline...)
		})
		if err != nil {
			tb.Fatalf("%s: %v", name, err)
		}
		if s.PeakRSS, err = a.Proc.PeakRSS(); err != nil {
			tb.Fatalf("%s: peak RSS: %v", name, err)
		}
		s.KubeletRequests, s.KubeletBytes = k.counts()
		s.TimeToSVID = PercentilesOf(took.times)
		s.Denied = took.denied
		r.report.K8sBurst[name] = s
		r.logf("%s: %d workloads at once, %d pods listed: %d kubelet requests (%s), RSS %s -> peak %s, time to SVID p50 %s p99 %s, %d PermissionDenied first",
			name, s.Workloads, s.Pods, s.KubeletRequests, mb(uint64(s.KubeletBytes)), mb(s.RSSBefore), mb(s.PeakRSS), ms(s.TimeToSVID.P50), ms(s.TimeToSVID.P99), s.Denied)
		a.Stop()
		k.close()
	}
}

type burstResult struct {
	times  []time.Duration
	denied int
}

// burstTimeline is the node's pod lists from the burst's start: the burst's
// pods first all being created, then their containers listed a few more at
// each step, with the other pods throughout.
func burstTimeline(burstPods, others []corev1.Pod) [][]corev1.Pod {
	lists := make([][]corev1.Pod, 0, burstSteps+1)
	for step := range burstSteps + 1 {
		started := len(burstPods) * step / burstSteps
		list := make([]corev1.Pod, 0, len(burstPods)+len(others))
		for i, p := range burstPods {
			if i >= started {
				p = creating(p)
			}
			list = append(list, p)
		}
		lists = append(lists, append(list, others...))
	}
	return lists
}

// burst starts one process per workload, each in its cgroup and waiting,
// calls begin (if not nil), lets them all fetch at once from a, and
// returns when each has its X509-SVID.
func (r *run) burst(a Target, works []podWorkload, dirs []string, begin func() error) (burstResult, error) {
	kids := make([]*child, len(works))
	for i := range works {
		c, err := r.exe.start(roleFirstFetch, firstFetchArgs{Socket: a.Socket, WaitGo: true}, -1, -1)
		if err != nil {
			return burstResult{}, err
		}
		r.tb.Cleanup(c.stop)
		kids[i] = c
		if line, err := c.line(30 * time.Second); err != nil || line != "ready" {
			return burstResult{}, fmt.Errorf("workload %d did not start: %q %v", i, line, err)
		}
		if err := os.WriteFile(filepath.Join(dirs[i], "cgroup.procs"), []byte(strconv.Itoa(c.cmd.Process.Pid)), 0); err != nil {
			return burstResult{}, fmt.Errorf("moving workload %d into its cgroup: %w", i, err)
		}
	}
	if begin != nil {
		if err := begin(); err != nil {
			return burstResult{}, err
		}
	}
	t0 := time.Now()
	for i, c := range kids {
		if _, err := c.stdin.Write([]byte("go\n")); err != nil {
			return burstResult{}, fmt.Errorf("starting workload %d: %w", i, err)
		}
	}
	var res burstResult
	for i, c := range kids {
		line, err := c.line(burstBound)
		if err != nil {
			return res, fmt.Errorf("workload %d: %w", i, err)
		}
		var ff FirstFetch
		if err := json.Unmarshal([]byte(line), &ff); err != nil || ff.Err != "" {
			return res, fmt.Errorf("workload %d said %q", i, line)
		}
		res.times = append(res.times, time.Unix(0, ff.AtUnixNano).Sub(t0))
		res.denied += ff.Denied
	}
	return res, nil
}

// cgroup2Root is where the unified cgroup hierarchy is mounted: /sys/fs/cgroup
// on a cgroup v2 host, /sys/fs/cgroup/unified on a hybrid one.
func cgroup2Root() (string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// ID parent major:minor root mountpoint options... - fstype source
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		fields := strings.Fields(pre)
		if ok && strings.HasPrefix(post, "cgroup2 ") && len(fields) >= 5 && fields[3] == "/" {
			return fields[4], nil
		}
	}
	if err := sc.Err(); err != nil {
		return "", err
	}
	return "", errors.New("no cgroup2 hierarchy is mounted")
}

// benchCgroup is the parent of the burst's cgroups. A kubelet running on
// the machine (the k8s tests') removes pod cgroups under /kubepods that it
// does not know; below a parent of their own, as on a node whose kubelet
// runs in a container (kind), the paths still read as a pod's.
const benchCgroup = "lanyard-bench"

// placeCgroups makes the container cgroup of each workload, as the
// kubelet's cgroupfs driver names it for a BestEffort pod.
func placeCgroups(root string, works []podWorkload) ([]string, error) {
	var dirs []string
	for _, w := range works {
		d := filepath.Join(root, benchCgroup, "kubepods", "besteffort", "pod"+string(w.UID), w.ContainerID)
		if err := os.MkdirAll(d, 0o755); err != nil {
			return dirs, err
		}
		dirs = append(dirs, d)
	}
	return dirs, nil
}

// removeCgroups removes the container and pod cgroups once their
// processes have exited, then their parents.
func removeCgroups(dirs []string) {
	for _, d := range dirs {
		for range 100 {
			if err := os.Remove(d); err == nil || os.IsNotExist(err) {
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
		_ = os.Remove(filepath.Dir(d))
	}
	if len(dirs) > 0 {
		besteffort := filepath.Dir(filepath.Dir(dirs[0]))
		kubepods := filepath.Dir(besteffort)
		_ = os.Remove(besteffort)
		_ = os.Remove(kubepods)
		_ = os.Remove(filepath.Dir(kubepods))
	}
}
