package e2e

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testkit"
)

// TestPlantedSocketDirIsRefused: before the agent started, another user
// made the socket directory (or it is left writable by everyone), and put
// a symlink in it where the agent puts its lock. The agent must refuse to
// start and say why, rather than serve from a directory where that user
// can swap the socket for their own.
func TestPlantedSocketDirIsRefused(t *testing.T) {
	testkit.RequireRoot(t, "to plant a directory as another user")
	for _, tc := range []struct {
		name       string
		mode       os.FileMode
		owner      int
		wantInLogs []string
	}{
		{"owned by the attacker", 0o755, attackerUID, []string{"uid 47001", "drwxr-xr-x"}},
		{"writable by others", 0o777, 0, []string{"uid 0", "drwxrwxrwx"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			plantedSocketDir(t, tc.mode, tc.owner, tc.wantInLogs)
		})
	}
}

func plantedSocketDir(t *testing.T, mode os.FileMode, owner int, wantInLogs []string) {
	dir := newAgentDir(t)
	a := newAgentProc(t, dir, baseConfig)
	public := filepath.Dir(a.socket)
	if err := os.Mkdir(public, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(public, mode); err != nil {
		t.Fatal(err)
	}
	// Root would create this file by opening its lock through the symlink.
	target := filepath.Join(dir, "created-through-the-lock")
	if err := os.Symlink(target, a.socket+".lock"); err != nil {
		t.Fatal(err)
	}
	if err := os.Lchown(public, owner, owner); err != nil {
		t.Fatal(err)
	}
	if err := os.Lchown(a.socket+".lock", attackerUID, attackerUID); err != nil {
		t.Fatal(err)
	}

	p, err := testkit.Start(t, lanyardBin, "run", "-config", a.config)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.WaitServing(a.socket, 30*time.Second); err == nil {
		// It serves from a directory the attacker can write: show what
		// that gives.
		swap := startRole(t, attackerUID, "swap", a.socket)
		if line, _ := swap.Next(t, 30*time.Second); line != "swapped" {
			t.Fatalf("the agent started in %s (mode %o, uid %d); the attacker could not swap its socket: %q %s", public, mode, owner, line, swap.Stderr.String())
		}
		if c, err := net.Dial("unix", a.socket); err == nil {
			c.Close()
		}
		line, _ := swap.Next(t, 30*time.Second)
		_, lockErr := os.Lstat(target)
		t.Fatalf("the agent started in %s (mode %o, uid %d); the attacker then replaced its socket and a workload's connection reached the attacker (%q); root created the lock symlink's target: %v", public, mode, owner, line, lockErr == nil)
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
	for _, want := range append([]string{public}, wantInLogs...) {
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
