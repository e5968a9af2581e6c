package bench

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// kubelet serves what a kubelet's read-only port serves at /pods: the
// node's pod list, generated from the API's own types, and counts what
// the agents read.
type kubelet struct {
	srv      *http.Server
	port     int
	list     atomic.Pointer[podTimeline]
	requests atomic.Int64
	bytes    atomic.Int64
}

// podTimeline is a pod list that changes with time: lists[i] is served from
// start+i*step on, the last one for good.
type podTimeline struct {
	start time.Time
	step  time.Duration
	lists [][]byte
}

func (t *podTimeline) now() []byte {
	i := 0
	if t.step > 0 {
		i = min(int(time.Since(t.start)/t.step), len(t.lists)-1)
	}
	return t.lists[i]
}

func startKubelet(pods []corev1.Pod) (*kubelet, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	k := &kubelet{port: ln.Addr().(*net.TCPAddr).Port}
	if err := k.setTimeline(0, pods); err != nil {
		ln.Close()
		return nil, err
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /pods", func(w http.ResponseWriter, _ *http.Request) {
		k.requests.Add(1)
		body := k.list.Load().now()
		w.Header().Set("Content-Type", "application/json")
		n, _ := w.Write(body)
		k.bytes.Add(int64(n))
	})
	k.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = k.srv.Serve(ln) }()
	return k, nil
}

// setTimeline serves the pod lists one after the other, step apart, from
// now on.
func (k *kubelet) setTimeline(step time.Duration, lists ...[]corev1.Pod) error {
	t := &podTimeline{step: step}
	for _, pods := range lists {
		b, err := json.Marshal(corev1.PodList{TypeMeta: metav1.TypeMeta{Kind: "PodList", APIVersion: "v1"}, Items: pods})
		if err != nil {
			return err
		}
		t.lists = append(t.lists, b)
	}
	t.start = time.Now()
	k.list.Store(t)
	return nil
}

// counts returns the requests and bytes served since the last reset.
func (k *kubelet) counts() (requests, bytes int64) { return k.requests.Load(), k.bytes.Load() }

func (k *kubelet) reset() { k.requests.Store(0); k.bytes.Store(0) }

func (k *kubelet) close() { _ = k.srv.Close() }

// benchNode is the node name of every pod the bench lists.
const benchNode = "bench-node"

// podWorkload is a pod of the burst: its UID and container ID are those of
// the cgroup the harness puts its process in.
type podWorkload struct {
	Namespace, Name, ServiceAccount string
	UID                             types.UID
	ContainerID                     string // 64 hex
}

func newPodWorkload(i int) podWorkload {
	return podWorkload{
		Namespace:      "bench",
		Name:           fmt.Sprintf("burst-%d", i),
		ServiceAccount: fmt.Sprintf("burst-%d", i),
		UID:            types.UID(uuid()),
		ContainerID:    randomHex(32),
	}
}

// benchPods is a node's pod list of total pods: the burst's workloads and
// others shaped like a busy node's (Deployments of two containers with
// labels, env, probes and annotations, as the kubelet lists them).
func benchPods(total int, workloads []podWorkload) []corev1.Pod {
	pods := make([]corev1.Pod, 0, total)
	for _, w := range workloads {
		p := fillerPod(len(pods))
		p.Namespace, p.Name, p.UID = w.Namespace, w.Name, w.UID
		p.Spec.ServiceAccountName = w.ServiceAccount
		p.Status.ContainerStatuses[0].ContainerID = "containerd://" + w.ContainerID
		pods = append(pods, p)
	}
	for len(pods) < total {
		pods = append(pods, fillerPod(len(pods)))
	}
	return pods
}

// creating is p as the kubelet lists it before its container started: the
// pod admitted, its container still being created, no container ID yet.
func creating(p corev1.Pod) corev1.Pod {
	p.Status.Phase = corev1.PodPending
	p.Status.Conditions = nil
	statuses := make([]corev1.ContainerStatus, len(p.Status.ContainerStatuses))
	for i, cs := range p.Status.ContainerStatuses {
		statuses[i] = corev1.ContainerStatus{Name: cs.Name, Image: cs.Image,
			State: corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: "ContainerCreating"}}}
	}
	p.Status.ContainerStatuses = statuses
	return p
}

func fillerPod(i int) corev1.Pod {
	ns := fmt.Sprintf("team-%d", i%10)
	app := fmt.Sprintf("svc-%d", i%40)
	hash := randomHex(5)[:10]
	name := fmt.Sprintf("%s-%s-%s", app, hash, randomHex(3)[:5])
	started := metav1.NewTime(time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC))
	image := fmt.Sprintf("registry.example.com/%s/%s:v1.%d.0", ns, app, i%7)
	digest := "sha256:" + randomHex(32)
	env := make([]corev1.EnvVar, 0, 8)
	for j := range 8 {
		env = append(env, corev1.EnvVar{Name: fmt.Sprintf("SETTING_%d", j), Value: fmt.Sprintf("value-%d-%d", i, j)})
	}
	app1 := corev1.Container{
		Name: "app", Image: image, Env: env,
		Ports:          []corev1.ContainerPort{{Name: "http", ContainerPort: 8080, Protocol: corev1.ProtocolTCP}},
		ReadinessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/ready", Port: intstr.FromInt32(8080)}}},
		VolumeMounts:   []corev1.VolumeMount{{Name: "spire-agent-socket", MountPath: "/run/spire/sockets", ReadOnly: true}},
	}
	sidecar := corev1.Container{Name: "proxy", Image: "registry.example.com/mesh/proxy:v2.3.1"}
	status := func(c corev1.Container, imageID string) corev1.ContainerStatus {
		return corev1.ContainerStatus{
			Name: c.Name, Image: c.Image, ImageID: imageID, Ready: true,
			ContainerID: "containerd://" + randomHex(32),
			State:       corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: started}},
		}
	}
	return corev1.Pod{
		TypeMeta: metav1.TypeMeta{Kind: "Pod", APIVersion: "v1"},
		ObjectMeta: metav1.ObjectMeta{
			Name: name, Namespace: ns, UID: types.UID(uuid()),
			Labels:      map[string]string{"app": app, "pod-template-hash": hash, "team": ns, "tier": "backend"},
			Annotations: map[string]string{"kubernetes.io/config.seen": started.Format(time.RFC3339Nano), "kubernetes.io/config.source": "api", "prometheus.io/scrape": "true"},
			OwnerReferences: []metav1.OwnerReference{{
				APIVersion: "apps/v1", Kind: "ReplicaSet", Name: app + "-" + hash, UID: types.UID(uuid()),
			}},
			CreationTimestamp: started,
		},
		Spec: corev1.PodSpec{
			NodeName:           benchNode,
			ServiceAccountName: app,
			Containers:         []corev1.Container{app1, sidecar},
			Volumes: []corev1.Volume{{Name: "spire-agent-socket", VolumeSource: corev1.VolumeSource{
				HostPath: &corev1.HostPathVolumeSource{Path: "/run/spire/agent-sockets"},
			}}},
		},
		Status: corev1.PodStatus{
			Phase: corev1.PodRunning, QOSClass: corev1.PodQOSBestEffort,
			HostIP: "10.0.0.1", PodIP: fmt.Sprintf("10.1.%d.%d", i/250, i%250+1), StartTime: &started,
			Conditions: []corev1.PodCondition{
				{Type: corev1.PodReady, Status: corev1.ConditionTrue, LastTransitionTime: started},
				{Type: corev1.ContainersReady, Status: corev1.ConditionTrue, LastTransitionTime: started},
			},
			ContainerStatuses: []corev1.ContainerStatus{status(app1, digest), status(sidecar, "sha256:"+randomHex(32))},
		},
	}
}

func randomHex(n int) string {
	b := make([]byte, n)
	if _, err := io.ReadFull(rand.Reader, b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)
}

func uuid() string {
	h := randomHex(16)
	return h[:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}
