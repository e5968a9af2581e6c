package unix

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/attestor"
	"github.com/lanyard-dev/lanyard/attestor/selector"
	"github.com/lanyard-dev/lanyard/conf"
	"github.com/lanyard-dev/lanyard/internal/testkit"
)

func newTestAttestor(t testing.TB, hcl string) *Attestor {
	t.Helper()
	sec, err := conf.NewSection("agent.conf", hcl)
	if err != nil {
		t.Fatalf("NewSection: %v", err)
	}
	a, err := newAttestor(attestor.PluginConfig{Name: PluginName, Data: sec, Log: hclog.NewNullLogger()})
	if err != nil {
		t.Fatalf("newAttestor(%q): %v", hcl, err)
	}
	return a
}

func values(sels []selector.Selector) []string {
	var out []string
	for _, s := range sels {
		out = append(out, s.String())
	}
	slices.Sort(out)
	return out
}

// expectedIDs builds the selectors for the given ids with os/user, the
// reference the attestor must agree with.
func expectedIDs(t *testing.T, uid, gid int, groups []int) []string {
	t.Helper()
	want := []string{fmt.Sprintf("unix:uid:%d", uid), fmt.Sprintf("unix:gid:%d", gid)}
	if u, err := user.LookupId(strconv.Itoa(uid)); err == nil {
		want = append(want, "unix:user:"+u.Username)
	}
	if g, err := user.LookupGroupId(strconv.Itoa(gid)); err == nil {
		want = append(want, "unix:group:"+g.Name)
	}
	for _, sg := range groups {
		want = append(want, fmt.Sprintf("unix:supplementary_gid:%d", sg))
		if g, err := user.LookupGroupId(strconv.Itoa(sg)); err == nil {
			want = append(want, "unix:supplementary_group:"+g.Name)
		}
	}
	slices.Sort(want)
	return slices.Compact(want)
}

// startSleep runs path (a sleep binary) until the test ends.
func startSleep(t *testing.T, path string, cred *syscall.Credential) *exec.Cmd {
	t.Helper()
	var cmd *exec.Cmd
	var err error
	// A freshly written binary can fail with ETXTBSY while another fork
	// still holds the write descriptor (golang/go#22315).
	for range 50 {
		cmd = exec.Command(path, "300")
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
		if err = cmd.Start(); !errors.Is(err, syscall.ETXTBSY) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("starting %s: %v", path, err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	return cmd
}

func sleepPath(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("sleep")
	if err != nil {
		t.Skipf("no sleep binary: %v", err)
	}
	// /proc/<pid>/exe shows the resolved file (/bin is often a link).
	real, err := filepath.EvalSymlinks(p)
	if err != nil {
		t.Fatal(err)
	}
	return real
}

func fileSHA256(t *testing.T, path string) (string, int64) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil)), n
}

func copyFile(t *testing.T, src, dst string, extra []byte) {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, append(b, extra...), 0o755); err != nil {
		t.Fatal(err)
	}
}

func TestRegistered(t *testing.T) {
	if _, ok := attestor.Lookup("unix"); !ok {
		t.Fatalf("unix is not registered; registered: %v", attestor.Registered())
	}
}

func TestAttestSelf(t *testing.T) {
	a := newTestAttestor(t, "")
	sels, err := a.Attest(context.Background(), processOf(t, int32(os.Getpid())))
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range sels {
		if s.Type != "unix" {
			t.Errorf("selector %v has type %q, want unix", s, s.Type)
		}
	}
	groups, err := os.Getgroups()
	if err != nil {
		t.Fatal(err)
	}
	want := expectedIDs(t, os.Geteuid(), os.Getegid(), groups)
	if got := values(sels); !slices.Equal(got, want) {
		t.Errorf("selectors:\n got  %v\n want %v", got, want)
	}
}

func TestSupplementaryGroups(t *testing.T) {
	testkit.RequireRoot(t, "to start a process with other credentials")
	// One group that resolves and one that does not: the latter gets only
	// its supplementary_gid selector.
	known := uint32(1)
	if _, err := user.LookupGroupId("1"); err != nil {
		t.Skipf("gid 1 has no name here: %v", err)
	}
	unknown := uint32(0)
	for g := uint32(47000); g < 47100; g++ {
		if _, err := user.LookupGroupId(strconv.Itoa(int(g))); err != nil {
			unknown = g
			break
		}
	}
	if unknown == 0 {
		t.Fatal("no unnamed gid in 47000-47099")
	}
	cmd := startSleep(t, sleepPath(t), &syscall.Credential{Uid: 65534, Gid: 65534, Groups: []uint32{known, unknown}})

	a := newTestAttestor(t, "")
	sels, err := a.Attest(context.Background(), processOf(t, int32(cmd.Process.Pid)))
	if err != nil {
		t.Fatal(err)
	}
	want := expectedIDs(t, 65534, 65534, []int{int(known), int(unknown)})
	got := values(sels)
	t.Logf("selectors: %v", got)
	if !slices.Equal(got, want) {
		t.Errorf("selectors:\n got  %v\n want %v", got, want)
	}
	if !slices.Contains(got, fmt.Sprintf("unix:supplementary_gid:%d", unknown)) {
		t.Errorf("no supplementary_gid selector for the unnamed gid %d in %v", unknown, got)
	}
	for _, s := range got {
		if strings.HasPrefix(s, "unix:path:") || strings.HasPrefix(s, "unix:sha256:") {
			t.Errorf("%s without discover_workload_path", s)
		}
	}
}

func TestDiscoverWorkloadPath(t *testing.T) {
	bin := sleepPath(t)
	sum, _ := fileSHA256(t, bin)
	a := newTestAttestor(t, "discover_workload_path = true")

	for i := range 2 {
		cmd := startSleep(t, bin, nil)
		sels, err := a.Attest(context.Background(), processOf(t, int32(cmd.Process.Pid)))
		if err != nil {
			t.Fatal(err)
		}
		got := values(sels)
		for _, w := range []string{"unix:path:" + bin, "unix:sha256:" + sum} {
			if !slices.Contains(got, w) {
				t.Errorf("attestation %d: %s missing from %v", i, w, got)
			}
		}
		// The second process runs the same file: served from the cache.
		if n := a.hashes.reads.Load(); n != 1 {
			t.Errorf("after attestation %d the binary was read %d times, want 1", i, n)
		}
	}
}

func TestChangedBinaryIsRehashed(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "sleepy")
	copyFile(t, sleepPath(t), bin, nil)
	a := newTestAttestor(t, "discover_workload_path = true")

	attest := func() []string {
		t.Helper()
		cmd := startSleep(t, bin, nil)
		defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
		sels, err := a.Attest(context.Background(), processOf(t, int32(cmd.Process.Pid)))
		if err != nil {
			t.Fatal(err)
		}
		return values(sels)
	}
	sum1, _ := fileSHA256(t, bin)
	if got := attest(); !slices.Contains(got, "unix:sha256:"+sum1) {
		t.Fatalf("sha256 %s missing from %v", sum1, got)
	}
	// Rewrite the same inode: trailing bytes after an ELF still run.
	b, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, append(b, "changed"...), 0o755); err != nil {
		t.Fatal(err)
	}
	sum2, _ := fileSHA256(t, bin)
	if got := attest(); !slices.Contains(got, "unix:sha256:"+sum2) {
		t.Fatalf("after the rewrite, sha256 %s missing from %v", sum2, got)
	}
	if n := a.hashes.reads.Load(); n != 2 {
		t.Errorf("binary read %d times, want 2 (one per version)", n)
	}
}

func TestDeletedBinary(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "gone")
	copyFile(t, sleepPath(t), bin, nil)
	sum, _ := fileSHA256(t, bin)
	cmd := startSleep(t, bin, nil)
	if err := os.Remove(bin); err != nil {
		t.Fatal(err)
	}
	a := newTestAttestor(t, "discover_workload_path = true")
	sels, err := a.Attest(context.Background(), processOf(t, int32(cmd.Process.Pid)))
	if err != nil {
		t.Fatal(err)
	}
	got := values(sels)
	for _, w := range []string{"unix:path:" + bin + " (deleted)", "unix:sha256:" + sum} {
		if !slices.Contains(got, w) {
			t.Errorf("%s missing from %v", w, got)
		}
	}
}

func TestWorkloadSizeLimit(t *testing.T) {
	bin := sleepPath(t)
	sum, size := fileSHA256(t, bin)
	cmd := startSleep(t, bin, nil)
	pid := int32(cmd.Process.Pid)

	a := newTestAttestor(t, "discover_workload_path = true\nworkload_size_limit = 1")
	_, err := a.Attest(context.Background(), processOf(t, pid))
	if err == nil {
		t.Fatal("no error for an executable over workload_size_limit")
	}
	t.Logf("error: %v", err)
	for _, w := range []string{fmt.Sprintf("pid %d", pid), "workload_size_limit of 1 bytes", fmt.Sprintf("is %d bytes", size), bin} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error %q does not mention %q", err, w)
		}
	}
	if n := a.hashes.reads.Load(); n != 0 {
		t.Errorf("binary over the limit was read %d times", n)
	}

	// Exactly at the limit is allowed.
	a = newTestAttestor(t, fmt.Sprintf("discover_workload_path = true\nworkload_size_limit = %d", size))
	sels, err := a.Attest(context.Background(), processOf(t, pid))
	if err != nil {
		t.Fatal(err)
	}
	if got := values(sels); !slices.Contains(got, "unix:sha256:"+sum) {
		t.Errorf("sha256 missing at the limit: %v", got)
	}

	// Negative: path only, never hashed.
	a = newTestAttestor(t, "discover_workload_path = true\nworkload_size_limit = -1")
	sels, err = a.Attest(context.Background(), processOf(t, pid))
	if err != nil {
		t.Fatal(err)
	}
	got := values(sels)
	if !slices.Contains(got, "unix:path:"+bin) {
		t.Errorf("path missing with workload_size_limit = -1: %v", got)
	}
	for _, s := range got {
		if strings.HasPrefix(s, "unix:sha256:") {
			t.Errorf("%s with workload_size_limit = -1", s)
		}
	}
}

func TestConfigErrors(t *testing.T) {
	for _, tc := range []struct{ hcl, key string }{
		{"discover_workload_paths = true", "discover_workload_paths"},
		{"discover_workload_path = \"sometimes\"", "discover_workload_path"},
		{"workload_size_limit = \"big\"", "workload_size_limit"},
		{"sha256 = true", "sha256"},
	} {
		sec, err := conf.NewSection("agent.conf", tc.hcl)
		if err != nil {
			t.Fatalf("NewSection(%q): %v", tc.hcl, err)
		}
		_, err = New(attestor.PluginConfig{Name: PluginName, Data: sec})
		if err == nil {
			t.Errorf("%q: no error", tc.hcl)
			continue
		}
		t.Logf("%s: %v", tc.hcl, err)
		if !strings.Contains(err.Error(), tc.key) {
			t.Errorf("%q: error %q does not name %s", tc.hcl, err, tc.key)
		}
	}

	a := newTestAttestor(t, "discover_workload_path = true\nworkload_size_limit = 1048576")
	if a.cfg != (Config{DiscoverWorkloadPath: true, WorkloadSizeLimit: 1 << 20}) {
		t.Errorf("decoded %+v", a.cfg)
	}
}

func TestNoSuchProcess(t *testing.T) {
	b, err := os.ReadFile("/proc/sys/kernel/pid_max")
	if err != nil {
		t.Fatal(err)
	}
	// pids run up to pid_max-1, so pid_max itself never exists.
	pidMax, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	a := newTestAttestor(t, "discover_workload_path = true")
	for _, pid := range []int32{int32(pidMax), 0, -1} {
		// As on kernels without SO_PEERGROUPS, where /proc is read.
		_, err := a.Attest(context.Background(), attestor.Process{PID: pid})
		if err == nil {
			t.Errorf("pid %d: no error", pid)
			continue
		}
		t.Logf("error: %v", err)
		if !strings.Contains(err.Error(), fmt.Sprintf("pid %d", pid)) {
			t.Errorf("pid %d: error %q does not name the pid", pid, err)
		}
		if pid > 0 && !strings.Contains(err.Error(), "does not exist") {
			t.Errorf("pid %d: error %q does not say the process is gone", pid, err)
		}
	}
}

func TestConcurrentMissesHashOnce(t *testing.T) {
	bin := sleepPath(t)
	sum, _ := fileSHA256(t, bin)
	cmd := startSleep(t, bin, nil)
	a := newTestAttestor(t, "discover_workload_path = true")
	proc := processOf(t, int32(cmd.Process.Pid))
	var wg sync.WaitGroup
	errs := make([]error, 16)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sels, err := a.Attest(context.Background(), proc)
			if err == nil && !slices.Contains(values(sels), "unix:sha256:"+sum) {
				err = fmt.Errorf("sha256 missing from %v", values(sels))
			}
			errs[i] = err
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	if n := a.hashes.reads.Load(); n != 1 {
		t.Errorf("16 concurrent attestations read the binary %d times, want 1", n)
	}
}

func TestHashWaitHonoursContext(t *testing.T) {
	c := newHashCache(4)
	key := hashKey{ino: 1}
	call := &hashCall{flight: key.flightKey(), stop: make(chan struct{})}
	c.inflight[key] = call
	// A read that never finishes until stopped.
	c.flights.DoChan(call.flight, func() (any, error) { <-call.stop; return nil, errHashAbandoned })
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := c.get(ctx, key, -1); !errors.Is(err, context.Canceled) {
		t.Fatalf("got %v, want context.Canceled", err)
	}
	// Its only waiter left: the call is stopped and forgotten.
	select {
	case <-call.stop:
	default:
		t.Error("a call nobody waits for was not stopped")
	}
	if _, ok := c.inflight[key]; ok {
		t.Error("a call nobody waits for is still in flight")
	}
}

func TestHashCacheEvictsOldest(t *testing.T) {
	c := newHashCache(2)
	k := func(i uint64) hashKey { return hashKey{ino: i} }
	c.store(k(1), "one")
	c.store(k(2), "two")
	c.store(k(3), "three")
	if _, ok := c.sums[k(1)]; ok {
		t.Error("oldest entry kept past the bound")
	}
	c.store(k(4), "four")
	if len(c.sums) != 2 || c.sums[k(3)] != "three" || c.sums[k(4)] != "four" {
		t.Errorf("entries %v, want 3 and 4", c.sums)
	}
}

func TestNameCache(t *testing.T) {
	now := time.Unix(1000, 0)
	c := newIDCache(lookupUser)
	c.now = func() time.Time { return now }

	e := c.get(0)
	u, err := user.LookupId("0")
	if err != nil {
		t.Fatal(err)
	}
	if e.id != "uid:0" || e.name != "user:"+u.Username {
		t.Errorf("got %+v", e)
	}
	c.get(0)
	if n := c.lookups.Load(); n != 1 {
		t.Errorf("%d lookups for a cached uid, want 1", n)
	}
	now = now.Add(nameTTL)
	c.get(0)
	if n := c.lookups.Load(); n != 2 {
		t.Errorf("%d lookups after the TTL, want 2", n)
	}

	// Unnamed ids are cached too, and the map stays bounded.
	for id := range uint32(maxNameEntries + 100) {
		c.get(3_000_000_000 + id)
	}
	if len(c.m) > maxNameEntries {
		t.Errorf("%d entries, bound is %d", len(c.m), maxNameEntries)
	}
	before := c.lookups.Load()
	c.get(3_000_000_000 + maxNameEntries + 99)
	if e := c.get(3_000_000_000 + maxNameEntries + 99); e.name != "" || e.id != "uid:3000001123" {
		t.Errorf("unnamed uid: %+v", e)
	}
	if n := c.lookups.Load() - before; n != 0 {
		t.Errorf("unnamed uid looked up %d more times", n)
	}
}

func TestParseStatus(t *testing.T) {
	full := "Name:\tx\nUid:\t1\t2\t3\t4\nGid:\t5\t6\t7\t8\nFDSize:\t64\nGroups:\t10 20 \nNStgid:\t1\n"
	st, complete, err := parseStatus([]byte(full))
	if err != nil || !complete {
		t.Fatalf("complete=%v err=%v", complete, err)
	}
	if st.uid != 2 || st.gid != 6 || string(st.groups) != "10 20" || st.numGroups() != 2 {
		t.Errorf("parsed %+v (groups %q)", st, st.groups)
	}
	// A Groups line cut by the read boundary is not complete yet.
	if _, complete, _ := parseStatus([]byte(full[:strings.Index(full, "20")])); complete {
		t.Error("truncated Groups line reported complete")
	}
	st, complete, err = parseStatus([]byte("Uid:\t7\nGid:\t9\nGroups:\t\n"))
	if err != nil || !complete || st.uid != 7 || st.gid != 9 || st.numGroups() != 0 {
		t.Errorf("single ids: %+v complete=%v err=%v", st, complete, err)
	}
	for _, bad := range []string{"Uid:\t1\tx\t1\t1\n", "Gid:\t\n", "Uid:\t1\t99999999999\n"} {
		if _, _, err := parseStatus([]byte(bad)); err == nil {
			t.Errorf("%q: no error", bad)
		}
	}
}

func BenchmarkAttest(b *testing.B) {
	for _, bc := range []struct {
		name, hcl   string
		groupsKnown bool
	}{
		{"ids", "", true},
		{"ids_from_status", "", false}, // kernels without SO_PEERGROUPS
		{"discover_workload_path", "discover_workload_path = true", true},
	} {
		b.Run(bc.name, func(b *testing.B) {
			a := newTestAttestor(b, bc.hcl)
			proc := processOf(b, int32(os.Getpid()))
			if !bc.groupsKnown {
				proc.Groups, proc.GroupsKnown = nil, false
			}
			ctx := context.Background()
			if _, err := a.Attest(ctx, proc); err != nil { // fill the caches
				b.Fatal(err)
			}
			b.ReportAllocs()
			for b.Loop() {
				if _, err := a.Attest(ctx, proc); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
