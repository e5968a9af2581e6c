package testkit

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
)

// RunBuildScript runs a script that builds test peers into a cache and
// prints their bin dir on its last line (test/spire/build.sh,
// test/k8s/build.sh), and checks that each of binaries is there.
func RunBuildScript(script string, binaries ...string) (string, error) {
	var stdout, stderr bytes.Buffer
	cmd := exec.Command("sh", script)
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Run(); err != nil {
		out := stderr.Bytes()
		if len(out) > 16<<10 {
			out = out[len(out)-16<<10:]
		}
		return "", fmt.Errorf("%s failed: %w\n%s", script, err, out)
	}
	lines := strings.Split(strings.TrimSpace(stdout.String()), "\n")
	dir := strings.TrimSpace(lines[len(lines)-1])
	for _, name := range binaries {
		if _, err := os.Stat(filepath.Join(dir, name)); err != nil {
			return "", fmt.Errorf("%s printed bin dir %q but %s is not there: %w", script, dir, name, err)
		}
	}
	return dir, nil
}

// RepoFile is the path of rel (slash-separated, from the repo's root): found
// from this source file, or, when built with -trimpath, by walking up from
// the working directory.
func RepoFile(rel string) (string, error) {
	rel = filepath.FromSlash(rel)
	if _, file, _, ok := runtime.Caller(0); ok && filepath.IsAbs(file) {
		p := filepath.Join(filepath.Dir(file), "..", "..", rel)
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	wd, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("finding %s: %w", rel, err)
	}
	for dir := wd; ; dir = filepath.Dir(dir) {
		p := filepath.Join(dir, rel)
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
		if filepath.Dir(dir) == dir {
			return "", fmt.Errorf("%s not found above %s; run tests from inside the lanyard repo", rel, wd)
		}
	}
}
