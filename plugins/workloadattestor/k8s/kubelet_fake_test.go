package k8s

import (
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testkit"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// fakeKubelet answers GET /pods as the kubelet does (pkg/kubelet/server):
// authentication by client certificate, then bearer token (the kubelet's
// token webhook), then anonymous when allowed, 401 "Unauthorized" when
// none passes; authorization of get on nodes/proxy, 403 with the
// kubelet's message when denied; then the PodList as JSON.
type fakeKubelet struct {
	srv      *httptest.Server
	ca       *testkit.CA // signed the serving certificate
	clientCA *testkit.CA // the kubelet's --client-ca-file

	mu        sync.Mutex
	tokens    map[string]string // bearer token -> user
	allowed   map[string]bool   // users with get on nodes/proxy
	anonymous bool              // --anonymous-auth
	// pods gives the list for the nth request (from 1).
	pods func(n int) []corev1.Pod
	// body, when set, is sent as is instead of the list.
	body      []byte
	status    int           // when set, answered instead
	gate      chan struct{} // when set, requests wait for it
	requests  int
	starts    []time.Time
	lastToken string
}

type kubeletOptions struct {
	dnsNames []string // of the serving certificate
	plain    bool     // the read-only port: plain HTTP, no authentication
}

func newFakeKubelet(t testing.TB, opts kubeletOptions) *fakeKubelet {
	t.Helper()
	k := &fakeKubelet{
		tokens:  map[string]string{},
		allowed: map[string]bool{},
		pods:    func(int) []corev1.Pod { return nil },
	}
	k.srv = httptest.NewUnstartedServer(http.HandlerFunc(k.serve))
	// Refused handshakes are what some tests want.
	k.srv.Config.ErrorLog = log.New(io.Discard, "", 0)
	if opts.plain {
		k.srv.Start()
		t.Cleanup(k.srv.Close)
		return k
	}
	k.ca = testkit.NewCA(t, "")
	k.clientCA = testkit.NewCA(t, "")
	key := testkit.NewKey(t)
	cert := k.ca.Issue(t, &x509.Certificate{
		Subject:     pkix.Name{CommonName: "kubelet"},
		DNSNames:    opts.dnsNames,
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}, key.Public())
	clientPool := x509.NewCertPool()
	clientPool.AddCert(k.clientCA.Cert)
	k.srv.TLS = &tls.Config{
		Certificates: []tls.Certificate{{Certificate: [][]byte{cert.Raw, k.ca.Cert.Raw}, PrivateKey: key}},
		ClientAuth:   tls.VerifyClientCertIfGiven,
		ClientCAs:    clientPool,
	}
	k.srv.StartTLS()
	t.Cleanup(k.srv.Close)
	return k
}

func (k *fakeKubelet) port() int {
	_, p, _ := net.SplitHostPort(k.srv.Listener.Addr().String())
	n, _ := strconv.Atoi(p)
	return n
}

func (k *fakeKubelet) serve(w http.ResponseWriter, r *http.Request) {
	k.mu.Lock()
	k.requests++
	n := k.requests
	k.starts = append(k.starts, time.Now())
	gate := k.gate
	k.mu.Unlock()
	if gate != nil {
		select {
		case <-gate:
		case <-r.Context().Done():
			return
		}
	}
	if r.URL.Path != "/pods" || r.Method != http.MethodGet {
		http.NotFound(w, r)
		return
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if r.TLS != nil {
		user, ok := k.authenticate(r)
		if !ok {
			http.Error(w, "Unauthorized", http.StatusUnauthorized)
			return
		}
		if !k.allowed[user] {
			http.Error(w, fmt.Sprintf("Forbidden (user=%s, verb=get, resource=nodes, subresource=proxy)", user), http.StatusForbidden)
			return
		}
	}
	if k.status != 0 {
		http.Error(w, "internal error", k.status)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	if k.body != nil {
		w.Write(k.body)
		return
	}
	w.Write(podListJSON(k.pods(n)))
}

func (k *fakeKubelet) authenticate(r *http.Request) (string, bool) {
	if len(r.TLS.VerifiedChains) > 0 {
		return r.TLS.VerifiedChains[0][0].Subject.CommonName, true
	}
	if h := r.Header.Get("Authorization"); h != "" {
		token, ok := strings.CutPrefix(h, "Bearer ")
		k.lastToken = token
		user, valid := k.tokens[token]
		return user, ok && valid
	}
	return "system:anonymous", k.anonymous
}

func (k *fakeKubelet) set(f func(k *fakeKubelet)) {
	k.mu.Lock()
	defer k.mu.Unlock()
	f(k)
}

func (k *fakeKubelet) count() int {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.requests
}

// clientCert issues a client certificate for user, as the kubelet's client
// CA would, and writes it and its key to dir.
func (k *fakeKubelet) clientCert(t testing.TB, dir, user string) (certPath, keyPath string) {
	t.Helper()
	key := testkit.NewKey(t)
	cert := k.clientCA.Issue(t, clientTemplate(user), key.Public())
	certPath, keyPath = dir+"/client.crt", dir+"/client.key"
	testkit.WritePEM(t, certPath, "CERTIFICATE", cert.Raw)
	testkit.WritePEM(t, keyPath, "PRIVATE KEY", testkit.PKCS8(t, key))
	return certPath, keyPath
}

// clientTemplate is a client certificate for user: the kubelet takes the
// user from its common name.
func clientTemplate(user string) *x509.Certificate {
	return &x509.Certificate{
		Subject:     pkix.Name{CommonName: user},
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
}

func podListJSON(pods []corev1.Pod) []byte {
	b, err := json.Marshal(corev1.PodList{
		TypeMeta: metav1.TypeMeta{Kind: "PodList", APIVersion: "v1"},
		Items:    pods,
	})
	if err != nil {
		panic(err)
	}
	return b
}

// hexID is a deterministic 64-hex container ID or digest.
func hexID(parts ...any) string {
	sum := sha256.Sum256([]byte(fmt.Sprint(parts...)))
	return hex.EncodeToString(sum[:])
}

// podUID is a deterministic dashed pod UID.
func podUID(i int) string {
	h := hexID("pod", i)
	return h[:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:32]
}

// testPod is a pod as a kubelet lists it, with the bulk a real one has
// (managedFields, env, volumes, probes, conditions): a Deployment's pod
// with an app container, a sidecar and an init container, all running.
func testPod(i int) corev1.Pod {
	uid := podUID(i)
	ns := fmt.Sprintf("team-%d", i%10)
	appImage := fmt.Sprintf("registry.example.com/app/web:v%d", i%3)
	trueVal := true
	rs := fmt.Sprintf("web-%d-%s", i%20, hexID("rs", i%20)[:10])
	fields := []byte(`{"f:metadata":{"f:generateName":{},"f:labels":{".":{},"f:app":{},"f:pod-template-hash":{}},"f:ownerReferences":{".":{},"k:{\"uid\":\"` + hexID("rsuid", i%20)[:36] + `\"}":{}}},"f:spec":{"f:containers":{"k:{\"name\":\"app\"}":{".":{},"f:env":{".":{},"k:{\"name\":\"A\"}":{".":{},"f:name":{},"f:value":{}}},"f:image":{},"f:imagePullPolicy":{},"f:name":{},"f:ports":{},"f:resources":{}}},"f:dnsPolicy":{},"f:restartPolicy":{},"f:schedulerName":{},"f:serviceAccountName":{}}}`)
	env := make([]corev1.EnvVar, 12)
	for j := range env {
		env[j] = corev1.EnvVar{Name: fmt.Sprintf("SETTING_%d", j), Value: fmt.Sprintf("value-%d-%d", i, j)}
	}
	container := func(name, image string, port int32) corev1.Container {
		return corev1.Container{
			Name: name, Image: image, Env: env,
			Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: port, Protocol: corev1.ProtocolTCP}},
			Resources: corev1.ResourceRequirements{
				Requests: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("100m"), corev1.ResourceMemory: resource.MustParse("128Mi")},
				Limits:   corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("256Mi")},
			},
			VolumeMounts:   []corev1.VolumeMount{{Name: "config", MountPath: "/etc/app"}, {Name: "kube-api-access", MountPath: "/var/run/secrets/kubernetes.io/serviceaccount", ReadOnly: true}},
			ReadinessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/healthz", Port: intstr.FromInt32(port)}}, PeriodSeconds: 10},
		}
	}
	started := metav1.NewTime(time.Date(2026, 11, 1, 12, 0, 0, 0, time.UTC))
	status := func(name, image, digestRepo string) corev1.ContainerStatus {
		return corev1.ContainerStatus{
			Name: name, Ready: true,
			ContainerID: "containerd://" + hexID("container", i, name),
			Image:       image,
			ImageID:     digestRepo + "@sha256:" + hexID("digest", image),
			State:       corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: started}},
			Started:     &trueVal,
		}
	}
	return corev1.Pod{
		TypeMeta: metav1.TypeMeta{Kind: "Pod", APIVersion: "v1"},
		ObjectMeta: metav1.ObjectMeta{
			Name: fmt.Sprintf("%s-%s", rs, hexID("name", i)[:5]), Namespace: ns, UID: types.UID(uid),
			GenerateName: rs + "-", ResourceVersion: strconv.Itoa(1000 + i), CreationTimestamp: started,
			Labels:      map[string]string{"app": fmt.Sprintf("web-%d", i%20), "pod-template-hash": hexID("rs", i%20)[:10], "tier": "frontend"},
			Annotations: map[string]string{"kubernetes.io/config.seen": "2026-11-01T12:00:00Z", "kubernetes.io/config.source": "api"},
			OwnerReferences: []metav1.OwnerReference{{
				APIVersion: "apps/v1", Kind: "ReplicaSet", Name: rs, UID: types.UID(podUID(100000 + i%20)),
				Controller: &trueVal, BlockOwnerDeletion: &trueVal,
			}},
			ManagedFields: []metav1.ManagedFieldsEntry{{
				Manager: "kube-controller-manager", Operation: metav1.ManagedFieldsOperationUpdate, APIVersion: "v1",
				Time: &started, FieldsType: "FieldsV1", FieldsV1: metav1.NewFieldsV1(string(fields)),
			}},
		},
		Spec: corev1.PodSpec{
			ServiceAccountName: fmt.Sprintf("web-%d", i%20), DeprecatedServiceAccount: fmt.Sprintf("web-%d", i%20),
			NodeName:       "node-a",
			InitContainers: []corev1.Container{container("init", "busybox:1.36", 9000)},
			Containers:     []corev1.Container{container("app", appImage, 8080), container("envoy", "envoyproxy/envoy:v1.30.1", 15000)},
			Volumes: []corev1.Volume{
				{Name: "config", VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{LocalObjectReference: corev1.LocalObjectReference{Name: "web-config"}}}},
				{Name: "kube-api-access", VolumeSource: corev1.VolumeSource{Projected: &corev1.ProjectedVolumeSource{Sources: []corev1.VolumeProjection{{ServiceAccountToken: &corev1.ServiceAccountTokenProjection{Path: "token", ExpirationSeconds: ptr(int64(3607))}}}}}},
			},
			Tolerations: []corev1.Toleration{{Key: "node.kubernetes.io/not-ready", Operator: corev1.TolerationOpExists, Effect: corev1.TaintEffectNoExecute, TolerationSeconds: ptr(int64(300))}},
		},
		Status: corev1.PodStatus{
			Phase: corev1.PodRunning, HostIP: "10.0.0.1", PodIP: fmt.Sprintf("10.1.%d.%d", i/250, i%250), StartTime: &started, QOSClass: corev1.PodQOSBurstable,
			Conditions: []corev1.PodCondition{
				{Type: corev1.PodInitialized, Status: corev1.ConditionTrue, LastTransitionTime: started},
				{Type: corev1.PodReady, Status: corev1.ConditionTrue, LastTransitionTime: started},
				{Type: corev1.ContainersReady, Status: corev1.ConditionTrue, LastTransitionTime: started},
				{Type: corev1.PodScheduled, Status: corev1.ConditionTrue, LastTransitionTime: started},
			},
			InitContainerStatuses: []corev1.ContainerStatus{status("init", "docker.io/library/busybox:1.36", "docker.io/library/busybox")},
			ContainerStatuses: []corev1.ContainerStatus{
				status("app", appImage, "registry.example.com/app/web"),
				status("envoy", "docker.io/envoyproxy/envoy:v1.30.1", "docker.io/envoyproxy/envoy"),
			},
		},
	}
}

func testPods(n int) []corev1.Pod {
	pods := make([]corev1.Pod, n)
	for i := range pods {
		pods[i] = testPod(i)
	}
	return pods
}

func ptr[T any](v T) *T { return &v }
