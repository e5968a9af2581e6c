package k8s_test

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/lanyard-dev/lanyard/test/k8s/k8stest"
)

var lanyardBin string

func TestMain(m *testing.M) {
	os.Exit(testkit.RunWithLanyard(m, func(bin string) error {
		lanyardBin = bin
		return nil
	}))
}

// agentConfig gives every root process, pods' included, one SPIFFE ID:
// enough to show that a pod reaches the agent's socket through its hostPath
// mount. The k8s selectors are the attestor's tests' business.
const agentConfig = `agent {
    trust_domain = "example.org"
    data_dir = "%s"
    socket_path = "%s"
}
plugins {
    WorkloadAttestor "unix" {
        plugin_data {}
    }
    UpstreamAuthority "local" {
        plugin_data {
            entry {
                spiffe_id = "spiffe://example.org/root"
                selectors = ["unix:uid:0"]
            }
        }
    }
}
`

// startAgent runs lanyard with its Workload API socket at socket.
func startAgent(t *testing.T, socket string) {
	conf := filepath.Join(t.TempDir(), "agent.conf")
	data := fmt.Sprintf(agentConfig, t.TempDir(), socket)
	if err := os.WriteFile(conf, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
	agent, err := testkit.Start(t, lanyardBin, "run", "-config", conf)
	if err != nil {
		t.Fatal(err)
	}
	if err := agent.WaitServing(socket, 30*time.Second); err != nil {
		t.Fatal(err)
	}
}

// captureEnv names a dir where TestClusterRunsPods copies each workload
// container's /proc/<pid>/cgroup as <qos>-<static|api>.txt (the captures
// under testdata/cgroups came from there).
const captureEnv = "LANYARD_K8S_CAPTURE_DIR"

var (
	staticUID = regexp.MustCompile(`^[0-9a-f]{32}$`)
	apiUID    = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$`)
)

// TestClusterRunsPods runs static and API pods of every QoS class on the
// real node and checks where their processes' cgroups put them.
func TestClusterRunsPods(t *testing.T) {
	c := k8stest.Start(t)
	socket := filepath.Join(t.TempDir(), "api.sock")
	startAgent(t, socket)

	type podCase struct {
		name   string
		static bool
		qos    k8stest.QoS
	}
	cases := []podCase{
		{"static-besteffort", true, k8stest.BestEffort},
		{"static-burstable", true, k8stest.Burstable},
		{"api-besteffort", false, k8stest.BestEffort},
		{"api-burstable", false, k8stest.Burstable},
		{"api-guaranteed", false, k8stest.Guaranteed},
	}
	refs := make([]k8stest.PodRef, len(cases))
	for i, pc := range cases {
		spec := k8stest.PodSpec{Name: pc.name, QoS: pc.qos, Socket: socket, Labels: map[string]string{"case": pc.name}}
		if pc.name == "api-burstable" {
			spec.Image = k8stest.WorkloadImageAlias
		}
		if pc.static {
			refs[i] = c.RunStaticPod(spec.Manifest())
		} else {
			refs[i] = c.CreatePod(spec.Manifest())
		}
	}

	captureDir := os.Getenv(captureEnv)
	imageIDs := map[string]bool{}
	statusImages := map[string]bool{}
	for i, pc := range cases {
		pod := c.WaitRunning(refs[i])
		imageIDs[pod.Containers[0].ImageID] = true
		statusImages[pod.Containers[0].Image] = true
		if pod.Static != pc.static || pod.QOSClass != pc.qos {
			t.Errorf("%s: static %v, QoS %s; want %v, %s", pc.name, pod.Static, pod.QOSClass, pc.static, pc.qos)
		}
		uidForm := apiUID
		if pc.static {
			uidForm = staticUID
		}
		if !uidForm.MatchString(pod.UID) {
			t.Errorf("%s: pod UID %q is not of the %s form", pc.name, pod.UID, uidForm)
		}
		pids := c.ContainerPIDs(pod)
		cgroup, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pids["workload"]))
		if err != nil {
			t.Fatal(err)
		}
		// cgroupfs driver, cgroup v1: /kubepods[/<qos>]/pod<uid>/<container id>.
		qosDir := "/" + strings.ToLower(string(pc.qos))
		if pc.qos == k8stest.Guaranteed {
			qosDir = ""
		}
		want := "/kubepods" + qosDir + "/pod" + pod.UID + "/" + pod.Containers[0].ID
		if !strings.Contains(string(cgroup), ":"+want+"\n") {
			t.Errorf("%s: /proc/%d/cgroup has no %s:\n%s", pc.name, pids["workload"], want, cgroup)
		}
		if captureDir != "" {
			kind := "api"
			if pc.static {
				kind = "static"
			}
			name := fmt.Sprintf("%s-%s.txt", strings.ToLower(string(pc.qos)), kind)
			if err := os.WriteFile(filepath.Join(captureDir, name), cgroup, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		// The workload reached the agent through its hostPath mount, and
		// its output reaches the test.
		c.WaitLog(pod, "workload", func(line string) bool { return line == "svid spiffe://example.org/root" })
	}

	// Two names of one image have one ID. The status's image name is not
	// the one the pod asked for: containerd reports one tag of the image
	// for both (SPIRE #4276); only the pod spec says which name was used.
	if len(imageIDs) != 1 {
		t.Errorf("pods of %s and %s report image IDs %v, want one", k8stest.WorkloadImage, k8stest.WorkloadImageAlias, imageIDs)
	}
	t.Logf("status image names of pods using %s and %s: %v", k8stest.WorkloadImage, k8stest.WorkloadImageAlias, statusImages)

	checkKubeletSecurePort(t, c)
	checkBoundToken(t, c, refs[2].Name)

	c.DeletePod(refs[0])
	c.DeletePod(refs[2])
}

// checkKubeletSecurePort: the kubelet's certificate verifies against the
// kubelet CA, the agent's service account may list pods there, another
// account may not.
func checkKubeletSecurePort(t *testing.T, c *k8stest.Cluster) {
	client := trusting(t, c.KubeletCAPath())
	get := func(token string) int {
		req, _ := http.NewRequest("GET", fmt.Sprintf("https://127.0.0.1:%d/pods", c.KubeletPort), nil)
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		resp, err := client.Do(req)
		if err != nil {
			t.Fatalf("kubelet secure port: %v", err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	for _, tc := range []struct {
		who   string
		token string
		want  int
	}{
		{"agent", c.Token(k8stest.AgentNamespace, k8stest.AgentServiceAccount, "", ""), http.StatusOK},
		{"default", c.Token("default", "default", "", ""), http.StatusForbidden},
		{"anonymous", "", http.StatusUnauthorized},
	} {
		if got := get(tc.token); got != tc.want {
			t.Errorf("kubelet /pods as %s: %d, want %d", tc.who, got, tc.want)
		}
	}
}

// checkBoundToken: a pod-bound token for an audience passes a TokenReview
// that names the pod, and the SPIRE server's account may do what k8s_psat
// does with it: review it, get the pod and the node.
func checkBoundToken(t *testing.T, c *k8stest.Cluster, pod string) {
	token := c.Token("default", "default", "spire-server", pod)
	review := map[string]any{
		"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
		"spec": map[string]any{"token": token, "audiences": []string{"spire-server"}},
	}
	asServer := apiAs(t, c, c.Token(k8stest.AgentNamespace, k8stest.ServerServiceAccount, "", ""))
	asDefault := apiAs(t, c, c.Token("default", "default", "", ""))
	for _, tc := range []struct {
		method, path string
		as           func(method, path string, body any) int
		want         int
	}{
		{"POST", "/apis/authentication.k8s.io/v1/tokenreviews", asServer, http.StatusCreated},
		{"GET", "/api/v1/namespaces/default/pods/" + pod, asServer, http.StatusOK},
		{"GET", "/api/v1/nodes/" + c.NodeName, asServer, http.StatusOK},
		{"POST", "/apis/authentication.k8s.io/v1/tokenreviews", asDefault, http.StatusForbidden},
	} {
		if got := tc.as(tc.method, tc.path, review); got != tc.want {
			t.Errorf("%s %s: %d, want %d", tc.method, tc.path, got, tc.want)
		}
	}
	var resp struct {
		Status struct {
			Authenticated bool
			User          struct {
				Username string
				Extra    map[string][]string
			}
			Error string
		}
	}
	if err := c.Do("POST", "/apis/authentication.k8s.io/v1/tokenreviews", review, &resp); err != nil {
		t.Fatal(err)
	}
	s := resp.Status
	if !s.Authenticated || s.User.Username != "system:serviceaccount:default:default" ||
		len(s.User.Extra["authentication.kubernetes.io/pod-name"]) != 1 || s.User.Extra["authentication.kubernetes.io/pod-name"][0] != pod {
		t.Errorf("TokenReview of a token bound to pod %s: %+v", pod, s)
	}
}

// apiAs calls the API server with token and gives the status code.
func apiAs(t *testing.T, c *k8stest.Cluster, token string) func(method, path string, body any) int {
	client := trusting(t, c.ClusterCAPath())
	return func(method, path string, body any) int {
		data, err := json.Marshal(body)
		if err != nil {
			t.Fatal(err)
		}
		req, _ := http.NewRequest(method, c.APIServer+path, bytes.NewReader(data))
		req.Header.Set("Authorization", "Bearer "+token)
		req.Header.Set("Content-Type", "application/json")
		resp, err := client.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", method, path, err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
}

// trusting is an HTTPS client that trusts only the CA in caPath.
func trusting(t *testing.T, caPath string) *http.Client {
	pem, err := os.ReadFile(caPath)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pem)
	return &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
}
