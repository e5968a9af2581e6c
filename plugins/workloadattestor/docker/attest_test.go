package docker

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/attestor"
	"github.com/lanyard-dev/lanyard/attestor/selector"
	"github.com/lanyard-dev/lanyard/conf"
	"github.com/lanyard-dev/lanyard/internal/testkit"
)

const (
	otherID = "4f797c539e6c745de61a93ca3ff892358ecbcaccd8414d5db545c38428142970"
	// PIDs of the fake /proc.
	workloadPID = 100
	initPID     = 200
	hostPID     = 300
	unknownPID  = 400
	forgedPID   = 500
)

// fakeProc writes a /proc with one cgroup file per pid.
func fakeProc(t testing.TB, cgroups map[int]string) string {
	t.Helper()
	root := t.TempDir()
	for pid, data := range cgroups {
		dir := filepath.Join(root, fmt.Sprint(pid))
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "cgroup"), []byte(data), 0o444); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

func hybridCgroup(path string) string {
	return "9:name=systemd:" + path + "\n4:memory:" + path + "\n1:cpu:" + path + "\n0::" + path + "\n"
}

// setup is an engine of the given kind with container constructed running
// as initPID, and an attestor over it.
func setup(t *testing.T, engineName, containerPath, extraConf string) (*Attestor, *fakeEngine, func() string) {
	t.Helper()
	e := newFakeEngine(t, engineName)
	procRoot := fakeProc(t, map[int]string{
		workloadPID: hybridCgroup(containerPath),
		initPID:     hybridCgroup(containerPath),
		hostPID:     hybridCgroup("/user.slice/user-1000.slice/session-3.scope"),
		unknownPID:  hybridCgroup("/docker/" + otherID),
		forgedPID:   "0::/user.slice/user-1000.slice/user@1000.service/app.slice/docker-" + constructed + ".scope\n",
	})
	a, logs, err := build(t, fmt.Sprintf("docker_socket_path = \"unix://%s\"\n%s", e.socket, extraConf), map[string]string{"HOST_PROC": procRoot})
	if err != nil {
		t.Fatal(err)
	}
	return a, e, logs.String
}

func attest(t *testing.T, a *Attestor, pid int32) ([]string, error) {
	t.Helper()
	sels, err := a.Attest(context.Background(), attestor.Process{PID: pid})
	var out []string
	for _, s := range selector.Sort(sels) {
		out = append(out, s.String())
	}
	return out, err
}

func TestAttestSelectors(t *testing.T) {
	for _, tc := range []struct {
		engine, path string
	}{
		{"docker", "/docker/" + constructed},
		{"docker", "/system.slice/docker-" + constructed + ".scope"},
		{"podman", "/libpod_parent/libpod-" + constructed},
		{"podman", "/machine.slice/libpod-" + constructed + ".scope"},
	} {
		t.Run(tc.engine+tc.path, func(t *testing.T) {
			a, e, _ := setup(t, tc.engine, tc.path, "")
			e.add(constructed, fakeContainer{
				pid:    initPID,
				labels: map[string]string{"app": "web", "com.example.team": "blue", "k": "v:w"},
				env:    []string{"ROLE=frontend", "EQ=a=b", "PATH=/"},
				image:  "registry.example/team/web:1.2",
			})
			got, err := attest(t, a, workloadPID)
			if err != nil {
				t.Fatal(err)
			}
			want := []string{
				"docker:env:EQ=a=b", "docker:env:PATH=/", "docker:env:ROLE=frontend",
				"docker:image_id:registry.example/team/web:1.2",
				"docker:label:app:web", "docker:label:com.example.team:blue", "docker:label:k:v:w",
			}
			if !slices.Equal(got, want) {
				t.Errorf("selectors\n got %q\nwant %q", got, want)
			}
		})
	}
}

// TestAttestCapturedContainers gives the selectors of the containers as
// the real engines described them, unchanged but for the pid.
func TestAttestCapturedContainers(t *testing.T) {
	for engineName, want := range map[string][]string{
		"docker": {"docker:env:EQ=a=b", "docker:env:PATH=/", "docker:env:ROLE=frontend", "docker:image_id:lanyard.test/workload:1", "docker:label:app:web", "docker:label:com.example.team:blue"},
		"podman": {"docker:env:HOSTNAME=53e8168b67a9", "docker:env:PATH=/", "docker:env:ROLE=frontend", "docker:env:TERM=xterm", "docker:env:container=podman", "docker:image_id:lanyard.test/workload:1", "docker:label:app:web"},
	} {
		t.Run(engineName, func(t *testing.T) {
			e := newFakeEngine(t, engineName)
			raw, err := os.ReadFile(filepath.Join("testdata", "engine", engineName+"-inspect.http"))
			if err != nil {
				t.Fatal(err)
			}
			c := capturedContainer(t, raw, engineName)
			e.add(c.id, fakeContainer{pid: initPID, labels: c.labels, env: c.env, image: c.image})
			procRoot := fakeProc(t, map[int]string{workloadPID: c.cgroup, initPID: c.cgroup})
			a, _, err := build(t, fmt.Sprintf("docker_socket_path = \"unix://%s\"", e.socket), map[string]string{"HOST_PROC": procRoot})
			if err != nil {
				t.Fatal(err)
			}
			got, err := attest(t, a, workloadPID)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(got, want) {
				t.Errorf("selectors\n got %q\nwant %q", got, want)
			}
		})
	}
}

func TestAttestNoContainer(t *testing.T) {
	a, e, _ := setup(t, "docker", "/docker/"+constructed, "")
	for _, pid := range []int32{hostPID, unknownPID} {
		got, err := attest(t, a, pid)
		if err != nil || got != nil {
			t.Errorf("pid %d: selectors %q, err %v; want none and no error", pid, got, err)
		}
	}
	if n := e.inspectCount(); n != 1 {
		t.Errorf("%d inspects, want 1: the host process needs none", n)
	}
}

func TestAttestForgedCgroup(t *testing.T) {
	a, e, logs := setup(t, "docker", "/docker/"+constructed, "")
	e.add(constructed, fakeContainer{pid: initPID, labels: map[string]string{"app": "web"}, image: "web:1"})
	got, err := attest(t, a, forgedPID)
	if !errors.Is(err, errOutsideContainer) || got != nil {
		t.Fatalf("selectors %q, err %v; want errOutsideContainer", got, err)
	}
	if !strings.Contains(logs(), "Refusing docker selectors") {
		t.Errorf("not logged:\n%s", logs())
	}
	e.add(constructed, fakeContainer{pid: 0, image: "web:1"})
	if _, err := attest(t, a, workloadPID); !errors.Is(err, errOutsideContainer) || !strings.Contains(err.Error(), "no process runs in it") {
		t.Errorf("stopped container: err %v", err)
	}
}

func TestAttestEngineDown(t *testing.T) {
	a, e, logs := setup(t, "podman", "/libpod_parent/libpod-"+constructed, "")
	e.add(constructed, fakeContainer{pid: initPID, image: "web:1"})
	e.stop()
	for range 3 {
		_, err := attest(t, a, workloadPID)
		if err == nil || !strings.Contains(err.Error(), "unreachable") || !strings.Contains(err.Error(), "podman system service") {
			t.Fatalf("err %v, want one that says the engine is unreachable and what to check", err)
		}
	}
	if n := strings.Count(logs(), "The container engine cannot be used"); n != 1 {
		t.Errorf("logged %d times, want once:\n%s", n, logs())
	}
	// The host process still gets its answer: no engine needed.
	if got, err := attest(t, a, hostPID); err != nil || got != nil {
		t.Errorf("host process: %q, %v", got, err)
	}
	os.Remove(e.socket)
	e.start()
	if _, err := attest(t, a, workloadPID); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(logs(), "The container engine answers again") {
		t.Errorf("recovery not logged:\n%s", logs())
	}
}

func TestAttestAPIVersion(t *testing.T) {
	a, e, _ := setup(t, "docker", "/docker/"+constructed, `docker_version = "1.99"`)
	e.add(constructed, fakeContainer{pid: initPID, image: "web:1"})
	_, err := attest(t, a, workloadPID)
	if err == nil || !strings.Contains(err.Error(), "client version 1.99 is too new") || !strings.Contains(err.Error(), "set docker_version") {
		t.Fatalf("err %v", err)
	}
}

func TestAttestResponseBounded(t *testing.T) {
	a, e, _ := setup(t, "docker", "/docker/"+constructed, "")
	e.add(constructed, fakeContainer{pid: initPID, labels: map[string]string{"big": "x"}, extra: strings.Repeat("x", maxResponseSize), image: "web:1"})
	_, err := attest(t, a, workloadPID)
	if !errors.Is(err, errResponseTooLarge) {
		t.Fatalf("err %v, want errResponseTooLarge", err)
	}
	e.add(constructed, fakeContainer{pid: initPID, labels: map[string]string{"big": "x"}, extra: strings.Repeat("x", maxResponseSize-64<<10), image: "web:1"})
	if _, err := attest(t, a, workloadPID); err != nil {
		t.Fatalf("an answer just under the bound: %v", err)
	}
}

func TestAttestHonoursDeadline(t *testing.T) {
	a, e, _ := setup(t, "docker", "/docker/"+constructed, "")
	e.add(constructed, fakeContainer{pid: initPID, image: "web:1"})
	release := make(chan struct{})
	defer close(release)
	e.mu.Lock()
	e.hang = release
	e.mu.Unlock()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		_, err := a.Attest(ctx, attestor.Process{PID: workloadPID})
		done <- err
	}()
	testkit.WaitFor(t, 30*time.Second, "the inspect to reach the engine", func() bool { return e.inspectCount() > 0 })
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("err %v, want context.Canceled", err)
	}
}

type captured struct {
	id, image, cgroup string
	labels            map[string]string
	env               []string
}

// capturedContainer reads the container in a captured inspect answer, and
// the cgroup file captured from its first process.
func capturedContainer(t *testing.T, raw []byte, engineName string) captured {
	t.Helper()
	_, body, _ := bytes.Cut(raw, []byte("\r\n\r\n"))
	var c struct {
		ID     string `json:"Id"`
		Config struct {
			Labels map[string]string
			Env    []string
			Image  string
		}
	}
	if err := json.Unmarshal(body, &c); err != nil {
		t.Fatal(err)
	}
	cg, err := os.ReadFile(filepath.Join("testdata", "cgroup", "here-"+engineName+"-cgroupfs-hybrid.txt"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(cg, []byte(c.ID)) {
		t.Fatalf("the captured cgroup file is not container %s's", c.ID)
	}
	return captured{id: c.ID, image: c.Config.Image, cgroup: string(cg), labels: c.Config.Labels, env: c.Config.Env}
}

// BenchmarkAttest is one attestation of a process in a container: the
// cgroup files read and parsed, one inspect over the unix socket (a new
// connection each), the answer decoded.
func BenchmarkAttest(b *testing.B) {
	b.ReportAllocs()
	e := newFakeEngine(b, "docker")
	e.add(constructed, fakeContainer{pid: initPID, labels: map[string]string{"app": "web"}, env: []string{"ROLE=frontend"}, image: "web:1"})
	procRoot := fakeProc(b, map[int]string{workloadPID: hybridCgroup("/docker/" + constructed), initPID: hybridCgroup("/docker/" + constructed)})
	sec, err := conf.NewSection("agent.conf", fmt.Sprintf("docker_socket_path = %q", "unix://"+e.socket))
	if err != nil {
		b.Fatal(err)
	}
	a, err := newAttestor(attestor.PluginConfig{Name: PluginName, Data: sec}, func(k string) string { return map[string]string{"HOST_PROC": procRoot}[k] })
	if err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		sels, err := a.Attest(context.Background(), attestor.Process{PID: workloadPID})
		if err != nil || len(sels) != 3 {
			b.Fatal(sels, err)
		}
	}
}

func TestAttestVerboseLocatorLogs(t *testing.T) {
	a, e, logs := setup(t, "docker", "/docker/"+constructed, "verbose_container_locator_logs = true")
	e.add(constructed, fakeContainer{pid: initPID, image: "web:1"})
	if _, err := attest(t, a, workloadPID); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(logs(), "Container locator") || !strings.Contains(logs(), "container_id="+constructed) {
		t.Errorf("no locator log:\n%s", logs())
	}
}
