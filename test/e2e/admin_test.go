package e2e

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/lanyard-dev/lanyard/test/delegate"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// The users of the Delegated Identity tests. None needs a passwd entry.
const (
	agentGID    = 47100 // the agent's group, which the admin socket is shared with
	delegateUID = 47101 // the node proxy: an authorized delegate
	podUID      = 47102 // a workload the delegate gets identities for
	strangerUID = 47103 // in the agent's group with an entry, but not a delegate
	noEntryUID  = 47104 // in the agent's group with no entry
	outsiderUID = 47105 // not in the agent's group
)

const (
	delegateID = "spiffe://example.org/delegate"
	podID      = "spiffe://example.org/pod"
)

// adminConfig serves the admin API beside the Workload API with entries
// for the delegate, the pod and the stranger. @ADMIN@ is the admin socket,
// @TTL@ the X509-SVIDs' lifetime.
const adminConfig = `
agent {
  trust_domain         = "example.org"
  data_dir             = "@DATA@"
  socket_path          = "@SOCKET@"
  admin_socket_path    = "@ADMIN@"
  authorized_delegates = ["` + delegateID + `"]
  log_level            = "debug"
}
plugins {
  WorkloadAttestor "unix" { plugin_data {} }
  UpstreamAuthority "local" {
    plugin_data {
      x509_svid_ttl = "@TTL@"
      jwt_svid_ttl  = "5m"
      entry {
        spiffe_id = "` + delegateID + `"
        selectors = ["unix:uid:47101"]
      }
      entry {
        spiffe_id = "` + podID + `"
        selectors = ["unix:uid:47102"]
        hint      = "pod"
      }
      entry {
        spiffe_id = "spiffe://example.org/stranger"
        selectors = ["unix:uid:47103"]
      }
    }
  }
}
`

// adminAgent is a lanyard agent serving the admin API.
type adminAgent struct {
	*agentProc
	admin string
}

// startAdminAgent runs lanyard as root with primary group agentGID, so
// that the admin socket's directory and the socket are the agent's group's
// (as for an agent run as its own user and group), with X509-SVIDs of ttl.
func startAdminAgent(t *testing.T, ttl string) *adminAgent {
	t.Helper()
	dir := newAgentDir(t)
	admin := filepath.Join(dir, "private", "admin.sock")
	a := newAgentProc(t, dir, strings.NewReplacer("@ADMIN@", admin, "@TTL@", ttl).Replace(adminConfig))
	p, err := testkit.StartWith(t, &syscall.SysProcAttr{
		Credential: &syscall.Credential{Uid: 0, Gid: agentGID},
		Pdeathsig:  syscall.SIGKILL,
	}, lanyardBin, "run", "-config", a.config)
	if err != nil {
		t.Fatal(err)
	}
	a.Process = p
	if err := p.WaitServing(a.socket, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	return &adminAgent{agentProc: a, admin: admin}
}

// delegateBound bounds each wait for the client: a process start, an
// attestation and a signing on a loaded 2-core machine.
const delegateBound = 20 * time.Second

func hasSVIDs(m delegate.Msg) bool { return m.Kind == "x509" && len(m.X509.X509Svids) > 0 }

// TestDelegatedIdentityForAnotherUser is the node proxy's path: a delegate
// of its own uid, with its own SVID from the Workload API, gets the
// identities of a real process of another uid from the admin socket, by
// selectors and by PID, verified against the bundle it subscribes to, and
// the rotated SVID on its open stream; JWT-SVIDs validate against the JWT
// bundles; a PID that exits ends its stream with NotFound.
func TestDelegatedIdentityForAnotherUser(t *testing.T) {
	testkit.RequireRoot(t, "to run the delegate and the workload under other uids")
	a := startAdminAgent(t, "6s")
	bin := delegate.Build(t)
	pod := delegate.StartWorkload(t, podUID)
	run := func(args ...string) *delegate.Client {
		return delegate.Start(t, bin, delegateUID, agentGID, args...)
	}

	bundles := run(delegate.Args(a.socket, a.admin, "x509bundles", 0)...)
	if m := bundles.Next(t, delegateBound); m.Kind != "self" || m.Self != delegateID {
		t.Fatalf("the delegate's own SVID from the Workload API: %+v, want %s", m, delegateID)
	}
	set := delegate.X509Bundles(t, bundles.Until(t, delegateBound, "the X.509 bundles", func(m delegate.Msg) bool { return m.Kind == "x509bundles" }).X509Bundles)
	if set.Len() != 1 {
		t.Fatalf("%d X.509 bundles, want example.org's only", set.Len())
	}

	bySelectors := run(delegate.Args(a.socket, a.admin, "x509", 0, "unix:uid:"+strconv.Itoa(podUID))...)
	first := bySelectors.Until(t, delegateBound, "the pod's X509-SVID", hasSVIDs)
	svids := delegate.SVIDs(t, first.X509, set)
	if len(svids) != 1 || svids[0].ID.String() != podID || svids[0].Hint != "pod" {
		t.Fatalf("by selectors: %v, want one SVID for %s with hint pod", first.X509, podID)
	}

	byPID := run(delegate.Args(a.socket, a.admin, "x509", pod.Cmd.Process.Pid)...)
	m := byPID.Until(t, delegateBound, "the pod's X509-SVID by PID", hasSVIDs)
	if got := delegate.SVIDs(t, m.X509, set); len(got) != 1 || got[0].ID.String() != podID {
		t.Fatalf("by PID: %v, want one SVID for %s", m.X509, podID)
	}

	// The SVIDs live 6 s and are renewed at half-life: the rotated one
	// reaches the open stream, and verifies too.
	leaf := svids[0].Certificates[0]
	rotated := bySelectors.Until(t, delegateBound, "the pod's rotated X509-SVID", func(m delegate.Msg) bool {
		return hasSVIDs(m) && !delegate.SVIDs(t, m.X509, set)[0].Certificates[0].Equal(leaf)
	})
	if next := delegate.SVIDs(t, rotated.X509, set)[0]; next.ID.String() != podID || !next.Certificates[0].NotBefore.After(leaf.NotBefore) {
		t.Fatalf("the rotated SVID is %s from %s, want %s newer than %s", next.ID, next.Certificates[0].NotBefore, podID, leaf.NotBefore)
	}

	jwtBundles := run(delegate.Args(a.socket, a.admin, "jwtbundles", 0)...)
	jwtSet := delegate.JWTBundles(t, jwtBundles.Until(t, delegateBound, "the JWT bundles", func(m delegate.Msg) bool { return m.Kind == "jwtbundles" }).JWTBundles)
	for _, pid := range []int{0, pod.Cmd.Process.Pid} {
		var sels []string
		if pid == 0 {
			sels = []string{"unix:uid:" + strconv.Itoa(podUID)}
		}
		c := run(append([]string{"-audience", "db"}, delegate.Args(a.socket, a.admin, "jwt", pid, sels...)...)...)
		m := c.Until(t, delegateBound, "the pod's JWT-SVID", func(m delegate.Msg) bool { return m.Kind == "jwt" })
		if len(m.JWT.Svids) != 1 || m.JWT.Svids[0].Hint != "pod" {
			t.Fatalf("pid %d: JWT-SVIDs %v, want one for %s with hint pod", pid, m.JWT.Svids, podID)
		}
		parsed, err := jwtsvid.ParseAndValidate(m.JWT.Svids[0].Token, jwtSet, []string{"db"})
		if err != nil || parsed.ID.String() != podID || parsed.Expiry.Unix() != m.JWT.Svids[0].ExpiresAt {
			t.Fatalf("pid %d: the JWT-SVID does not validate against the JWT bundles as %s: %v %v", pid, podID, parsed, err)
		}
	}

	// A PID that exits ends its stream with NotFound.
	_ = pod.Cmd.Process.Kill()
	<-pod.Exited
	if end := byPID.End(t, delegateBound); end.Code != codes.NotFound || !strings.Contains(end.Message, "is not running") {
		t.Fatalf("the stream of an exited PID ended with %s (%s), want NotFound", end.Code, end.Message)
	}
	gone := run(delegate.Args("", a.admin, "x509", pod.Cmd.Process.Pid)...)
	if end := gone.End(t, delegateBound); end.Code != codes.NotFound {
		t.Fatalf("a subscription for a PID that is gone: %s (%s), want NotFound", end.Code, end.Message)
	}
}

// TestAdminSocketRefusesOthers: the admin socket's directory (0750) and
// the socket (0770) are the agent's group's, so a user outside it cannot
// even connect; in the group, a caller whose entries are no delegate's,
// and one with no entry, are refused with PermissionDenied.
func TestAdminSocketRefusesOthers(t *testing.T) {
	testkit.RequireRoot(t, "to run callers under other uids")
	a := startAdminAgent(t, "1h")
	bin := delegate.Build(t)

	for path, mode := range map[string]os.FileMode{filepath.Dir(a.admin): os.ModeDir | 0o750, a.admin: os.ModeSocket | 0o770} {
		info, err := os.Lstat(path)
		if err != nil {
			t.Fatal(err)
		}
		st := info.Sys().(*syscall.Stat_t)
		if info.Mode()&(os.ModeType|os.ModePerm) != mode || st.Uid != 0 || st.Gid != agentGID {
			t.Fatalf("%s: mode %v owner %d:%d, want %v root:%d (the agent's user and group)", path, info.Mode(), st.Uid, st.Gid, mode, agentGID)
		}
	}
	// Neither socket serves the other's API.
	if end := delegate.Start(t, bin, delegateUID, agentGID, "-admin", a.socket, "x509bundles").End(t, delegateBound); end.Code != codes.Unimplemented {
		t.Fatalf("the Delegated Identity API on the Workload API socket: %s (%s), want Unimplemented", end.Code, end.Message)
	}
	if _, err := workloadapi.FetchX509SVID(testContext(t), workloadapi.WithAddr("unix://"+a.admin)); status.Code(err) != codes.Unimplemented {
		t.Fatalf("the Workload API on the admin socket: %v, want Unimplemented", err)
	}

	podSelector := "unix:uid:" + strconv.Itoa(podUID)
	cases := []struct {
		name     string
		uid, gid int
		workload string // the Workload API socket, for a caller with an SVID
		code     codes.Code
		message  string
	}{
		{"not a delegate", strangerUID, agentGID, a.socket, codes.PermissionDenied, "not configured as an authorized delegate"},
		{"no entry", noEntryUID, agentGID, "", codes.PermissionDenied, "no identity issued"},
		{"outside the agent's group", outsiderUID, outsiderUID, "", codes.Unavailable, "permission denied"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			for _, call := range []string{"x509", "x509bundles", "jwtbundles"} {
				c := delegate.Start(t, bin, tc.uid, tc.gid, delegate.Args(tc.workload, a.admin, call, 0, podSelector)...)
				end := c.End(t, delegateBound)
				if end.Kind != "end" || end.Code != tc.code || !strings.Contains(end.Message, tc.message) {
					t.Fatalf("%s: %s %s (%s), want %s containing %q", call, end.Kind, end.Code, end.Message, tc.code, tc.message)
				}
			}
		})
	}
}
