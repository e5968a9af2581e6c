// Package unix is the "unix" workload attestor: it describes a process by its
// user, groups and, optionally, its executable, with SPIRE's selectors.
//
// Process facts come from /proc/<pid>/status, read by this package rather
// than through gopsutil: gopsutil's NewProcess stats /proc/<pid> and reads
// /proc/<pid>/stat before any getter runs, and Uids, Gids and Groups each
// re-read and fully re-parse status (plus cmdline for long names), keeping
// the parsed fields private. One open and one read of status per
// attestation is the point here, since this runs on every Workload API call.
package unix

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"sync"
	"syscall"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/attestor"
	"github.com/lanyard-dev/lanyard/attestor/procfs"
	"github.com/lanyard-dev/lanyard/attestor/selector"
)

// PluginName is the name the attestor registers under and its selector type.
const PluginName = "unix"

// In process: it reads /proc and hashes files, and stops when ctx ends.
func init() {
	attestor.RegisterInProcess(PluginName, New)
}

// Config is the plugin_data of the unix attestor; the keys are SPIRE's.
type Config struct {
	// DiscoverWorkloadPath adds the unix:path and unix:sha256 selectors. It
	// needs the agent to be able to open /proc/<pid>/exe: root, or the
	// workload's own user.
	DiscoverWorkloadPath bool `hcl:"discover_workload_path"`
	// WorkloadSizeLimit bounds the executable size hashed for unix:sha256:
	// 0 means no limit, a negative value means never hash (no sha256
	// selector), as in SPIRE.
	WorkloadSizeLimit int64 `hcl:"workload_size_limit"`
}

// Attestor is the unix workload attestor. It is safe for concurrent use.
type Attestor struct {
	cfg      Config
	procRoot string
	log      hclog.Logger
	users    *idCache
	groups   *idCache
	hashes   *hashCache
}

// New builds the unix attestor from its plugin_data.
func New(cfg attestor.PluginConfig) (attestor.WorkloadAttestor, error) {
	return newAttestor(cfg)
}

func newAttestor(cfg attestor.PluginConfig) (*Attestor, error) {
	var c Config
	if err := cfg.Data.Decode(&c); err != nil {
		return nil, err
	}
	log := cfg.Log
	if log == nil {
		log = hclog.NewNullLogger()
	}
	if !c.DiscoverWorkloadPath && c.WorkloadSizeLimit != 0 {
		log.Warn("workload_size_limit has no effect unless discover_workload_path = true")
	}
	// HOST_PROC points at the host's /proc when the agent runs in a
	// container, as SPIRE (through gopsutil) honours it.
	procRoot := os.Getenv("HOST_PROC")
	if procRoot == "" {
		procRoot = "/proc"
	}
	return &Attestor{
		cfg:      c,
		procRoot: procRoot,
		log:      log,
		users:    newIDCache(lookupUser),
		groups:   newIDCache(lookupGroup),
		hashes:   newHashCache(maxHashEntries),
	}, nil
}

// statusBufs holds buffers for /proc/<pid>/status, which is about 1.5 KiB
// unless the process has many supplementary groups.
var statusBufs = sync.Pool{New: func() any { b := make([]byte, 4096); return &b }}

// Attest returns the unix selectors of p: the effective uid and gid (as
// SPIRE), their names when they resolve, every supplementary group, and
// with discover_workload_path the executable's path and sha256.
//
// The uid, gid and groups are those the kernel recorded when the process
// connected (SO_PEERCRED, SO_PEERGROUPS), not those /proc shows now: a
// process may execute a setuid program after connecting, and /proc would
// show that program's credentials for as long as it holds them. On kernels
// without SO_PEERGROUPS the groups are read from /proc/<pid>/status, and
// its effective uid and gid must be the connect-time ones, which makes its
// groups line (from the same snapshot of credentials) theirs too.
func (a *Attestor) Attest(ctx context.Context, p attestor.Process) ([]selector.Selector, error) {
	pid := p.PID
	if pid <= 0 {
		return nil, fmt.Errorf("pid %d is not a process id", pid)
	}
	pidStr := strconv.FormatInt(int64(pid), 10)

	var statusGroups []byte
	numGroups := len(p.Groups)
	if !p.GroupsKnown {
		bufp := statusBufs.Get().(*[]byte)
		defer func() {
			if cap(*bufp) <= 64<<10 {
				statusBufs.Put(bufp)
			}
		}()
		statusPath := a.procRoot + "/" + pidStr + "/status"
		st, err := readStatus(statusPath, bufp)
		if err != nil {
			return nil, procErr(pid, "reading "+statusPath, err)
		}
		if st.uid != p.UID || st.gid != p.GID {
			return nil, fmt.Errorf("%w: pid %d connected as uid %d gid %d but %s shows uid %d gid %d", attestor.ErrCallerChanged, pid, p.UID, p.GID, statusPath, st.uid, st.gid)
		}
		statusGroups, numGroups = st.groups, st.numGroups()
	}

	sels := make([]selector.Selector, 0, 6+2*numGroups)
	u := a.users.get(p.UID)
	sels = append(sels, sel(u.id))
	if u.name != "" {
		sels = append(sels, sel(u.name))
	}
	g := a.groups.get(p.GID)
	sels = append(sels, sel(g.id))
	if g.name != "" {
		sels = append(sels, sel(g.name))
	}
	for _, gid := range p.Groups {
		sels = a.appendSupplementary(sels, gid)
	}
	for rest := statusGroups; ; {
		var field []byte
		field, rest = procfs.NextField(rest)
		if field == nil {
			break
		}
		gid, ok := procfs.ParseID(field)
		if !ok {
			return nil, fmt.Errorf("pid %d: %s/%s/status: bad supplementary group id %q", pid, a.procRoot, pidStr, field)
		}
		sels = a.appendSupplementary(sels, gid)
	}

	if !a.cfg.DiscoverWorkloadPath {
		return sels, nil
	}
	path, sumValue, err := a.inspectExe(ctx, p, a.procRoot+"/"+pidStr+"/exe")
	if err != nil {
		return nil, err
	}
	sels = append(sels, sel("path:"+path))
	if sumValue != "" {
		sels = append(sels, sel(sumValue))
	}
	return sels, nil
}

func (a *Attestor) appendSupplementary(sels []selector.Selector, gid uint32) []selector.Selector {
	sg := a.groups.get(gid)
	sels = append(sels, sel(sg.suppID))
	if sg.suppName != "" {
		sels = append(sels, sel(sg.suppName))
	}
	return sels
}

func sel(value string) selector.Selector {
	return selector.Selector{Type: PluginName, Value: value}
}

// procErr names the pid and the step that failed, and says plainly when the
// process is gone or the agent lacks the permission.
func procErr(pid int32, what string, err error) error {
	switch {
	case errors.Is(err, syscall.ENOENT), errors.Is(err, syscall.ESRCH):
		return fmt.Errorf("pid %d: %s: the process does not exist (it may have exited): %w", pid, what, err)
	case errors.Is(err, syscall.EACCES), errors.Is(err, syscall.EPERM):
		return fmt.Errorf("pid %d: %s: permission denied: run the agent as root or as the workload's user: %w", pid, what, err)
	}
	return fmt.Errorf("pid %d: %s: %w", pid, what, err)
}
