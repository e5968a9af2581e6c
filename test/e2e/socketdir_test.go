package e2e

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/test/testbin"
)

// TestPlantedSocketDirIsRefused: another user made the socket directory
// before the agent started, and left a symlink in it where the agent puts
// its lock. The agent must refuse to start and say why, rather than serve
// from a directory whose owner can swap the socket for their own.
func TestPlantedSocketDirIsRefused(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root to plant a directory as another user")
	}
	dir := newAgentDir(t)
	a := &agentProc{
		t:       t,
		dir:     dir,
		config:  filepath.Join(dir, "agent.conf"),
		socket:  filepath.Join(dir, "public", "api.sock"),
		dataDir: filepath.Join(dir, "data"),
	}
	a.writeConfig(baseConfig)
	public := filepath.Dir(a.socket)
	if err := os.Mkdir(public, 0o755); err != nil {
		t.Fatal(err)
	}
	// Root would create this file by opening its lock through the symlink.
	target := filepath.Join(dir, "created-through-the-lock")
	if err := os.Symlink(target, a.socket+".lock"); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{public, a.socket + ".lock"} {
		if err := os.Lchown(p, attackerUID, attackerUID); err != nil {
			t.Fatal(err)
		}
	}

	p, err := testbin.Start(t, lanyardBin, "run", "-config", a.config)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.WaitServing(a.socket, 30*time.Second); err == nil {
		// It serves from the attacker's directory: show what that gives.
		swap := startRole(t, attackerUID, "swap", a.socket)
		if line, _ := swap.next(t, 30*time.Second); line != "swapped" {
			t.Fatalf("the agent started in %s, owned by uid %d (the attacker could not swap its socket: %q %s)", public, attackerUID, line, swap.errors())
		}
		if c, err := net.Dial("unix", a.socket); err == nil {
			c.Close()
		}
		line, _ := swap.next(t, 30*time.Second)
		t.Fatalf("the agent started in %s, owned by uid %d; the attacker then replaced its socket and a workload's connection reached the attacker (%q)", public, attackerUID, line)
	}
	select {
	case <-p.Exited:
	case <-time.After(30 * time.Second):
		t.Fatal("the agent neither served nor exited")
	}
	if p.ExitErr == nil {
		t.Fatal("the agent exited 0 on a planted socket directory")
	}
	out := p.Logs.String()
	for _, want := range []string{public, "uid 47001", "drwxr-xr-x"} {
		if !strings.Contains(out, want) {
			t.Errorf("the refusal does not name %q:\n%s", want, out)
		}
	}
	if _, err := os.Lstat(target); err == nil {
		t.Error("the agent created a file through the planted lock symlink")
	}
	if _, err := os.Lstat(a.socket); err == nil {
		t.Error("the agent left a socket in the planted directory")
	}
}
