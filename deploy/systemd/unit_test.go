// Package systemd_test checks the files shipped for running Lanyard under
// systemd with systemd's own tools: the unit passes `systemd-analyze
// verify`, rates an exposure of at most 3.0 on `systemd-analyze security`,
// keeps what attestation needs, and agrees with sysusers.d, tmpfiles.d and
// the default agent.conf.
package systemd_test

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/lanyard-dev/lanyard/conf"
	"github.com/lanyard-dev/lanyard/internal/testkit"
)

// maxExposure is the exposure the unit must not exceed (issue 12); it
// rates 1.4 as shipped.
const maxExposure = 3.0

var lanyardBin string

func TestMain(m *testing.M) {
	os.Exit(testkit.RunWithLanyard(m, func(bin string) error {
		lanyardBin = bin
		return nil
	}))
}

// requireTool finds a tool of systemd's, installing the systemd package
// from Debian through scripts/install-debian.sh when it is missing.
// Without it the test skips, or fails under CI=true.
func requireTool(t *testing.T, name string) string {
	t.Helper()
	if path, err := exec.LookPath(name); err == nil {
		return path
	}
	out, err := exec.Command("../../scripts/install-debian.sh", "systemd:"+name).CombinedOutput()
	path, lookErr := exec.LookPath(name)
	if lookErr == nil {
		return path
	}
	msg := fmt.Sprintf("%s is missing and scripts/install-debian.sh did not install it: %v\n%s", name, err, out)
	if os.Getenv("CI") == "true" {
		t.Fatal(msg)
	}
	t.Skip(msg)
	return ""
}

// unitFile is a unit's settings by section and key, every value of a key
// that is set more than once, in order.
type unitFile map[string]map[string][]string

func parseUnit(t *testing.T, path string) unitFile {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	u := unitFile{}
	section := ""
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || strings.HasPrefix(line, "#") || strings.HasPrefix(line, ";"):
		case strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]"):
			section = line[1 : len(line)-1]
			u[section] = map[string][]string{}
		default:
			key, value, ok := strings.Cut(line, "=")
			if !ok || section == "" {
				t.Fatalf("%s: %q is not a setting of a section", path, line)
			}
			u[section][key] = append(u[section][key], value)
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return u
}

// last is the value of a setting that is set once (the last one wins).
func (u unitFile) last(section, key string) string {
	v := u[section][key]
	if len(v) == 0 {
		return ""
	}
	return v[len(v)-1]
}

// TestUnitVerifies: `systemd-analyze verify` finds nothing to say about the
// unit. It checks that ExecStart's binary exists, so the copy it verifies
// runs the lanyard just built instead of /usr/bin/lanyard.
func TestUnitVerifies(t *testing.T) {
	analyze := requireTool(t, "systemd-analyze")
	unit, err := os.ReadFile("lanyard.service")
	if err != nil {
		t.Fatal(err)
	}
	const shipped = "ExecStart=/usr/bin/lanyard "
	if !strings.Contains(string(unit), shipped) {
		t.Fatalf("lanyard.service has no %q line", shipped)
	}
	copied := strings.Replace(string(unit), shipped, "ExecStart="+lanyardBin+" ", 1)
	path := filepath.Join(t.TempDir(), "lanyard.service")
	if err := os.WriteFile(path, []byte(copied), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(analyze, "verify", "--no-pager", path).CombinedOutput()
	if err != nil || len(strings.TrimSpace(string(out))) > 0 {
		t.Fatalf("systemd-analyze verify lanyard.service: %v\n%s", err, out)
	}
}

var exposureLine = regexp.MustCompile(`Overall exposure level for lanyard\.service: ([0-9.]+)`)

// TestUnitExposure: `systemd-analyze security --offline=true` rates the
// unit at most maxExposure.
func TestUnitExposure(t *testing.T) {
	analyze := requireTool(t, "systemd-analyze")
	out, err := exec.Command(analyze, "security", "--offline=true", "--no-pager", "lanyard.service").CombinedOutput()
	if err != nil {
		t.Fatalf("systemd-analyze security: %v\n%s", err, out)
	}
	m := exposureLine.FindSubmatch(out)
	if m == nil {
		t.Fatalf("no overall exposure in the output of systemd-analyze security:\n%s", out)
	}
	exposure, err := strconv.ParseFloat(string(m[1]), 64)
	if err != nil {
		t.Fatal(err)
	}
	if exposure > maxExposure {
		t.Fatalf("lanyard.service rates an exposure of %.1f, want at most %.1f:\n%s", exposure, maxExposure, out)
	}
	t.Logf("exposure %.1f", exposure)
}

// TestUnitKeepsAttestation: the hardening leaves what attestation needs.
// Each of these passes systemd-analyze and would break the agent.
func TestUnitKeepsAttestation(t *testing.T) {
	svc := parseUnit(t, "lanyard.service")["Service"]
	if svc == nil {
		t.Fatal("lanyard.service has no [Service] section")
	}
	for key, why := range map[string]string{
		"ProtectProc":    "invisible hides other users' processes: their calls would be refused",
		"PrivateUsers":   "other users' uids would read as nobody in SO_PEERCRED and /proc",
		"PrivateNetwork": "the SPIRE Server and the kubelet are on the network",
		"ProcSubset":     "the metrics' process collector reads /proc/stat",
		"IPAddressDeny":  "the SPIRE Server's address is the config's",
	} {
		if v, ok := svc[key]; ok {
			t.Errorf("lanyard.service sets %s=%s: %s", key, strings.Join(v, " "), why)
		}
	}
	families := strings.Fields(strings.Join(svc["RestrictAddressFamilies"], " "))
	for _, need := range []string{"AF_UNIX", "AF_INET", "AF_INET6"} {
		if !slices.Contains(families, need) || slices.Contains(families, "~"+need) {
			t.Errorf("RestrictAddressFamilies=%s must allow %s", strings.Join(families, " "), need)
		}
	}
	for key, want := range map[string]string{
		"Type":       "notify",
		"ExecReload": "/bin/kill -HUP $MAINPID",
		"User":       "lanyard",
		// The default, main: only the agent's own process may notify.
		"NotifyAccess": "",
	} {
		if got := strings.Join(svc[key], " "); got != want {
			t.Errorf("lanyard.service: %s=%s, want %q", key, got, want)
		}
	}
}

// TestSysusersAndTmpfiles: sysusers.d makes the unit's user, and
// tmpfiles.d the unit's directories with the owner and modes the agent
// requires, in a scratch root.
func TestSysusersAndTmpfiles(t *testing.T) {
	sysusers := requireTool(t, "systemd-sysusers")
	tmpfiles := requireTool(t, "systemd-tmpfiles")
	root := t.TempDir()
	if err := os.MkdirAll(filepath.Join(root, "etc"), 0o755); err != nil {
		t.Fatal(err)
	}
	abs := func(p string) string {
		a, err := filepath.Abs(p)
		if err != nil {
			t.Fatal(err)
		}
		return a
	}
	if out, err := exec.Command(sysusers, "--root="+root, abs("sysusers.d/lanyard.conf")).CombinedOutput(); err != nil {
		t.Fatalf("systemd-sysusers: %v\n%s", err, out)
	}
	passwd, err := os.ReadFile(filepath.Join(root, "etc", "passwd"))
	if err != nil {
		t.Fatal(err)
	}
	user := parseUnit(t, "lanyard.service").last("Service", "User")
	var uid string
	for _, line := range strings.Split(string(passwd), "\n") {
		fields := strings.Split(line, ":")
		if len(fields) == 7 && fields[0] == user {
			uid = fields[2]
			if fields[6] != "/usr/sbin/nologin" {
				t.Errorf("the user %s has the shell %s, want none", user, fields[6])
			}
		}
	}
	if uid == "" {
		t.Fatalf("sysusers.d/lanyard.conf made no user %s (the unit's User=):\n%s", user, passwd)
	}
	if out, err := exec.Command(tmpfiles, "--root="+root, "--create", abs("tmpfiles.d/lanyard.conf")).CombinedOutput(); err != nil {
		t.Fatalf("systemd-tmpfiles: %v\n%s", err, out)
	}
	for dir, mode := range map[string]os.FileMode{
		"run/lanyard":        0o755,
		"run/lanyard/public": 0o755,
		"var/lib/lanyard":    0o700,
	} {
		info, err := os.Stat(filepath.Join(root, dir))
		if err != nil {
			t.Error(err)
			continue
		}
		owner := strconv.FormatUint(uint64(info.Sys().(*syscall.Stat_t).Uid), 10)
		if info.Mode().Perm() != mode || owner != uid {
			t.Errorf("/%s: mode %o owner %s, want %o owner %s", dir, info.Mode().Perm(), owner, mode, uid)
		}
	}
}

// TestAgentConf: the agent.conf the package installs passes `lanyard
// validate`, and puts the socket and data_dir where the unit lets the
// agent write.
func TestAgentConf(t *testing.T) {
	out, code := testkit.RunCLI(t, lanyardBin, "validate", "-config", "agent.conf")
	if code != 0 {
		t.Fatalf("lanyard validate -config agent.conf: exit %d\n%s", code, out)
	}
	cfg, err := conf.Load("agent.conf", false)
	if err != nil {
		t.Fatal(err)
	}
	svc := parseUnit(t, "lanyard.service")["Service"]
	if want := "/run/" + svc["RuntimeDirectory"][0] + "/"; !strings.HasPrefix(cfg.Agent.SocketPath, want) {
		t.Errorf("socket_path %s is not under %s, the one runtime directory the agent may write", cfg.Agent.SocketPath, want)
	}
	if want := "/var/lib/" + svc["StateDirectory"][0]; cfg.Agent.DataDir != want {
		t.Errorf("data_dir %s, want %s (StateDirectory)", cfg.Agent.DataDir, want)
	}
	if want := "-config /etc/" + svc["ConfigurationDirectory"][0] + "/agent.conf"; !strings.HasSuffix(svc["ExecStart"][0], want) {
		t.Errorf("ExecStart=%s does not end with %s", svc["ExecStart"][0], want)
	}
}
