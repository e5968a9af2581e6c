// Package docker_test runs the docker workload attestor in a real lanyard
// against real container engines: Docker Engine and Podman from Debian,
// each started by the test with its own data root and API socket, running
// images built here FROM scratch with the test workload (test/k8s/workload),
// which mounts the agent's socket and fetches its SVIDs.
//
// It needs root. Outside CI a test without root skips; with CI=true any
// missing prerequisite fails it. build.sh installs the engines from Debian
// when they are missing.
package docker_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

var lanyardBin string

func TestMain(m *testing.M) {
	os.Exit(testkit.RunWithLanyard(m, func(bin string) error {
		lanyardBin = bin
		return nil
	}))
}

// Three tags of one image (the same binary gives the same digest), so
// that image_id is seen to be the reference a container was started with.
const (
	workloadImage = "lanyard.test/docker-workload:1"
	aliasImage    = "lanyard.test/docker-workload-alias:1"
	deniedImage   = "lanyard.test/docker-denied:1"
	// Containers run as these users: not root, so that only the entries
	// below match them.
	workloadUser = "1234"
	unixOnlyUser = "4321"
)

// entries grant one SPIFFE ID per selector kind, so that the IDs a workload
// gets show which selectors it had.
const entries = `
            entry {
                spiffe_id = "spiffe://example.org/label"
                selectors = ["docker:label:app:web"]
            }
            entry {
                spiffe_id = "spiffe://example.org/env"
                selectors = ["docker:env:ROLE=frontend"]
            }
            entry {
                spiffe_id = "spiffe://example.org/image"
                selectors = ["docker:image_id:` + workloadImage + `"]
            }
            entry {
                spiffe_id = "spiffe://example.org/alias"
                selectors = ["docker:image_id:` + aliasImage + `"]
            }
            entry {
                spiffe_id = "spiffe://example.org/label-and-env"
                selectors = ["docker:label:app:web", "docker:env:ROLE=frontend", "unix:uid:` + workloadUser + `"]
            }
            entry {
                spiffe_id = "spiffe://example.org/podman"
                selectors = ["docker:label:app:podman-web", "docker:env:container=podman"]
            }
            entry {
                spiffe_id = "spiffe://example.org/host-root"
                selectors = ["unix:uid:0"]
            }
            entry {
                spiffe_id = "spiffe://example.org/unix-only"
                selectors = ["unix:uid:` + unixOnlyUser + `"]
            }
`

// agentConfig: %[1]s data dir, %[2]s socket, %[3]s the engine's socket.
// No container_id_cgroup_matchers: the locator finds Docker's and Podman's
// containers by itself.
const agentConfig = `agent {
    trust_domain = "example.org"
    data_dir = "%[1]s"
    socket_path = "%[2]s"
}
plugins {
    WorkloadAttestor "docker" {
        plugin_data {
            docker_socket_path = "unix://%[3]s"
        }
    }
    WorkloadAttestor "unix" {
        plugin_data {}
    }
    UpstreamAuthority "local" {
        plugin_data {
%[4]s
        }
    }
}
`

// agent is a lanyard whose socket's dir is mounted into the containers at
// /agent.
type agent struct {
	proc      *testkit.Process
	socketDir string
}

func startAgent(t *testing.T, e *engine) *agent {
	t.Helper()
	a := &agent{socketDir: testkit.ShortDir(t, "lda")}
	socket := filepath.Join(a.socketDir, "agent.sock")
	conf := filepath.Join(t.TempDir(), "agent.conf")
	writeFile(t, conf, fmt.Sprintf(agentConfig, t.TempDir(), socket, e.socket, entries))
	p, err := testkit.Start(t, lanyardBin, "run", "-config", conf)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.WaitServing(socket, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	a.proc = p
	return a
}

// prerequisites readies the engines, the images' tarball, and the bin dir
// holding the workload.
func prerequisites(t *testing.T) (images, bin string) {
	t.Helper()
	testkit.RequireRoot(t, "the container engines run as root")
	lockMachine(t)
	script, err := testkit.RepoFile("test/docker/build.sh")
	if err != nil {
		t.Fatal(err)
	}
	bin, err = testkit.RunBuildScript(script, "mkimage", "workload")
	if err != nil {
		t.Fatal(err)
	}
	images = filepath.Join(t.TempDir(), "images.tar")
	args := []string{"-o", images}
	for _, ref := range []string{workloadImage, aliasImage, deniedImage} {
		args = append(args, "-image", ref+"="+filepath.Join(bin, "workload"))
	}
	if out, err := exec.Command(filepath.Join(bin, "mkimage"), args...).CombinedOutput(); err != nil {
		t.Fatalf("mkimage: %v\n%s", err, out)
	}
	return images, bin
}

// dockerWithAgent is a dockerd with the test images, and an agent that
// attests its containers.
func dockerWithAgent(t *testing.T) (*engine, *agent, string) {
	t.Helper()
	images, bin := prerequisites(t)
	e := startDocker(t)
	e.mustRun("load", "--input", images)
	return e, startAgent(t, e), bin
}

// runWorkload starts the test workload in a container that mounts the
// agent's socket dir, and returns the container's ID.
func (e *engine) runWorkload(a *agent, user, image string, extra ...string) string {
	e.t.Helper()
	args := []string{"run", "--detach", "--network=none", "--user", user + ":" + user,
		"--volume", a.socketDir + ":/agent",
		"--env", "SPIFFE_ENDPOINT_SOCKET=unix:///agent/agent.sock",
		"--env", "WORKLOAD_INTERVAL=300ms"}
	args = append(append(args, extra...), image)
	return e.mustRun(args...)
}

// waitIDs waits for a fetch of the container's workload that got exactly
// the IDs want, in any order.
func (e *engine) waitIDs(id string, want ...string) {
	e.t.Helper()
	wantSet := sortedJoin(want)
	e.waitLine(id, "SVIDs "+wantSet, func(line string) bool {
		ids, ok := strings.CutPrefix(line, "svid ")
		return ok && sortedJoin(strings.Fields(ids)) == wantSet
	})
}

func sortedJoin(ids []string) string {
	return strings.Join(slices.Sorted(slices.Values(ids)), " ")
}

// waitError waits for a fetch of the container's workload that failed
// with an error containing text.
func (e *engine) waitError(id, text string) {
	e.t.Helper()
	e.waitLine(id, "an error containing "+text, func(line string) bool {
		return strings.HasPrefix(line, "error ") && strings.Contains(line, text)
	})
}

// hostFetch fetches the SVIDs of the test process itself, a host process
// running as root.
func hostFetch(t *testing.T, a *agent) []string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	svids, err := workloadapi.FetchX509SVIDs(ctx, workloadapi.WithAddr("unix://"+filepath.Join(a.socketDir, "agent.sock")))
	if err != nil {
		t.Fatalf("a host process's fetch: %v", err)
	}
	var ids []string
	for _, s := range svids {
		ids = append(ids, s.ID.String())
	}
	return ids
}

// TestDockerEngine: label, env and image selectors of containers of a real
// dockerd, a container that matches no entry, and a host process.
func TestDockerEngine(t *testing.T) {
	e, a, _ := dockerWithAgent(t)

	web := e.runWorkload(a, workloadUser, workloadImage, "--label", "app=web", "--env", "ROLE=frontend")
	alias := e.runWorkload(a, workloadUser, aliasImage, "--label", "app=web")
	denied := e.runWorkload(a, workloadUser, deniedImage, "--label", "app=other", "--env", "ROLE=backend")

	e.waitIDs(web, "spiffe://example.org/label", "spiffe://example.org/env", "spiffe://example.org/image", "spiffe://example.org/label-and-env")
	// Same digest as workloadImage: image_id is the reference it was
	// started with, not the image's sha256.
	e.waitIDs(alias, "spiffe://example.org/label", "spiffe://example.org/alias")
	e.waitError(denied, "PermissionDenied")

	if got := hostFetch(t, a); !slices.Equal(got, []string{"spiffe://example.org/host-root"}) {
		t.Errorf("host process got %q, want only the unix entry's ID", got)
	}
	if logs := a.proc.Logs.String(); strings.Contains(logs, "Workload attestor failed") {
		t.Errorf("an attestor failed:\n%s", logs)
	}
}

// TestPodman: a Podman container by label through Podman's
// Docker-compatible API, with no matchers configured; then the API service
// stopped: the callers get a clear status, the unix attestor's selectors
// still count, and the cause is logged once.
func TestPodman(t *testing.T) {
	images, _ := prerequisites(t)
	e := startPodman(t)
	e.mustRun("load", "--input", images)
	a := startAgent(t, e)

	web := e.runWorkload(a, workloadUser, workloadImage, "--label", "app=podman-web")
	unixOnly := e.runWorkload(a, unixOnlyUser, deniedImage, "--label", "app=podman-web")
	e.waitIDs(web, "spiffe://example.org/podman", "spiffe://example.org/image")
	e.waitIDs(unixOnly, "spiffe://example.org/podman", "spiffe://example.org/unix-only")

	e.stopService()
	// Podman's containers run on without the API service.
	e.waitError(web, "PermissionDenied")
	e.waitIDs(unixOnly, "spiffe://example.org/unix-only")
	logs := a.proc.Logs.String()
	if n := strings.Count(logs, "The container engine cannot be used"); n != 1 {
		t.Errorf("the engine's failure logged %d times, want once:\n%s", n, logs)
	}
	for _, want := range []string{"unreachable", "podman system service", e.socket} {
		if !strings.Contains(logs, want) {
			t.Errorf("the agent's log does not say %q:\n%s", want, logs)
		}
	}

	e.startService()
	e.waitIDs(web, "spiffe://example.org/podman", "spiffe://example.org/image")
	testkit.WaitFor(t, startTimeout, "the agent to log that the engine answers again", func() bool {
		return strings.Contains(a.proc.Logs.String(), "The container engine answers again")
	})
}
