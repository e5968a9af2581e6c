// Package k8stest runs a real single-node Kubernetes for a test: etcd,
// kube-apiserver, containerd and a kubelet registered with the API server
// (and, with Options.ControlPlane, kube-controller-manager and
// kube-scheduler),
// each with its own data dir, socket and loopback ports, all stopped (and
// their pods, mounts and cgroups removed) when the test ends, even when it
// fails. The Kubernetes binaries come from test/k8s/build.sh, which builds
// them from a separate Go module, so this package never imports Kubernetes:
// it speaks JSON to the API server and the kubelet.
//
// It needs root. Outside CI a test without root skips; with CI=true any
// missing prerequisite fails the test.
//
// One cluster runs on a machine at a time (a file lock): kubelets share the
// /kubepods cgroups and would remove each other's pods.
package k8stest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/lanyard-dev/lanyard/internal/testkit"
)

const (
	// DefaultNodeName is the node's name unless Options say otherwise.
	DefaultNodeName = "lanyard-node"
	// PauseImage is every pod's sandbox image (test/k8s/pause).
	PauseImage = "lanyard.test/pause:1"
	// WorkloadImage is the test workload (test/k8s/workload).
	WorkloadImage = "lanyard.test/workload:1"
	// WorkloadImageAlias is a second tag of WorkloadImage's image: two names
	// of one digest, for the image selectors.
	WorkloadImageAlias = "lanyard.test/workload-alias:1"

	// dirPrefix names every cluster's data dir under os.TempDir(); Start
	// removes what a killed run left under it.
	dirPrefix = "lanyard-k8s-"
)

// Bounds of the waits; generous because the CI machine has 2 cores shared
// with other tests. A warm start takes about 15 s.
const (
	startTimeout = 90 * time.Second
	podTimeout   = 60 * time.Second
	stopTimeout  = 15 * time.Second
	pollEvery    = 100 * time.Millisecond
)

// Options change the cluster Start runs.
type Options struct {
	// NodeName is the node's name (DefaultNodeName when empty). The
	// kubelet's serving certificate names it, "localhost" and 127.0.0.1.
	NodeName string
	// KubeletPort is the kubelet's secure port; a free port when 0. The
	// kubelet's default, 10250, is what an unpatched agent.conf expects.
	KubeletPort int
	// ControlPlane also runs kube-controller-manager and kube-scheduler,
	// so that DaemonSets, Deployments and garbage collection work. Off by
	// default: without them a test's owner references are free text.
	ControlPlane bool
}

// Cluster is a running single-node cluster.
type Cluster struct {
	// NodeName is the node's name.
	NodeName string
	// Dir holds every daemon's data, config and logs.
	Dir string
	// APIServer is the kube-apiserver's URL (https://127.0.0.1:port).
	APIServer string
	// KubeletPort and KubeletReadOnlyPort are the kubelet's secure port
	// (webhook authn/authz: a token needs RBAC get on nodes/proxy) and its
	// unauthenticated read-only port, both on 127.0.0.1.
	KubeletPort, KubeletReadOnlyPort int
	// StaticPodDir is the kubelet's staticPodPath.
	StaticPodDir string

	t        testing.TB
	bin      string
	pki      *clusterPKI
	api      *apiClient
	daemons  []*daemon // in start order
	kubelet  *daemon
	ctrAddr  string // containerd's socket
	podLogs  string // the kubelet's podLogsDir
	nodeUID  string
	stopOnce sync.Once
	opts     Options
	// phases are the start's steps and when each ended, for the log.
	phases []string
	begin  time.Time
}

// Start runs a cluster for t and waits until its node is Ready; everything
// it started is stopped and removed when t ends.
func Start(t testing.TB, opts ...Options) *Cluster {
	t.Helper()
	var o Options
	if len(opts) > 0 {
		o = opts[0]
	}
	if o.NodeName == "" {
		o.NodeName = DefaultNodeName
	}
	bin := Binaries(t)
	begin := time.Now()
	holdMachineLock(t)
	if err := sweepStale(); err != nil {
		t.Fatalf("k8stest: removing what an earlier run left: %v", err)
	}
	dir, err := os.MkdirTemp("", dirPrefix)
	if err != nil {
		t.Fatal(err)
	}
	c := &Cluster{NodeName: o.NodeName, Dir: dir, t: t, bin: bin, begin: begin, opts: o}
	t.Cleanup(c.stop)
	c.StaticPodDir = filepath.Join(dir, "manifests")
	c.podLogs = filepath.Join(dir, "pod-logs")
	c.ctrAddr = filepath.Join(dir, "containerd.sock")
	for _, d := range []string{c.StaticPodDir, c.podLogs, filepath.Join(dir, "logs")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	c.pki = newClusterPKI(t, dir, o.NodeName)
	if err := c.run(); err != nil {
		// stop, run at cleanup, logs the daemons' last lines.
		t.Fatalf("k8stest: starting the cluster: %v", err)
	}
	t.Logf("k8stest: node %s Ready in %s (%s; data in %s)", c.NodeName,
		time.Since(begin).Round(100*time.Millisecond), strings.Join(c.phases, ", "), dir)
	return c
}

// run starts the daemons in dependency order, doing independent work at
// the same time: images build while etcd and containerd start.
func (c *Cluster) run() error {
	var imagesErr error
	imagesDone := make(chan struct{})
	go func() {
		imagesErr = c.buildImages()
		close(imagesDone)
	}()
	// Never leave a build writing into the dir that cleanup removes.
	defer func() { <-imagesDone }()

	ports, err := freePorts(6)
	if err != nil {
		return err
	}
	etcdPort, etcdPeer, apiPort := ports[0], ports[1], ports[2]
	c.KubeletPort, c.KubeletReadOnlyPort = ports[3], ports[4]
	if c.opts.KubeletPort != 0 {
		c.KubeletPort = c.opts.KubeletPort
	}
	healthzPort := ports[5]
	c.APIServer = fmt.Sprintf("https://127.0.0.1:%d", apiPort)

	c.phase("locked")
	etcd, err := c.startEtcd(etcdPort, etcdPeer)
	if err != nil {
		return err
	}
	if err := c.startContainerd(); err != nil {
		return err
	}
	c.phase("containerd")
	if err := etcd.waitTCP(fmt.Sprintf("127.0.0.1:%d", etcdPort)); err != nil {
		return err
	}
	c.phase("etcd")
	if err := c.startAPIServer(etcdPort, apiPort); err != nil {
		return err
	}
	c.phase("apiserver")
	<-imagesDone
	if imagesErr != nil {
		return fmt.Errorf("building the images: %w", imagesErr)
	}
	c.phase("images built")
	if err := c.importImages(); err != nil {
		return err
	}
	c.phase("imported")
	if err := c.bootstrap(); err != nil {
		return err
	}
	c.phase("bootstrap")
	if c.opts.ControlPlane {
		if err := c.startControlPlane(); err != nil {
			return err
		}
		c.phase("control plane")
	}
	if err := c.startKubelet(healthzPort); err != nil {
		return err
	}
	if err := c.waitNodeReady(); err != nil {
		return err
	}
	c.phase("node Ready")
	return nil
}

// phase records that a step of the start ended, and when.
func (c *Cluster) phase(name string) {
	c.phases = append(c.phases, fmt.Sprintf("%s %.1fs", name, time.Since(c.begin).Seconds()))
}

// buildOnce readies the binaries once per test binary.
var buildOnce = sync.OnceValues(buildBinaries)

// Binaries returns the dir holding kubelet, kube-apiserver, kube-controller-manager, kube-scheduler and mkimage,
// building them via build.sh if needed (which also installs containerd,
// runc and etcd from Debian). The build runs once per test binary; build.sh
// serializes concurrent builds itself. Without root it skips the test
// (fails it under CI).
func Binaries(t testing.TB) string {
	t.Helper()
	testkit.RequireRoot(t, "k8stest runs a kubelet and containerd")
	dir, err := buildOnce()
	if err != nil {
		t.Fatalf("k8stest: readying the Kubernetes binaries: %v", err)
	}
	return dir
}

func buildBinaries() (string, error) {
	k8sDir, err := findK8sDir()
	if err != nil {
		return "", err
	}
	dir, err := testkit.RunBuildScript(filepath.Join(k8sDir, "build.sh"),
		"kubelet", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "mkimage")
	if err != nil {
		return "", err
	}
	for _, name := range []string{"containerd", "containerd-shim-runc-v2", "ctr", "runc", "etcd"} {
		if _, err := exec.LookPath(name); err != nil {
			return "", fmt.Errorf("build.sh ran but %s is not in PATH: %w", name, err)
		}
	}
	return dir, nil
}

// findK8sDir locates test/k8s: the build script and the images' sources.
func findK8sDir() (string, error) {
	script, err := testkit.RepoFile("test/k8s/build.sh")
	return filepath.Dir(script), err
}

// holdMachineLock makes this test the machine's only cluster until it ends.
func holdMachineLock(t testing.TB) {
	t.Helper()
	path := filepath.Join(os.TempDir(), "lanyard-k8stest.lock")
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatalf("k8stest: opening %s: %v", path, err)
	}
	// Blocks while another test's cluster runs; go test's -timeout bounds it.
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		f.Close()
		t.Fatalf("k8stest: locking %s: %v", path, err)
	}
	// Registered first, so it runs last: after the cluster is gone.
	t.Cleanup(func() { f.Close() })
}

// stop kills every daemon and removes their pods, mounts, cgroups and data.
func (c *Cluster) stop() {
	c.stopOnce.Do(func() {
		if c.t.Failed() {
			c.t.Logf("k8stest: the test failed; daemon logs:%s", c.logTails())
		}
		begin := time.Now()
		// Kubelet first, so that nobody restarts what is killed next.
		for i := len(c.daemons) - 1; i >= 0; i-- {
			c.daemons[i].kill()
		}
		if err := sweep(c.Dir); err != nil {
			c.t.Errorf("k8stest: cleaning up %s: %v", c.Dir, err)
			return
		}
		c.t.Logf("k8stest: cluster stopped and removed in %s", time.Since(begin).Round(10*time.Millisecond))
	})
}

// logTails is the end of every daemon's log, for a failure message.
func (c *Cluster) logTails() string {
	var b strings.Builder
	for _, d := range c.daemons {
		data, err := os.ReadFile(d.logPath)
		if err != nil {
			continue
		}
		fmt.Fprintf(&b, "\n--- %s (%s), last lines:\n%s", d.name, d.logPath, tailString(string(data), 4<<10))
	}
	return b.String()
}

func tailString(s string, n int) string {
	if len(s) <= n {
		return s
	}
	s = s[len(s)-n:]
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = s[i+1:]
	}
	return s
}
