package k8stest

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

func (c *Cluster) startEtcd(port, peerPort int) (*daemon, error) {
	client := fmt.Sprintf("http://127.0.0.1:%d", port)
	peer := fmt.Sprintf("http://127.0.0.1:%d", peerPort)
	return c.startDaemon("etcd", "etcd",
		"--name=k8stest",
		"--data-dir="+filepath.Join(c.Dir, "etcd"),
		"--listen-client-urls="+client,
		"--advertise-client-urls="+client,
		"--listen-peer-urls="+peer,
		"--initial-advertise-peer-urls="+peer,
		"--initial-cluster=k8stest="+peer,
		"--log-level=warn",
	)
}

// containerdConfig is containerd's own config (REAL-COMPONENTS.md): its own
// root, state and socket; restrict_oom_score_adj because root here cannot
// lower oom_score_adj (without it every sandbox fails); cgroupfs, as the
// kubelet; our pause image; and a CNI config that only hostNetwork pods can
// use (see cniConfig).
const containerdConfig = `version = 2
root = "{{dir}}/containerd/root"
state = "{{dir}}/containerd/state"
# /opt/containerd is outside the cluster's dir; nothing here needs it.
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = "{{dir}}/containerd.sock"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{{pause}}"
  restrict_oom_score_adj = true
  # A host with AppArmor would need apparmor_parser and containerd's
  # profile loaded; the tests do not exercise AppArmor.
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{{dir}}/containerd/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{{dir}}/cni/bin"
    conf_dir = "{{dir}}/cni/conf"
`

// cniConfig makes the runtime report its network ready, so the node turns
// Ready, while no pod network exists: hostNetwork pods never call CNI, and
// any other pod fails with "failed to find plugin lanyard-hostnetwork-only".
const cniConfig = `{"cniVersion": "0.4.0", "name": "k8stest", "plugins": [{"type": "lanyard-hostnetwork-only"}]}`

func (c *Cluster) startContainerd() error {
	for _, d := range []string{"containerd", "cni/bin", "cni/conf"} {
		if err := os.MkdirAll(filepath.Join(c.Dir, d), 0o755); err != nil {
			return err
		}
	}
	if err := os.WriteFile(filepath.Join(c.Dir, "cni/conf/10-k8stest.conflist"), []byte(cniConfig), 0o644); err != nil {
		return err
	}
	config := strings.NewReplacer("{{dir}}", c.Dir, "{{pause}}", PauseImage).Replace(containerdConfig)
	path := filepath.Join(c.Dir, "containerd.toml")
	if err := os.WriteFile(path, []byte(config), 0o644); err != nil {
		return err
	}
	d, err := c.startDaemon("containerd", "containerd", "--config", path)
	if err != nil {
		return err
	}
	return d.waitUntil(startTimeout, "containerd serving "+c.ctrAddr, func(ctx context.Context) error {
		var dialer net.Dialer
		conn, err := dialer.DialContext(ctx, "unix", c.ctrAddr)
		if err != nil {
			return err
		}
		return conn.Close()
	})
}

// serviceAccountIssuer is the iss of the cluster's service account tokens.
const serviceAccountIssuer = "https://kubernetes.default.svc.cluster.local"

func (c *Cluster) startAPIServer(etcdPort, port int) error {
	p := c.pki
	d, err := c.startDaemon("kube-apiserver", filepath.Join(c.bin, "kube-apiserver"),
		fmt.Sprintf("--etcd-servers=http://127.0.0.1:%d", etcdPort),
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		"--secure-port="+strconv.Itoa(port),
		"--cert-dir="+filepath.Join(c.Dir, "apiserver"),
		"--tls-cert-file="+p.path(apiCertFile),
		"--tls-private-key-file="+p.path(apiKeyFile),
		"--client-ca-file="+p.path(clusterCAFile),
		"--token-auth-file="+p.path(tokensFile),
		"--service-account-issuer="+serviceAccountIssuer,
		"--service-account-key-file="+p.path(saPubFile),
		"--service-account-signing-key-file="+p.path(saKeyFile),
		"--service-cluster-ip-range=10.96.0.0/24",
		"--authorization-mode=RBAC",
		// No controller-manager runs to keep the kubernetes Service's
		// endpoints; nothing here reaches the API server through it.
		"--endpoint-reconciler-type=none",
		"--allow-privileged=true",
		"--profiling=false",
	)
	if err != nil {
		return err
	}
	c.api = newAPIClient(c.APIServer, p.path(clusterCAFile), p.adminToken)
	if err := d.waitUntil(startTimeout, "kube-apiserver ready", c.api.ready); err != nil {
		return err
	}
	return c.writeKubeconfig(c.Kubeconfig(), "k8stest-admin", p.adminToken)
}

// kubeletConfig is the KubeletConfiguration; see REAL-COMPONENTS.md for why
// each setting that differs from the defaults does.
func (c *Cluster) kubeletConfig(healthzPort int) map[string]any {
	p := c.pki
	return map[string]any{
		"apiVersion":               "kubelet.config.k8s.io/v1beta1",
		"kind":                     "KubeletConfiguration",
		"address":                  "127.0.0.1",
		"port":                     c.KubeletPort,
		"readOnlyPort":             c.KubeletReadOnlyPort,
		"healthzBindAddress":       "127.0.0.1",
		"healthzPort":              healthzPort,
		"tlsCertFile":              p.path(kubeletCertFile),
		"tlsPrivateKeyFile":        p.path(kubeletKeyFile),
		"containerRuntimeEndpoint": "unix://" + c.ctrAddr,
		"staticPodPath":            c.StaticPodDir,
		// Static pods appear within a second, not the default 20 s.
		"fileCheckFrequency": "1s",
		"podLogsDir":         c.podLogs,
		"volumePluginDir":    filepath.Join(c.Dir, "kubelet-volume-plugins"),
		"cgroupDriver":       "cgroupfs",
		"failSwapOn":         false,
		// The host's firewall is not the test's to change.
		"makeIPTablesUtilChains":        false,
		"enforceNodeAllocatable":        []string{},
		"localStorageCapacityIsolation": false,
		"evictionHard":                  map[string]string{},
		// Image GC would remove the imported images, which nothing can pull
		// again.
		"imageGCHighThresholdPercent": 100,
		"authentication": map[string]any{
			"anonymous": map[string]any{"enabled": false},
			// A TokenReview per request, so a test that changes RBAC sees
			// it at once.
			"webhook": map[string]any{"enabled": true, "cacheTTL": "0s"},
			"x509":    map[string]any{"clientCAFile": p.path(clusterCAFile)},
		},
		"authorization": map[string]any{
			"mode": "Webhook",
			"webhook": map[string]any{
				"cacheAuthorizedTTL":   "0s",
				"cacheUnauthorizedTTL": "0s",
			},
		},
	}
}

func (c *Cluster) startKubelet(healthzPort int) error {
	data, err := json.MarshalIndent(c.kubeletConfig(healthzPort), "", "  ")
	if err != nil {
		return err
	}
	config := filepath.Join(c.Dir, "kubelet.json")
	if err := os.WriteFile(config, data, 0o600); err != nil {
		return err
	}
	root := filepath.Join(c.Dir, "kubelet")
	c.kubelet, err = c.startDaemon("kubelet", filepath.Join(c.bin, "kubelet"),
		"--config="+config,
		"--kubeconfig="+c.Kubeconfig(),
		"--root-dir="+root,
		"--cert-dir="+filepath.Join(root, "pki"),
		"--hostname-override="+c.NodeName,
		"--node-ip=127.0.0.1",
	)
	return err
}

// waitNodeReady waits for the node's Ready condition, and records its UID.
func (c *Cluster) waitNodeReady() error {
	return c.kubelet.waitUntil(startTimeout, "node "+c.NodeName+" Ready", func(ctx context.Context) error {
		var node struct {
			Metadata struct {
				UID string `json:"uid"`
			} `json:"metadata"`
			Status struct {
				Conditions []struct {
					Type, Status, Message string
				} `json:"conditions"`
			} `json:"status"`
		}
		if err := c.api.do(ctx, "GET", "/api/v1/nodes/"+c.NodeName, nil, &node); err != nil {
			return err
		}
		for _, cond := range node.Status.Conditions {
			if cond.Type == "Ready" {
				if cond.Status != "True" {
					return fmt.Errorf("condition Ready is %s: %s", cond.Status, cond.Message)
				}
				c.nodeUID = node.Metadata.UID
				return nil
			}
		}
		return fmt.Errorf("no Ready condition yet")
	})
}
