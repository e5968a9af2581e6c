// Package systemd_test runs Lanyard's Debian package under a real systemd:
// a minimal Debian root (test/systemd/build.sh builds it once into a cache)
// booted with systemd-nspawn, the .deb of deploy/packaging installed with
// dpkg, the shipped lanyard.service started unchanged, workloads as units
// of their own identified by the systemd attestor.
//
// It needs root. Outside CI a test without root skips; with CI=true any
// missing prerequisite fails the test.
package systemd_test

import (
	"bufio"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

const (
	// socketPath is the shipped agent.conf's socket_path.
	socketPath = "/run/lanyard/public/api.sock"
	// testVersion is what the test's binary says `lanyard version` is.
	testVersion = "systemd-test"
	// workloadTimeout bounds the wait for a workload's answer.
	workloadTimeout = 60 * time.Second
)

// The test's units: two services of the same user running the same binary,
// told apart only by their unit.
const (
	workloadUnit = "lanyard-workload.service"
	otherUnit    = "lanyard-other.service"
	unitDir      = "/etc/systemd/system/"
)

// unitFile runs the k8s tests' workload (test/k8s/workload): it fetches its
// X509-SVID every 200 ms and writes one line per attempt to
// /inside/out/<unit>.log, which the test reads from the host.
const unitFile = `[Unit]
Description=Lanyard test workload %n
After=lanyard.service

[Service]
User=workload
Environment=SPIFFE_ENDPOINT_SOCKET=unix://` + socketPath + `
Environment=WORKLOAD_INTERVAL=200ms
ExecStart=/inside/workload
StandardOutput=truncate:/inside/out/%n.log
StandardError=inherit
`

// agentConf is the shipped agent.conf's agent block with the test's
// entries; entries is HCL of entry blocks.
func agentConf(entries string) string {
	return `agent {
    trust_domain = "example.org"
    data_dir = "/var/lib/lanyard"
    socket_path = "` + socketPath + `"
    log_level = "debug"
}
plugins {
    WorkloadAttestor "unix" {
        plugin_data {}
    }
    WorkloadAttestor "systemd" {
        plugin_data {}
    }
    UpstreamAuthority "local" {
        plugin_data {
` + entries + `
        }
    }
}
`
}

const (
	workloadID    = "spiffe://example.org/service/workload"
	workloadEntry = `            entry {
                spiffe_id = "` + workloadID + `"
                selectors = ["systemd:id:` + workloadUnit + `", "systemd:fragment_path:` + unitDir + workloadUnit + `"]
            }
`
	otherID    = "spiffe://example.org/service/other"
	otherEntry = `            entry {
                spiffe_id = "` + otherID + `"
                selectors = ["systemd:id:` + otherUnit + `"]
            }
`
)

func TestPackageUnderSystemd(t *testing.T) {
	begin := time.Now()
	files := readyFiles(t)
	c := bootWithJournal(t, files)
	t.Log("dpkg -i")
	c.must("dpkg", "-i", "/inside/"+filepath.Base(files.deb))
	checkInstalled(t, c)

	// The shipped unit with the shipped config. Type=notify: start
	// returns once the socket serves.
	c.must("lanyard", "validate", "-config", "/etc/lanyard/agent.conf")
	start := time.Now()
	c.must("systemctl", "start", "lanyard.service")
	conn, err := net.Dial("unix", c.path(socketPath))
	if err != nil {
		t.Fatalf("systemctl start lanyard returned (after %s) but the socket does not serve: %v", time.Since(start).Round(time.Millisecond), err)
	}
	conn.Close()
	t.Logf("systemctl start lanyard: serving after %s", time.Since(start).Round(time.Millisecond))
	before := show(t, c, "lanyard.service", "MainPID", "NRestarts", "ActiveState", "User")
	if before["ActiveState"] != "active" || before["User"] != "lanyard" || before["NRestarts"] != "0" {
		t.Fatalf("lanyard.service after start: %v", before)
	}

	// The test's entry, in place of the shipped config (a conffile: an
	// upgrade keeps the admin's edit), applied by a reload.
	writeFile(t, c.path("/etc/lanyard/agent.conf"), agentConf(workloadEntry))
	c.must("systemctl", "reload", "lanyard.service")
	// The workloads' user: not the agent's, not root.
	c.must("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "workload")
	for _, unit := range []string{workloadUnit, otherUnit} {
		writeFile(t, c.path(unitDir+unit), unitFile)
	}
	c.must("systemctl", "daemon-reload")
	c.must("systemctl", "start", workloadUnit, otherUnit)
	workloadLog := filepath.Join(files.bind, "out", workloadUnit+".log")
	otherLog := filepath.Join(files.bind, "out", otherUnit+".log")
	waitLine(t, workloadLog, 0, "svid "+workloadID)
	// Same user, same binary: only the unit differs, and no entry has it.
	if line := waitLine(t, otherLog, 0, "error "); !strings.Contains(line, "PermissionDenied") {
		t.Fatalf("%s: want PermissionDenied, got %q", otherUnit, line)
	}

	// Another reload: the new entry applies in the same process, which
	// keeps serving throughout.
	writeFile(t, c.path("/etc/lanyard/agent.conf"), agentConf(workloadEntry+otherEntry))
	mark := len(readLines(workloadLog))
	c.must("systemctl", "reload", "lanyard.service")
	waitLine(t, otherLog, 0, "svid "+otherID)
	waitLine(t, workloadLog, mark+3, "svid "+workloadID)
	for _, line := range readLines(workloadLog)[mark:] {
		if !strings.HasPrefix(line, "svid "+workloadID) {
			t.Errorf("%s around the reload: %q", workloadUnit, line)
		}
	}
	after := show(t, c, "lanyard.service", "MainPID", "NRestarts", "ActiveState")
	if after["MainPID"] != before["MainPID"] || after["NRestarts"] != "0" || after["ActiveState"] != "active" {
		t.Fatalf("after two systemctl reloads: %v, before: %v", after, before)
	}

	// An upgrade (here the same version again) keeps the edited conffile
	// and restarts a running agent.
	checkUpgradeRestarts(t, c, files.deb)
	mark = len(readLines(otherLog))
	waitLine(t, otherLog, mark+1, "svid "+otherID)

	c.must("systemctl", "stop", workloadUnit, otherUnit)
	stop := time.Now()
	c.must("systemctl", "stop", "lanyard.service")
	stopped := show(t, c, "lanyard.service", "ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
	// ExecMainCode 1 is CLD_EXITED: it exited by itself, not by a signal.
	if stopped["ActiveState"] != "inactive" || stopped["Result"] != "success" || stopped["ExecMainCode"] != "1" || stopped["ExecMainStatus"] != "0" {
		t.Fatalf("after systemctl stop: %v", stopped)
	}
	t.Logf("systemctl stop lanyard: exited 0 after %s", time.Since(stop).Round(time.Millisecond))

	checkPurged(t, c)
	t.Logf("whole test %s", time.Since(begin).Round(10*time.Millisecond))
}

// A root without init-system-helpers (deb-systemd-helper and -invoke):
// the maintainer scripts fall back to systemctl.
func TestPackageWithoutDebSystemdHelper(t *testing.T) {
	files := readyFiles(t)
	c := bootWithJournal(t, files)
	// The root is an overlay on a tmpfs: nothing of the cache changes.
	c.must("sh", "-c", "rm /usr/bin/deb-systemd-helper /usr/bin/deb-systemd-invoke")
	c.must("dpkg", "-i", "/inside/"+filepath.Base(files.deb))
	checkInstalled(t, c)
	c.must("systemctl", "start", "lanyard.service")
	checkUpgradeRestarts(t, c, files.deb)
	checkPurged(t, c)
	if out := c.must("find", "/etc/systemd/system", "-name", "lanyard.service"); strings.TrimSpace(out) != "" {
		t.Errorf("after dpkg --purge, links to the unit remain: %s", out)
	}
}

// bootWithJournal boots the root, and on failure logs the journal of the
// agent and the workloads.
func bootWithJournal(t *testing.T, files testFiles) *container {
	t.Helper()
	c := bootContainer(t, files.root, files.bind)
	t.Cleanup(func() {
		if t.Failed() {
			out, _ := c.run("journalctl", "--no-pager", "-o", "short-precise", "-n", "300",
				"-u", "lanyard.service", "-u", workloadUnit, "-u", otherUnit)
			t.Logf("the test failed; the container's journal:\n%s", out)
		}
	})
	return c
}

// checkUpgradeRestarts installs deb over the running agent, as an upgrade
// does: postinst restarts it.
func checkUpgradeRestarts(t *testing.T, c *container, deb string) {
	t.Helper()
	running := show(t, c, "lanyard.service", "MainPID")
	c.must("dpkg", "-i", "/inside/"+filepath.Base(deb))
	upgraded := show(t, c, "lanyard.service", "MainPID", "ActiveState")
	if upgraded["ActiveState"] != "active" || upgraded["MainPID"] == running["MainPID"] {
		t.Fatalf("after dpkg -i over the running agent: %v, want active with a new MainPID (was %s)", upgraded, running["MainPID"])
	}
}

// checkPurged removes the package while the agent runs: prerm stops it,
// purge removes its files, config and state.
func checkPurged(t *testing.T, c *container) {
	t.Helper()
	c.must("systemctl", "start", "lanyard.service")
	c.must("dpkg", "--purge", "lanyard")
	if out, _ := c.run("systemctl", "is-active", "lanyard.service"); strings.TrimSpace(out) != "inactive" {
		t.Errorf("after dpkg --purge, lanyard.service is %q", strings.TrimSpace(out))
	}
	for _, gone := range []string{"/usr/bin/lanyard", "/usr/lib/systemd/system/lanyard.service", "/etc/lanyard/agent.conf", "/var/lib/lanyard"} {
		if _, err := os.Lstat(c.path(gone)); err == nil {
			t.Errorf("after dpkg --purge, %s is still there", gone)
		}
	}
}

// checkInstalled checks what dpkg -i did: the binary of this version, the
// user from sysusers.d, the conffile, and the unit enabled but not started
// (the agent needs its config first).
func checkInstalled(t *testing.T, c *container) {
	t.Helper()
	if out := c.must("lanyard", "version"); !strings.Contains(out, testVersion) {
		t.Errorf("lanyard version: %q, want %s", out, testVersion)
	}
	c.must("id", "lanyard")
	if out := c.must("dpkg-query", "-W", "-f=${Conffiles}", "lanyard"); !strings.Contains(out, "/etc/lanyard/agent.conf") {
		t.Errorf("conffiles: %q", out)
	}
	if out, _ := c.run("systemctl", "is-enabled", "lanyard.service"); strings.TrimSpace(out) != "enabled" {
		t.Errorf("after dpkg -i, lanyard.service is-enabled: %q", out)
	}
	if out, _ := c.run("systemctl", "is-active", "lanyard.service"); strings.TrimSpace(out) != "inactive" {
		t.Errorf("after dpkg -i, lanyard.service is-active: %q", out)
	}
}

// show is systemctl show's properties of unit.
func show(t *testing.T, c *container, unit string, props ...string) map[string]string {
	t.Helper()
	out := c.must("systemctl", "show", unit, "-p", strings.Join(props, ","))
	m := map[string]string{}
	for _, line := range strings.Split(out, "\n") {
		if k, v, ok := strings.Cut(line, "="); ok {
			m[k] = v
		}
	}
	return m
}

func writeFile(t *testing.T, path, data string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
}

// readLines are the complete lines of a workload's log so far.
func readLines(path string) []string {
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	var lines []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		lines = append(lines, sc.Text())
	}
	return lines
}

// waitLine waits until the log has a line from index from on that starts
// with prefix, and returns it.
func waitLine(t *testing.T, path string, from int, prefix string) string {
	t.Helper()
	deadline := time.Now().Add(workloadTimeout)
	for {
		lines := readLines(path)
		for i := from; i < len(lines); i++ {
			if strings.HasPrefix(lines[i], prefix) {
				return lines[i]
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: no line %q after %s; its lines:\n%s", filepath.Base(path), prefix, workloadTimeout, strings.Join(lines, "\n"))
		}
		time.Sleep(pollEvery)
	}
}
