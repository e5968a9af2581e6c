package unix

import (
	"context"
	"errors"
	"os"
	"strconv"
	"strings"
	"testing"

	"github.com/lanyard-dev/lanyard/attestor"
	sysunix "golang.org/x/sys/unix"
)

// processOf describes a running process as the Workload API's handshake
// would: its current effective ids and groups, and its executable.
func processOf(t testing.TB, pid int32) attestor.Process {
	t.Helper()
	path := "/proc/" + strconv.Itoa(int(pid))
	buf := make([]byte, 4096)
	st, err := readStatus(path+"/status", &buf)
	if err != nil {
		t.Fatal(err)
	}
	p := attestor.Process{PID: pid, UID: st.uid, GID: st.gid, GroupsKnown: true}
	for _, f := range strings.Fields(string(st.groups)) {
		g, err := strconv.ParseUint(f, 10, 32)
		if err != nil {
			t.Fatal(err)
		}
		p.Groups = append(p.Groups, uint32(g))
	}
	var exe sysunix.Stat_t
	if err := sysunix.Stat(path+"/exe", &exe); err != nil {
		t.Fatal(err)
	}
	p.Exe = attestor.FileID{Dev: exe.Dev, Ino: exe.Ino}
	return p
}

// TestSelectorsComeFromConnectCredentials: the uid, gid and groups are the
// ones recorded at connect, not what /proc shows now. A process that
// executed a setuid program since would show that program's credentials.
func TestSelectorsComeFromConnectCredentials(t *testing.T) {
	a := newTestAttestor(t, "")
	self := processOf(t, int32(os.Getpid()))
	recorded := self
	recorded.UID, recorded.GID, recorded.Groups = 64001, 64002, []uint32{64003}
	sels, err := a.Attest(context.Background(), recorded)
	if err != nil {
		t.Fatal(err)
	}
	got := strings.Join(values(sels), " ")
	for _, want := range []string{"unix:uid:64001", "unix:gid:64002", "unix:supplementary_gid:64003"} {
		if !strings.Contains(got, want) {
			t.Errorf("%s missing from %s", want, got)
		}
	}
	if strings.Contains(got, "unix:uid:"+strconv.Itoa(os.Geteuid())+" ") {
		t.Errorf("selectors %s carry the uid /proc shows now", got)
	}
}

// TestStatusMustMatchConnectCredentials: without SO_PEERGROUPS the groups
// come from /proc/<pid>/status, which must then show the connect-time
// effective ids.
func TestStatusMustMatchConnectCredentials(t *testing.T) {
	a := newTestAttestor(t, "")
	p := processOf(t, int32(os.Getpid()))
	p.Groups, p.GroupsKnown = nil, false
	if _, err := a.Attest(context.Background(), p); err != nil {
		t.Fatalf("matching credentials: %v", err)
	}
	for _, c := range []struct{ uid, gid uint32 }{{p.UID + 1, p.GID}, {p.UID, p.GID + 1}} {
		q := p
		q.UID, q.GID = c.uid, c.gid
		_, err := a.Attest(context.Background(), q)
		if !errors.Is(err, attestor.ErrCallerChanged) {
			t.Errorf("connected as uid %d gid %d, status shows %d %d: err = %v, want ErrCallerChanged", c.uid, c.gid, p.UID, p.GID, err)
		}
	}
}

// TestExecutableMustBeTheConnectOne: a process that connected and then
// executed another binary gets no selectors for it.
func TestExecutableMustBeTheConnectOne(t *testing.T) {
	for _, hcl := range []string{"discover_workload_path = true", "discover_workload_path = true\nworkload_size_limit = -1"} {
		a := newTestAttestor(t, hcl)
		p := processOf(t, int32(os.Getpid()))
		if _, err := a.Attest(context.Background(), p); err != nil {
			t.Fatalf("%s: the executable it connected with: %v", hcl, err)
		}
		other := p
		other.Exe.Ino++
		if _, err := a.Attest(context.Background(), other); !errors.Is(err, attestor.ErrCallerChanged) {
			t.Errorf("%s: another executable than at connect: err = %v, want ErrCallerChanged", hcl, err)
		}
		unknown := p
		unknown.Exe = attestor.FileID{}
		if _, err := a.Attest(context.Background(), unknown); err == nil {
			t.Errorf("%s: an executable unknown at connect was vouched for", hcl)
		}
	}
}
