package systemd_test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testkit"
)

// testFiles are what the container needs: the Debian root, and the host
// dir bound at /inside with the .deb and the workload binary.
type testFiles struct {
	root, bind, deb string
}

// filesOnce readies them once per test binary; TestMain removes the bind
// dir. build.sh serializes concurrent builds of the root itself.
var (
	filesOnce = sync.OnceValues(prepareFiles)
	filesDir  string
)

func TestMain(m *testing.M) {
	code := m.Run()
	if filesDir != "" {
		os.RemoveAll(filesDir)
	}
	os.Exit(code)
}

func buildRoot() (string, error) {
	script, err := testkit.RepoFile("test/systemd/build.sh")
	if err != nil {
		return "", err
	}
	root, err := testkit.RunBuildScript(script, "usr/bin/systemctl", "usr/bin/dpkg")
	if err != nil {
		return "", err
	}
	for _, tool := range []string{"systemd-nspawn", "nsenter"} {
		if _, err := exec.LookPath(tool); err != nil {
			return "", fmt.Errorf("build.sh ran but %s is not in PATH: %w", tool, err)
		}
	}
	return root, nil
}

// readyFiles readies the root (once per machine, cached), the .deb, built
// with deploy/packaging/build.sh as `make deb` does, and the workload.
func readyFiles(t *testing.T) testFiles {
	t.Helper()
	testkit.RequireRoot(t, "systemd-nspawn boots a container")
	begin := time.Now()
	t.Log("readying the Debian root with test/systemd/build.sh (about 45 s the first time, then cached), the .deb and the workload")
	files, err := filesOnce()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("root, .deb and workload ready in %s", time.Since(begin).Round(10*time.Millisecond))
	return files
}

func prepareFiles() (testFiles, error) {
	root, err := buildRoot()
	if err != nil {
		return testFiles{}, fmt.Errorf("readying the Debian root: %w", err)
	}
	bind, err := bindDir()
	if err != nil {
		return testFiles{}, err
	}
	filesDir = bind
	script, err := testkit.RepoFile("deploy/packaging/build.sh")
	if err != nil {
		return testFiles{}, err
	}
	cmd := exec.Command("sh", script)
	cmd.Env = append(os.Environ(), "VERSION="+testVersion, "DEB_OUT="+bind)
	out, err := cmd.Output()
	if err != nil {
		return testFiles{}, fmt.Errorf("deploy/packaging/build.sh: %w\n%s%s", err, out, stderrOf(err))
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	deb := lines[len(lines)-1]
	build := exec.Command("go", "build", "-trimpath", "-o", filepath.Join(bind, "workload"), "./test/k8s/workload")
	build.Dir = filepath.Join(filepath.Dir(script), "..", "..")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		return testFiles{}, fmt.Errorf("building the workload: %w\n%s", err, out)
	}
	return testFiles{root: root, bind: bind, deb: deb}, nil
}

// bindDir makes the dir bound at /inside. It is named after the test
// process, so a run removes what a killed one left. Every user may
// traverse it (the workloads run as other users).
func bindDir() (string, error) {
	stale, _ := filepath.Glob(filepath.Join(os.TempDir(), cgroupPrefix+"*"))
	for _, d := range stale {
		if pid, err := strconv.Atoi(strings.TrimPrefix(filepath.Base(d), cgroupPrefix)); err == nil && !alive(pid) {
			os.RemoveAll(d)
		}
	}
	dir := filepath.Join(os.TempDir(), fmt.Sprintf("%s%d", cgroupPrefix, os.Getpid()))
	if err := os.RemoveAll(dir); err != nil {
		return "", err
	}
	return dir, os.MkdirAll(filepath.Join(dir, "out"), 0o755)
}

func stderrOf(err error) []byte {
	if ee, ok := err.(*exec.ExitError); ok {
		return ee.Stderr
	}
	return nil
}
