package k8s

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"testing"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/attestor"
	"github.com/lanyard-dev/lanyard/attestor/selector"
	"github.com/lanyard-dev/lanyard/conf"
	"github.com/lanyard-dev/lanyard/internal/testkit"
	corev1 "k8s.io/api/core/v1"
)

// testEnv is an attestor wired to a kubelet-shaped server, its credential
// files, and a /proc root of cgroup files written by the test.
type testEnv struct {
	t       testing.TB
	dir     string
	kubelet *fakeKubelet
	a       *Attestor
	logs    *testkit.Buffer
	env     map[string]string
}

const testToken = "token-of-spire-agent"

// newSecureEnv starts a kubelet with its secure port that accepts
// testToken for an agent allowed nodes/proxy, and builds an attestor for
// it from hcl (extra plugin_data keys).
func newSecureEnv(t testing.TB, hcl string) *testEnv {
	t.Helper()
	e := &testEnv{t: t, dir: t.TempDir(), env: map[string]string{}}
	e.kubelet = newFakeKubelet(t, kubeletOptions{dnsNames: []string{"node-a"}})
	e.kubelet.tokens[testToken] = "system:serviceaccount:spire:spire-agent"
	e.kubelet.allowed["system:serviceaccount:spire:spire-agent"] = true
	testkit.WritePEM(t, e.path("ca.crt"), "CERTIFICATE", e.kubelet.ca.Cert.Raw)
	e.writeToken(testToken)
	e.build(fmt.Sprintf("kubelet_secure_port = %d\nkubelet_ca_path = %q\ntoken_path = %q\n%s", e.kubelet.port(), e.path("ca.crt"), e.path("token"), hcl))
	return e
}

// newReadOnlyEnv is newSecureEnv for the read-only port.
func newReadOnlyEnv(t testing.TB, hcl string) *testEnv {
	t.Helper()
	e := &testEnv{t: t, dir: t.TempDir(), env: map[string]string{}}
	e.kubelet = newFakeKubelet(t, kubeletOptions{plain: true})
	e.build(fmt.Sprintf("kubelet_read_only_port = %d\n%s", e.kubelet.port(), hcl))
	return e
}

func (e *testEnv) path(name string) string { return filepath.Join(e.dir, name) }

// writeToken replaces the token file by rename, as a projected volume's
// rotation does.
func (e *testEnv) writeToken(token string) {
	testkit.ReplaceFile(e.t, e.path("token"), []byte(token+"\n"), os.Getuid(), 0o600)
}

func (e *testEnv) build(hcl string) {
	e.t.Helper()
	a, logs, err := e.tryBuild(hcl, nil)
	if err != nil {
		e.t.Fatalf("newAttestor: %v\nconfig:\n%s", err, hcl)
	}
	e.a, e.logs = a, logs
}

func (e *testEnv) tryBuild(hcl string, dial dialFunc) (*Attestor, *testkit.Buffer, error) {
	e.env["HOST_PROC"] = e.path("proc")
	return buildAttestor(hcl, e.env, dial)
}

func buildAttestor(hcl string, env map[string]string, dial dialFunc) (*Attestor, *testkit.Buffer, error) {
	sec, err := conf.NewSection("agent.conf", hcl)
	if err != nil {
		return nil, nil, err
	}
	log, logs := testkit.NewLogger(hclog.Debug)
	a, err := newAttestor(attestor.PluginConfig{Name: PluginName, Data: sec, Log: log}, func(k string) string { return env[k] }, dial)
	return a, logs, err
}

// redirectDial connects every kubelet address to the fake kubelet, so a
// node name needs no DNS.
func (e *testEnv) redirectDial() dialFunc {
	addr := e.kubelet.srv.Listener.Addr().String()
	return func(ctx context.Context, network, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, network, addr)
	}
}

// inPod writes the cgroup file of a process in container cid of pod uid
// (cgroup v1, cgroupfs driver, as the kubelet here lays it out) and
// returns its pid.
func (e *testEnv) inPod(pid int32, uid, cid string) attestor.Process {
	e.t.Helper()
	path := "/kubepods/burstable/pod" + uid + "/" + cid
	e.writeCgroup(pid, "12:memory:"+path+"\n11:pids:"+path+"\n0::/\n")
	return attestor.Process{PID: pid}
}

func (e *testEnv) writeCgroup(pid int32, content string) {
	e.t.Helper()
	dir := filepath.Join(e.path("proc"), strconv.Itoa(int(pid)))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		e.t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "cgroup"), []byte(content), 0o644); err != nil {
		e.t.Fatal(err)
	}
}

// containerOf is the runtime ID of pod's named container.
func containerOf(p corev1.Pod, name string) string {
	for _, l := range [][]corev1.ContainerStatus{p.Status.ContainerStatuses, p.Status.InitContainerStatuses, p.Status.EphemeralContainerStatuses} {
		for _, cs := range l {
			if cs.Name == name {
				id, _ := runtimeID(cs.ContainerID)
				return id
			}
		}
	}
	panic("no container " + name)
}

func (e *testEnv) attest(ctx context.Context, p attestor.Process) ([]string, error) {
	sels, err := e.a.Attest(ctx, p)
	return values(sels), err
}

func values(sels []selector.Selector) []string {
	out := make([]string, 0, len(sels))
	for _, s := range selector.Sort(sels) {
		out = append(out, s.String())
	}
	return out
}

func sorted(v ...string) []string {
	v = slices.Clone(v)
	slices.Sort(v)
	return slices.Compact(v)
}

// waiting is how many attestations wait on the pending fetch.
func (f *podLists) waiting() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.pending == nil {
		return 0
	}
	return f.pending.waiters
}

func (f *podLists) lastGood() *podList {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.current
}
