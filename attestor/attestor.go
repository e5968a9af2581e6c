// Package attestor identifies the process behind a Workload API connection:
// its peer credentials, the guard against PID reuse, and the workload
// attestors that turn a process into selectors.
package attestor

import (
	"context"
	"errors"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/attestor/selector"
	"github.com/lanyard-dev/lanyard/conf"
	"github.com/lanyard-dev/lanyard/internal/registry"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// WorkloadAttestor describes a process as selectors. Attest must be safe for
// concurrent use and must not keep the pid: the caller checks afterwards that
// the process is still the one that connected.
//
// Selectors about credentials come from p, which the kernel recorded at
// connect, never from a later read of /proc: a setuid program the caller
// executes in between would show other credentials there. An attestor that
// must read /proc for them compares what it read with p and fails with
// ErrCallerChanged when they differ.
type WorkloadAttestor interface {
	// Attest returns p's selectors in a slice the caller may keep and
	// change (it is sorted in place). It returns when ctx ends.
	Attest(ctx context.Context, p Process) ([]selector.Selector, error)
}

// Process is a workload to attest, as the kernel described it when it
// connected.
type Process struct {
	PID int32
	// UID and GID are the effective IDs at connect (SO_PEERCRED).
	UID, GID uint32
	// Groups are the supplementary groups at connect (SO_PEERGROUPS),
	// valid when GroupsKnown; kernels before 4.13 cannot tell them.
	Groups      []uint32
	GroupsKnown bool
	// Exe is the executable the process ran when its connection was
	// accepted; zero when the agent could not see it.
	Exe FileID
}

// FileID names one file for as long as it exists.
type FileID struct {
	Dev, Ino uint64
}

// IsZero reports whether id names no file.
func (id FileID) IsZero() bool { return id == FileID{} }

// ErrCallerChanged means the caller's process no longer has the
// credentials or executable it connected with (it executed a setuid
// program, or another binary), so nothing read about it now describes the
// connection. The caller must reconnect.
var ErrCallerChanged = errors.New("the calling process changed credentials or executable since it connected")

// ErrCallerGone means the process that opened a Workload API connection has
// exited, or its PID now belongs to another process, so selectors gathered
// for that PID must not be trusted.
var ErrCallerGone = errors.New("the calling process exited or its PID was reused")

// ErrCallerNotVisible means the peer's PID is 0: the caller runs in a PID
// namespace the agent cannot see into.
var ErrCallerNotVisible = errors.New("the caller's PID is not visible: run the agent in the host PID namespace (hostPID: true)")

// IsRefusal reports whether err means the caller must be refused outright,
// rather than only lose the selectors of the attestor that failed: its
// process is gone, changed or out of sight.
func IsRefusal(err error) bool {
	return errors.Is(err, ErrCallerChanged) || errors.Is(err, ErrCallerGone) || errors.Is(err, ErrCallerNotVisible)
}

// PluginConfig is what a workload attestor is built from.
type PluginConfig struct {
	Name        string
	Data        *conf.Section // the plugin_data block; never nil
	Log         hclog.Logger
	TrustDomain spiffeid.TrustDomain
	DataDir     string
}

// Factory builds a configured attestor. Errors about plugin_data should come
// from cfg.Data.Errorf so that they name the file, line and key.
type Factory func(cfg PluginConfig) (WorkloadAttestor, error)

// Registration is a compiled-in workload attestor: its factory, and
// whether it runs in process (see Plugin.InProcess).
type Registration struct {
	New       Factory
	InProcess bool
}

var registered = registry.New[Registration]("attestor: workload attestor")

// ErrNoSelectors is returned when no attestor could describe a process.
var ErrNoSelectors = errors.New("no workload attestor produced a selector for the caller")

// Register makes a workload attestor available under name. It is called from
// the init function of each plugin package.
func Register(name string, f Factory) { registered.Register(name, Registration{New: f}) }

// RegisterInProcess makes available under name a workload attestor that
// reads only the kernel's state and honours ctx, so that it can run on the
// caller's goroutine (Plugin.InProcess).
func RegisterInProcess(name string, f Factory) {
	registered.Register(name, Registration{New: f, InProcess: true})
}

// Lookup returns the attestor registered under name.
func Lookup(name string) (Registration, bool) { return registered.Lookup(name) }

// Registered lists the names of the compiled-in workload attestors.
func Registered() []string { return registered.Names() }
