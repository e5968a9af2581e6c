// Package docker is the "docker" workload attestor, a drop-in for SPIRE's:
// it finds the container of a process from /proc/<pid>/cgroup, inspects it
// through the Docker Engine API (dockerd, or Podman's Docker-compatible
// service), and describes it with SPIRE's docker selectors: label, env and
// image_id.
//
// It reads only /proc/<pid>/cgroup, which the kernel writes, and never
// /proc/<pid>/mountinfo: a process controls its own mount namespace, and
// any user can make one whose cgroup mounts name any container. It also checks that the
// container's first process is in the cgroup the caller's path names
// (checkSameContainer), so a cgroup named after a container proves nothing
// by itself.
package docker

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/attestor"
	"github.com/lanyard-dev/lanyard/attestor/selector"
	"github.com/moby/moby/api/types/container"
	"golang.org/x/sys/unix"
)

// PluginName names the plugin in agent.conf (WorkloadAttestor "docker")
// and is the type of its selectors.
const PluginName = "docker"

// Registered as an attestor that is not in-process: an engine call stuck
// despite ctx must not hold the caller past its deadline.
func init() {
	attestor.Register(PluginName, New)
}

// Attestor describes processes by their container; safe for concurrent
// use.
type Attestor struct {
	engine   *engine
	find     findFunc // the new locator, or the legacy matchers
	procRoot string   // /proc, or HOST_PROC
	s        settings
	log      hclog.Logger
}

// New builds the docker attestor from its plugin_data. It connects to
// nothing: the engine is first called at the first attestation of a
// process in a container.
func New(cfg attestor.PluginConfig) (attestor.WorkloadAttestor, error) {
	return newAttestor(cfg, os.Getenv)
}

func newAttestor(cfg attestor.PluginConfig, getenv func(string) string) (*Attestor, error) {
	log := cfg.Log
	if log == nil {
		log = hclog.NewNullLogger()
	}
	s, err := parseConfig(cfg.Data, log)
	if err != nil {
		return nil, err
	}
	e, err := newEngine(s, log)
	if err != nil {
		return nil, err
	}
	// HOST_PROC points at the host's /proc when it is mounted elsewhere,
	// as for the unix and k8s attestors.
	procRoot := getenv("HOST_PROC")
	if procRoot == "" {
		procRoot = "/proc"
	}
	a := &Attestor{s: s, log: log, procRoot: procRoot, find: findContainer, engine: e}
	if s.matchers != nil {
		a.find = s.matchers.find
	}
	log.Debug("docker attestor configured", "endpoint", s.endpoint(), "docker_version", s.apiVersion, "legacy_matchers", s.matchers != nil)
	return a, nil
}

// Attest returns the docker selectors of the container p runs in, and none
// (without error) for a process in no container, or in a container the
// engine does not know (another runtime's).
func (a *Attestor) Attest(ctx context.Context, p attestor.Process) ([]selector.Selector, error) {
	if p.PID <= 0 {
		return nil, fmt.Errorf("pid %d is not a process id", p.PID)
	}
	data, err := a.readCgroups(p.PID)
	if err != nil {
		return nil, err
	}
	m, found, err := locate(data, a.find)
	if a.s.verboseLog {
		a.log.Info("Container locator", "pid", p.PID, "cgroup", string(data), "container_id", m.id, "error", err)
	}
	if err != nil {
		return nil, fmt.Errorf("pid %d: %s/%d/cgroup: %w", p.PID, a.procRoot, p.PID, err)
	}
	if !found {
		return nil, nil
	}
	c, known, err := a.engine.inspect(ctx, m.id)
	if err != nil {
		return nil, err
	}
	if !known {
		a.log.Debug("The caller's container is not the engine's; no docker selectors", "pid", p.PID, "container_id", m.id, "endpoint", a.s.endpoint())
		return nil, nil
	}
	if err := a.checkMembership(c, m); err != nil {
		a.log.Warn("Refusing docker selectors: the caller's cgroup is named after a container it is not in", "pid", p.PID, "container_id", m.id, "error", err)
		return nil, fmt.Errorf("pid %d, container %s: %w", p.PID, m.id, err)
	}
	return selectors(c.Config), nil
}

// checkMembership compares the caller's container cgroups with those of
// the container's first process, as the engine reports it.
func (a *Attestor) checkMembership(c container.InspectResponse, m membership) error {
	if c.State == nil || c.State.Pid <= 0 {
		state := "unknown"
		if c.State != nil {
			state = string(c.State.Status)
		}
		return fmt.Errorf("%w (the container is %s, so no process runs in it)", errOutsideContainer, state)
	}
	data, err := a.readCgroups(int32(c.State.Pid))
	if err != nil {
		return fmt.Errorf("the container's first process: %w", err)
	}
	return checkSameContainer(data, m)
}

// readCgroups reads /proc/<pid>/cgroup, without following a symlink, up
// to one byte more than maxCgroupFileSize (locate refuses a longer file).
func (a *Attestor) readCgroups(pid int32) ([]byte, error) {
	path := a.procRoot + "/" + strconv.Itoa(int(pid)) + "/cgroup"
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_NOFOLLOW, 0)
	if err == nil {
		defer f.Close()
		var data []byte
		data, err = io.ReadAll(io.LimitReader(f, maxCgroupFileSize+1))
		if err == nil {
			return data, nil
		}
	}
	switch {
	case errors.Is(err, unix.ENOENT), errors.Is(err, unix.ESRCH):
		return nil, fmt.Errorf("pid %d: %s: the process does not exist (it exited, or the agent does not see the host's /proc: run it in the host's PID namespace): %w", pid, path, err)
	case errors.Is(err, unix.EACCES), errors.Is(err, unix.EPERM):
		return nil, fmt.Errorf("pid %d: %s: permission denied: run the agent as root: %w", pid, path, err)
	}
	return nil, fmt.Errorf("pid %d: reading %s: %w", pid, path, err)
}

// selectors are SPIRE's: every label as label:K:V, every environment
// variable as env:K=V (as the engine lists it), and the image reference
// the container was created with as image_id (Config.Image, what the user
// wrote: repo/name:tag, or a digest or image ID if that is what was run).
func selectors(cfg *container.Config) []selector.Selector {
	if cfg == nil {
		return nil
	}
	sels := make([]selector.Selector, 0, len(cfg.Labels)+len(cfg.Env)+1)
	for k, v := range cfg.Labels {
		sels = append(sels, selector.Selector{Type: PluginName, Value: "label:" + k + ":" + v})
	}
	for _, e := range cfg.Env {
		sels = append(sels, selector.Selector{Type: PluginName, Value: "env:" + e})
	}
	if cfg.Image != "" {
		sels = append(sels, selector.Selector{Type: PluginName, Value: "image_id:" + cfg.Image})
	}
	return sels
}
