package kubernetes_test

import (
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	k8sattestor "github.com/lanyard-dev/lanyard/plugins/workloadattestor/k8s"

	"github.com/lanyard-dev/lanyard/conf"
	"github.com/lanyard-dev/lanyard/internal/testkit"
	k8spsat "github.com/lanyard-dev/lanyard/plugins/nodeattestor/k8s_psat"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// The conventions other manifests rely on.
const (
	namespace     = "spire"
	image         = "ghcr.io/lanyard-dev/lanyard"
	socketHostDir = "/run/spire/agent-sockets" // SPIRE's: workloads and the SPIFFE CSI driver mount it
	tokenAudience = "spire-server"             // what SPIRE Server's k8s_psat expects by default
	nodeNameEnv   = "MY_NODE_NAME"             // the k8s attestor's node_name_env default
	// The agent's stop takes the Workload API's drain (cmd/lanyard
	// shutdownGrace, 5 s) and the HTTP listeners' (1 s), then a save.
	agentStopSeconds = 6
)

func renderAll(t *testing.T) []*manifests {
	t.Helper()
	var all []*manifests
	for _, dir := range kustomizations {
		m, err := render(dir)
		if err != nil {
			t.Fatal(err)
		}
		all = append(all, m)
	}
	return all
}

// checkAgentConfOf parses and builds m's agent.conf as `lanyard validate`
// does.
func checkAgentConfOf(t *testing.T, m *manifests) *conf.Config {
	t.Helper()
	name, data, err := m.agentConf()
	if err != nil {
		t.Fatal(err)
	}
	bundle := filepath.Join(t.TempDir(), "bundle.crt")
	testkit.WritePEM(t, bundle, "CERTIFICATE", testkit.NewCA(t, "").Cert.Raw)
	cfg, err := checkAgentConf(name, data, bundle)
	if err != nil {
		t.Fatalf("the agent would refuse this config:\n%v", err)
	}
	return cfg
}

// Every object decodes strictly (render), and sits in SPIRE's namespace.
// The spire overlay leaves the Namespace object to the SPIRE deployment
// that owns it, so that deleting the overlay does not delete the server.
func TestKustomizationsRenderStrictly(t *testing.T) {
	for _, m := range renderAll(t) {
		switch ownsNamespace := m.dir != "overlays/spire"; {
		case ownsNamespace && (m.namespace == nil || m.namespace.Name != namespace):
			t.Errorf("%s: no Namespace %q", m.dir, namespace)
		case !ownsNamespace && m.namespace != nil:
			t.Errorf("%s: creates Namespace %q, which belongs to the SPIRE deployment", m.dir, m.namespace.Name)
		}
		objects := []metav1.Object{m.account, m.daemonSet}
		for _, cm := range m.configMaps {
			objects = append(objects, cm)
		}
		for _, o := range objects {
			if o.GetNamespace() != namespace {
				t.Errorf("%s: %s is in namespace %q, not %q", m.dir, o.GetName(), o.GetNamespace(), namespace)
			}
		}
	}
}

// The ClusterRole grants what the kubelet's secure port asks of the k8s
// attestor's token, to the DaemonSet's service account, and nothing else.
func TestRBACIsNodesProxyGetOnly(t *testing.T) {
	for _, m := range renderAll(t) {
		want := []string{"get"}
		if len(m.role.Rules) != 1 || !slices.Equal(m.role.Rules[0].Resources, []string{"nodes/proxy"}) ||
			!slices.Equal(m.role.Rules[0].Verbs, want) || !slices.Equal(m.role.Rules[0].APIGroups, []string{""}) {
			t.Errorf("%s: ClusterRole rules %+v, want get on nodes/proxy only", m.dir, m.role.Rules)
		}
		if m.binding.RoleRef.Kind != "ClusterRole" || m.binding.RoleRef.Name != m.role.Name {
			t.Errorf("%s: the binding refers to %+v, not ClusterRole %q", m.dir, m.binding.RoleRef, m.role.Name)
		}
		sa := m.daemonSet.Spec.Template.Spec.ServiceAccountName
		if sa != m.account.Name || len(m.binding.Subjects) != 1 ||
			m.binding.Subjects[0].Kind != "ServiceAccount" || m.binding.Subjects[0].Name != sa || m.binding.Subjects[0].Namespace != namespace {
			t.Errorf("%s: the binding's subjects %+v are not the DaemonSet's service account %s/%s", m.dir, m.binding.Subjects, namespace, sa)
		}
	}
}

// The pod spec gives the agent what attestation and a rollout need.
func TestDaemonSetPod(t *testing.T) {
	for _, m := range renderAll(t) {
		spec := m.daemonSet.Spec.Template.Spec
		if !spec.HostPID {
			t.Errorf("%s: hostPID is off: callers' PIDs would not be visible", m.dir)
		}
		if !spec.HostNetwork || spec.DNSPolicy != corev1.DNSClusterFirstWithHostNet {
			t.Errorf("%s: hostNetwork %v, dnsPolicy %q; want the node's network with cluster DNS", m.dir, spec.HostNetwork, spec.DNSPolicy)
		}
		if spec.PriorityClassName != "system-node-critical" {
			t.Errorf("%s: priorityClassName %q", m.dir, spec.PriorityClassName)
		}
		if g := spec.TerminationGracePeriodSeconds; g == nil || *g <= agentStopSeconds {
			t.Errorf("%s: terminationGracePeriodSeconds is not above the agent's %d s stop", m.dir, agentStopSeconds)
		}
		s := m.daemonSet.Spec.UpdateStrategy
		if s.Type != "RollingUpdate" || s.RollingUpdate == nil ||
			!isInt(s.RollingUpdate.MaxUnavailable, 1) || !isInt(s.RollingUpdate.MaxSurge, 0) {
			t.Errorf("%s: updateStrategy %+v, want RollingUpdate, maxUnavailable 1, maxSurge 0 (one agent per socket)", m.dir, s)
		}
		c, err := m.container()
		if err != nil {
			t.Fatal(err)
		}
		checkImage(t, m, c)
		checkSecurityContext(t, m.dir, c.SecurityContext)
		checkResources(t, m.dir, c.Resources)
		var nodeName *corev1.EnvVar
		for i := range c.Env {
			if c.Env[i].Name == nodeNameEnv {
				nodeName = &c.Env[i]
			}
		}
		if nodeName == nil || nodeName.ValueFrom == nil || nodeName.ValueFrom.FieldRef == nil || nodeName.ValueFrom.FieldRef.FieldPath != "spec.nodeName" {
			t.Errorf("%s: %s is not set from the downward API's spec.nodeName: %+v", m.dir, nodeNameEnv, nodeName)
		}
		checkTokenProjection(t, m, c)
	}
}

func checkImage(t *testing.T, m *manifests, c *corev1.Container) {
	t.Helper()
	name, tag, _ := strings.Cut(c.Image, ":")
	if name != image || (m.dir != "base" && tag == "") {
		t.Errorf("%s: image %q, want %s with the overlay's tag", m.dir, c.Image, image)
	}
	if c.ImagePullPolicy != corev1.PullIfNotPresent {
		t.Errorf("%s: imagePullPolicy %q: a locally imported image needs IfNotPresent", m.dir, c.ImagePullPolicy)
	}
}

func checkSecurityContext(t *testing.T, dir string, sc *corev1.SecurityContext) {
	t.Helper()
	switch {
	case sc == nil:
		t.Errorf("%s: no securityContext", dir)
	case sc.Privileged != nil && *sc.Privileged:
		t.Errorf("%s: privileged", dir)
	case sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation:
		t.Errorf("%s: allowPrivilegeEscalation is not false", dir)
	case sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem:
		t.Errorf("%s: the root filesystem is writable", dir)
	case sc.Capabilities == nil || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}):
		t.Errorf("%s: capabilities %+v do not drop ALL", dir, sc.Capabilities)
	case len(sc.Capabilities.Add) > 0:
		// docs/deploy-kubernetes.md says why none is needed; a change
		// here must change it there.
		t.Errorf("%s: capabilities added back: %v", dir, sc.Capabilities.Add)
	}
}

func checkResources(t *testing.T, dir string, r corev1.ResourceRequirements) {
	t.Helper()
	reqMem, limMem := r.Requests[corev1.ResourceMemory], r.Limits[corev1.ResourceMemory]
	// The idle RSS measured in docs/performance.md: a request below it
	// would undercount what the agent takes of its node from the start.
	idle := resource.MustParse("25M")
	if reqMem.Cmp(idle) < 0 || limMem.Cmp(reqMem) < 0 || r.Requests.Cpu().IsZero() {
		t.Errorf("%s: resources %+v: want a CPU request and a memory request above the idle RSS (%s), within the limit", dir, r, idle.String())
	}
	if _, ok := r.Limits[corev1.ResourceCPU]; ok {
		t.Errorf("%s: a CPU limit throttles attestation bursts after a rollout", dir)
	}
}

// The projected token is where k8s_psat reads it by default, for the
// audience SPIRE Server checks.
func checkTokenProjection(t *testing.T, m *manifests, c *corev1.Container) {
	t.Helper()
	mount, rel := mountFor(c, k8spsat.DefaultTokenPath)
	vol := (*corev1.Volume)(nil)
	if mount != nil {
		vol = m.volume(mount.Name)
	}
	if vol == nil || vol.Projected == nil {
		t.Errorf("%s: no projected volume holds %s", m.dir, k8spsat.DefaultTokenPath)
		return
	}
	for _, src := range vol.Projected.Sources {
		if tok := src.ServiceAccountToken; tok != nil && tok.Path == rel {
			if tok.Audience != tokenAudience {
				t.Errorf("%s: the token's audience is %q, want %q", m.dir, tok.Audience, tokenAudience)
			}
			return
		}
	}
	t.Errorf("%s: volume %q projects no service account token at %q", m.dir, vol.Name, rel)
}

func isInt(v *intstr.IntOrString, want int) bool {
	return v != nil && v.Type == intstr.Int && v.IntValue() == want
}

// The DaemonSet and the agent.conf it mounts agree: the socket in SPIRE's
// host directory, data_dir on the host, probes on the health listener.
func TestDaemonSetMatchesAgentConf(t *testing.T) {
	for _, m := range renderAll(t) {
		cfg := checkAgentConfOf(t, m)
		c, err := m.container()
		if err != nil {
			t.Fatal(err)
		}
		socketDir := path.Dir(cfg.Agent.SocketPath)
		if v := hostPathAt(t, m, c, socketDir, false); v != nil && v.Path != socketHostDir {
			t.Errorf("%s: the socket directory %s is host directory %s, not SPIRE's %s", m.dir, socketDir, v.Path, socketHostDir)
		}
		hostPathAt(t, m, c, cfg.Agent.DataDir, true)
		if p := cfg.Agent.TrustBundlePath; p != "" {
			if mount, _ := mountFor(c, p); mount == nil {
				t.Errorf("%s: trust_bundle_path %s is not mounted", m.dir, p)
			}
		}
		checkProbes(t, m.dir, c, cfg.HealthChecks)
	}
}

// hostPathAt returns the hostPath volume mounted writable at dir (or, with
// below, at a directory above it), and reports an error when there is none.
func hostPathAt(t *testing.T, m *manifests, c *corev1.Container, dir string, below bool) *corev1.HostPathVolumeSource {
	t.Helper()
	mount, rel := mountFor(c, dir)
	switch {
	case mount == nil:
		t.Errorf("%s: %s is not mounted", m.dir, dir)
		return nil
	case rel != "" && !below:
		t.Errorf("%s: %s is below mount %s, not a mount of its own", m.dir, dir, mount.MountPath)
		return nil
	}
	vol := m.volume(mount.Name)
	if vol == nil || vol.HostPath == nil || mount.ReadOnly {
		t.Errorf("%s: %s is not a writable hostPath mount", m.dir, dir)
		return nil
	}
	return vol.HostPath
}

func checkProbes(t *testing.T, dir string, c *corev1.Container, hc conf.HealthChecks) {
	t.Helper()
	if !hc.ListenerEnabled || (hc.BindAddress != "0.0.0.0" && hc.BindAddress != "") {
		t.Errorf("%s: health_checks listener_enabled %v on %q: the kubelet probes the node's address", dir, hc.ListenerEnabled, hc.BindAddress)
	}
	for _, p := range []struct {
		kind  string
		probe *corev1.Probe
		path  string
	}{{"liveness", c.LivenessProbe, hc.LivePath}, {"readiness", c.ReadinessProbe, hc.ReadyPath}} {
		if p.probe == nil || p.probe.HTTPGet == nil {
			t.Errorf("%s: no HTTP %s probe", dir, p.kind)
			continue
		}
		get := p.probe.HTTPGet
		if port := probePort(c, get.Port); get.Path != p.path || port != hc.BindPort {
			t.Errorf("%s: the %s probe asks port %d for %s; health_checks serves %s on %d", dir, p.kind, port, get.Path, p.path, hc.BindPort)
		}
	}
}

// probePort resolves a probe's port, by number or by the container port's name.
func probePort(c *corev1.Container, port intstr.IntOrString) int {
	if port.Type == intstr.Int {
		return port.IntValue()
	}
	for _, p := range c.Ports {
		if p.Name == port.StrVal {
			return int(p.ContainerPort)
		}
	}
	return 0
}

// The local overlay works on a fresh cluster with no edits: the embedded
// CA, the k8s attestor, and an entry for the default service account.
func TestLocalOverlayHasExampleEntry(t *testing.T) {
	m, err := render("overlays/local")
	if err != nil {
		t.Fatal(err)
	}
	cfg := checkAgentConfOf(t, m)
	if cfg.Agent.ServerAddress != "" {
		t.Errorf("server_address %q: the local overlay needs no SPIRE Server", cfg.Agent.ServerAddress)
	}
	var local localUpstreamEntries
	if ok, err := pluginData(cfg, "UpstreamAuthority", "local", &local); !ok || err != nil {
		t.Fatalf("no UpstreamAuthority \"local\" with entries (%v)", err)
	}
	want := []string{"k8s:ns:default", "k8s:sa:default"}
	if len(local.Entries) == 0 || local.Entries[0].SPIFFEID != "spiffe://example.org/ns/default/sa/default" ||
		!slices.Equal(local.Entries[0].Selectors, want) {
		t.Errorf("entries %+v, want spiffe://example.org/ns/default/sa/default for %v", local.Entries, want)
	}
	if ok, _ := pluginData(cfg, "WorkloadAttestor", k8sAttestor, &k8sattestor.Config{}); !ok {
		t.Error("WorkloadAttestor \"k8s\" is not enabled")
	}
}

// localUpstreamEntries is the local overlay's UpstreamAuthority
// plugin_data: its entries, and no other key.
type localUpstreamEntries struct {
	Entries []struct {
		SPIFFEID  string   `hcl:"spiffe_id"`
		Selectors []string `hcl:"selectors"`
	} `hcl:"entry"`
}

// The spire overlay attests with k8s_psat, reading the projected token,
// to the server that server-address.yaml names.
func TestSpireOverlayAttestsWithK8sPSAT(t *testing.T) {
	m, err := render("overlays/spire")
	if err != nil {
		t.Fatal(err)
	}
	cfg := checkAgentConfOf(t, m)
	if cfg.Agent.ServerAddress == "" || cfg.Agent.TrustBundlePath == "" {
		t.Errorf("server_address %q, trust_bundle_path %q: want both", cfg.Agent.ServerAddress, cfg.Agent.TrustBundlePath)
	}
	var psat struct {
		Cluster   string `hcl:"cluster"`
		TokenPath string `hcl:"token_path"`
	}
	if ok, err := pluginData(cfg, "NodeAttestor", "k8s_psat", &psat); !ok || err != nil {
		t.Fatalf("no NodeAttestor \"k8s_psat\" (%v)", err)
	}
	if psat.TokenPath != "" && psat.TokenPath != k8spsat.DefaultTokenPath {
		t.Errorf("k8s_psat token_path %s: the DaemonSet projects the token at %s", psat.TokenPath, k8spsat.DefaultTokenPath)
	}
	if ok, _ := pluginData(cfg, "WorkloadAttestor", k8sAttestor, &k8sattestor.Config{}); !ok {
		t.Error("WorkloadAttestor \"k8s\" is not enabled")
	}
}

// A field the API does not have fails the render, wherever it is.
func TestUnknownFieldFails(t *testing.T) {
	dir := overlayOnBase(t, map[string]string{
		"kustomization.yaml": "resources: [base]\npatches:\n  - path: typo.yaml\n",
		"typo.yaml": "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: lanyard, namespace: spire}\n" +
			"spec:\n  template:\n    spec:\n      hostPid: true\n",
	})
	_, err := render(dir)
	if err == nil || !strings.Contains(err.Error(), "hostPid") {
		t.Fatalf("a DaemonSet with hostPid (for hostPID) rendered with %v; want a strict decoding error", err)
	}
}

// A typo in an overlay's agent.conf fails the test, as it would fail the
// agent's start.
func TestAgentConfTypoFails(t *testing.T) {
	good, err := os.ReadFile("overlays/local/agent.conf")
	if err != nil {
		t.Fatal(err)
	}
	bad := strings.Replace(string(good), "trust_domain", "trust_domian", 1)
	dir := overlayOnBase(t, map[string]string{
		"kustomization.yaml": "resources: [base]\nconfigMapGenerator:\n  - name: lanyard\n    behavior: replace\n    files: [agent.conf]\n",
		"agent.conf":         bad,
	})
	m, err := render(dir)
	if err != nil {
		t.Fatal(err)
	}
	name, data, err := m.agentConf()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := checkAgentConf(name, data, ""); err == nil || !strings.Contains(err.Error(), "trust_domian") {
		t.Fatalf("an agent.conf with trust_domian was accepted (%v)", err)
	}
}

// overlayOnBase writes an overlay of files beside a copy of base in a
// temporary directory, and returns the overlay's directory.
func overlayOnBase(t *testing.T, files map[string]string) string {
	t.Helper()
	root := t.TempDir()
	if err := os.CopyFS(filepath.Join(root, "overlay", "base"), os.DirFS("base")); err != nil {
		t.Fatal(err)
	}
	for name, text := range files {
		if err := os.WriteFile(filepath.Join(root, "overlay", name), []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return filepath.Join(root, "overlay")
}
