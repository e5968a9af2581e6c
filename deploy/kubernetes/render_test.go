// Package kubernetes_test renders the kustomizations shipped in this
// directory, as `kubectl apply -k` would, and checks what they would
// create: every object decodes strictly into its k8s.io/api type, the
// DaemonSet agrees with the agent.conf it mounts, and that agent.conf is
// one the agent accepts.
package kubernetes_test

import (
	"fmt"
	"os"
	"sort"
	"strings"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/conf"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"

	// The plugins the lanyard binary compiles in (cmd/lanyard/main.go),
	// so that agent.Check builds the configs as `lanyard validate` does.
	_ "github.com/lanyard-dev/lanyard/plugins/builtin"
)

// The kustomizations we ship, relative to this directory.
var kustomizations = []string{"base", "overlays/local", "overlays/spire"}

// manifests is what one kustomization renders to, decoded.
type manifests struct {
	dir        string
	namespace  *corev1.Namespace
	account    *corev1.ServiceAccount
	role       *rbacv1.ClusterRole
	binding    *rbacv1.ClusterRoleBinding
	configMaps map[string]*corev1.ConfigMap
	daemonSet  *appsv1.DaemonSet
}

// strictDecoder decodes YAML into the k8s.io/api types and fails on any
// field the type does not have, on a field written twice, and on a field
// whose case differs from the API's (hostPid), as the API server's strict
// field validation does.
var strictDecoder = func() runtime.Decoder {
	scheme := runtime.NewScheme()
	for _, add := range []func(*runtime.Scheme) error{corev1.AddToScheme, appsv1.AddToScheme, rbacv1.AddToScheme} {
		if err := add(scheme); err != nil {
			panic(err)
		}
	}
	return serializer.NewCodecFactory(scheme, serializer.EnableStrict).UniversalDeserializer()
}()

// render runs kustomize on dir (a directory on disk) and decodes every
// object it produces. It returns an error for a kind Lanyard does not ship,
// for a second object of a kind there should be one of, and for a missing
// one (the Namespace may be missing).
func render(dir string) (*manifests, error) {
	k := krusty.MakeKustomizer(krusty.MakeDefaultOptions())
	resMap, err := k.Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		return nil, fmt.Errorf("kustomize build %s: %w", dir, err)
	}
	m := &manifests{dir: dir, configMaps: map[string]*corev1.ConfigMap{}}
	for _, res := range resMap.Resources() {
		text, err := res.AsYAML()
		if err != nil {
			return nil, fmt.Errorf("%s: %s %q: %w", dir, res.GetKind(), res.GetName(), err)
		}
		obj, _, err := strictDecoder.Decode(text, nil, nil)
		if err != nil {
			return nil, fmt.Errorf("%s: %s %q: %w", dir, res.GetKind(), res.GetName(), err)
		}
		if err := m.add(obj); err != nil {
			return nil, fmt.Errorf("%s: %w", dir, err)
		}
	}
	if m.account == nil || m.role == nil || m.binding == nil || m.daemonSet == nil || len(m.configMaps) != 1 {
		return nil, fmt.Errorf("%s: want a ServiceAccount, ClusterRole, ClusterRoleBinding, DaemonSet and one ConfigMap; ConfigMaps: %v", dir, sortedKeys(m.configMaps))
	}
	return m, nil
}

func (m *manifests) add(obj runtime.Object) error {
	switch o := obj.(type) {
	case *corev1.Namespace:
		return setOnce(&m.namespace, o)
	case *corev1.ServiceAccount:
		return setOnce(&m.account, o)
	case *rbacv1.ClusterRole:
		return setOnce(&m.role, o)
	case *rbacv1.ClusterRoleBinding:
		return setOnce(&m.binding, o)
	case *appsv1.DaemonSet:
		return setOnce(&m.daemonSet, o)
	case *corev1.ConfigMap:
		m.configMaps[o.Name] = o
		return nil
	}
	return fmt.Errorf("unexpected object %T", obj)
}

// setOnce fills a slot for a kind there should be one object of.
func setOnce[T any](slot **T, obj *T) error {
	if *slot != nil {
		return fmt.Errorf("two objects of type %T", obj)
	}
	*slot = obj
	return nil
}

// container returns the DaemonSet's agent container.
func (m *manifests) container() (*corev1.Container, error) {
	if m.daemonSet == nil {
		return nil, fmt.Errorf("%s renders no DaemonSet", m.dir)
	}
	cs := m.daemonSet.Spec.Template.Spec.Containers
	if len(cs) != 1 || cs[0].Name != "lanyard" {
		return nil, fmt.Errorf("%s: the DaemonSet should have one container, lanyard; it has %d", m.dir, len(cs))
	}
	return &cs[0], nil
}

// agentConf returns the agent.conf the DaemonSet starts with, as the agent
// reads it: from the ConfigMap mounted where -config points, with the
// container's environment expanded when the agent runs with -expandEnv.
func (m *manifests) agentConf() (name string, data []byte, err error) {
	c, err := m.container()
	if err != nil {
		return "", nil, err
	}
	path, expand := flagValue(c.Args, "-config"), hasFlag(c.Args, "-expandEnv")
	if path == "" {
		return "", nil, fmt.Errorf("%s: the agent runs without -config (args %q)", m.dir, c.Args)
	}
	cm, key, err := m.configMapFile(c, path)
	if err != nil {
		return "", nil, err
	}
	name = m.dir + ": ConfigMap " + cm.Name + ": " + key
	text := cm.Data[key]
	if !expand {
		return name, []byte(text), nil
	}
	env := containerEnv(c)
	var missing []string
	text = os.Expand(text, func(v string) string {
		value, ok := env[v]
		if !ok {
			missing = append(missing, v)
		}
		return value
	})
	if len(missing) > 0 {
		return "", nil, fmt.Errorf("%s uses variables the container does not set: %s", name, strings.Join(missing, ", "))
	}
	return name, []byte(text), nil
}

// configMapFile finds the ConfigMap key that the container sees at path.
func (m *manifests) configMapFile(c *corev1.Container, path string) (*corev1.ConfigMap, string, error) {
	mount, rel := mountFor(c, path)
	if mount == nil {
		return nil, "", fmt.Errorf("%s: nothing is mounted at %s", m.dir, path)
	}
	vol := m.volume(mount.Name)
	if vol == nil || vol.ConfigMap == nil {
		return nil, "", fmt.Errorf("%s: %s is not in a ConfigMap volume", m.dir, path)
	}
	cm := m.configMaps[vol.ConfigMap.Name]
	if cm == nil {
		return nil, "", fmt.Errorf("%s: the DaemonSet mounts ConfigMap %q, which the kustomization does not create", m.dir, vol.ConfigMap.Name)
	}
	if _, ok := cm.Data[rel]; !ok {
		return nil, "", fmt.Errorf("%s: ConfigMap %q has no key %q for %s", m.dir, cm.Name, rel, path)
	}
	return cm, rel, nil
}

func (m *manifests) volume(name string) *corev1.Volume {
	for i, v := range m.daemonSet.Spec.Template.Spec.Volumes {
		if v.Name == name {
			return &m.daemonSet.Spec.Template.Spec.Volumes[i]
		}
	}
	return nil
}

// mountFor returns the container's mount that holds path (the deepest one)
// and path relative to it.
func mountFor(c *corev1.Container, path string) (*corev1.VolumeMount, string) {
	var best *corev1.VolumeMount
	for i, vm := range c.VolumeMounts {
		dir := strings.TrimSuffix(vm.MountPath, "/")
		if (path == dir || strings.HasPrefix(path, dir+"/")) && (best == nil || len(dir) > len(best.MountPath)) {
			best = &c.VolumeMounts[i]
		}
	}
	if best == nil {
		return nil, ""
	}
	return best, strings.TrimPrefix(strings.TrimPrefix(path, strings.TrimSuffix(best.MountPath, "/")), "/")
}

// containerEnv is the container's environment as the agent would see it;
// values from the downward API get a stand-in.
func containerEnv(c *corev1.Container) map[string]string {
	env := map[string]string{}
	for _, e := range c.Env {
		switch {
		case e.ValueFrom != nil:
			env[e.Name] = "node-from-downward-api"
		default:
			env[e.Name] = e.Value
		}
	}
	return env
}

func flagValue(args []string, flag string) string {
	for i, a := range args {
		if a == flag && i+1 < len(args) {
			return args[i+1]
		}
		if v, ok := strings.CutPrefix(a, flag+"="); ok {
			return v
		}
	}
	return ""
}

func hasFlag(args []string, flag string) bool {
	for _, a := range args {
		if a == flag || a == flag+"=true" {
			return true
		}
	}
	return false
}

// checkAgentConf parses an agent.conf and builds every plugin it names, as
// `lanyard validate` does. The SPIRE upstream reads trust_bundle_path
// then, a file the SPIRE Server publishes in the cluster: bundle, when not
// empty, stands in for it.
func checkAgentConf(name string, data []byte, bundle string) (*conf.Config, error) {
	cfg, err := conf.Parse(name, data)
	if err != nil {
		return nil, err
	}
	inCluster := cfg.Agent.TrustBundlePath
	if inCluster != "" && bundle != "" {
		cfg.Agent.TrustBundlePath = bundle
	}
	if err := agent.Check(cfg, hclog.NewNullLogger()); err != nil {
		return nil, err
	}
	cfg.Agent.TrustBundlePath = inCluster
	return cfg, nil
}

// k8sAttestor is the name of the k8s workload attestor.
const k8sAttestor = "k8s"

// pluginData decodes the plugin_data of the enabled plugin typ "name" of
// cfg into v; it reports false when cfg has no such plugin.
func pluginData(cfg *conf.Config, typ, name string, v any) (bool, error) {
	for _, p := range cfg.Plugins {
		if p.Type == typ && p.Name == name && p.Enabled {
			return true, p.Data.Decode(v)
		}
	}
	return false, nil
}

// sortedKeys returns m's keys in order, for stable messages.
func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
