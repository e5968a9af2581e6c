// Package k8s is the "k8s" workload attestor: it finds the pod and
// container of a process from /proc/<pid>/cgroup, looks them up in the
// kubelet's pod list, and describes the workload with SPIRE's k8s
// selectors.
//
// The pod list is shared: one fetch at a time serves every attestation,
// fetch starts are spaced by poll_retry_interval, and an attestation
// whose container is not listed yet waits for the next list until its
// deadline (podLists). The list is decoded as a stream that keeps only the
// fields the selectors need (decodePodList).
//
// For the SPIFFE Broker API, AttestPod answers a pod named by
// namespace/name and/or UID (a KubernetesObjectReference) and
// AuthorizeBrokerPID decides a WorkloadPIDReference, both as the
// plugin_data's experimental.broker block says (brokerconfig.go): from the
// same lists, or from the API server (apiserver.go) for a broker whose
// pod_reference_scope is "cluster" and for access_policy "enforced"'s
// SubjectAccessReviews.
package k8s

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/attestor"
	"github.com/lanyard-dev/lanyard/attestor/selector"
)

// PluginName is the name the attestor registers under and its selector type.
const PluginName = "k8s"

// It calls the kubelet, so it runs on a worker goroutine of its own.
func init() {
	attestor.Register(PluginName, New)
}

// Attestor is the k8s workload attestor. It is safe for concurrent use.
type Attestor struct {
	s        settings
	log      hclog.Logger
	procRoot string
	kubelet  *kubeletClient
	lists    *podLists
	// api asks the API server for experimental.broker; it connects at
	// first use.
	api *apiClient
}

// New builds the k8s attestor from its plugin_data. It reads no file and
// calls nothing: the credentials are read at the first attestation.
func New(cfg attestor.PluginConfig) (attestor.WorkloadAttestor, error) {
	return newAttestor(cfg, os.Getenv, nil)
}

func newAttestor(cfg attestor.PluginConfig, getenv func(string) string, dial dialFunc) (*Attestor, error) {
	log := cfg.Log
	if log == nil {
		log = hclog.NewNullLogger()
	}
	s, err := parseConfig(cfg.Data, getenv, log)
	if err != nil {
		return nil, err
	}
	// HOST_PROC points at the host's /proc when it is mounted elsewhere,
	// as for the unix attestor.
	procRoot := getenv("HOST_PROC")
	if procRoot == "" {
		procRoot = "/proc"
	}
	a := &Attestor{s: s, log: log, procRoot: procRoot}
	a.kubelet = newKubeletClient(s, dial, log.Warn)
	a.lists = newPodLists(a.kubelet.fetch, s.pollInterval, log)
	a.api = newAPIClient(s, nil)
	log.Debug("k8s attestor configured", "kubelet", s.kubeletURL(), "poll_retry_interval", s.pollInterval, "max_poll_attempts", s.maxPolls)
	return a, nil
}

// Attest returns the k8s selectors of the pod and container p runs in, and
// none (without error) for a process outside any pod. It keeps nothing
// about p: the caller checks afterwards that the pid still names the
// process that connected.
func (a *Attestor) Attest(ctx context.Context, p attestor.Process) ([]selector.Selector, error) {
	if p.PID <= 0 {
		return nil, fmt.Errorf("pid %d is not a process id", p.PID)
	}
	data, err := readCgroupFile(a.procRoot, p.PID)
	if err != nil {
		return nil, err
	}
	podUID, containerID, found, err := podFromCgroups(data)
	if err != nil {
		return nil, fmt.Errorf("pid %d: %s/%d/cgroup: %w", p.PID, a.procRoot, p.PID, err)
	}
	if a.s.verboseLocatorLogs {
		a.log.Info("Container locator", "pid", p.PID, "cgroup", string(data), "pod_uid", podUID, "container_id", containerID)
	}
	if !found || containerID == "" {
		// Not in a pod's container: the host, a pod-level cgroup, or
		// another container engine. SPIRE gives no selectors either.
		return nil, nil
	}
	if a.s.noKubelet {
		return nil, errKubeletDisabled
	}
	sels, _, err := a.attestContainer(ctx, podKey(podUID), containerID)
	return sels, err
}

// attestContainer polls the shared pod list until the container is in it,
// ctx ends, or max_poll_attempts lists were searched when it is set. It
// returns the container's selectors and its pod.
func (a *Attestor) attestContainer(ctx context.Context, podUID, containerID string) ([]selector.Selector, *pod, error) {
	start := time.Now()
	var searched uint64
	var lastErr error
	for poll := 1; ; poll++ {
		list, err := a.lists.next(ctx, searched)
		if ctx.Err() != nil {
			return nil, nil, a.notFound(ctx.Err(), podUID, containerID, poll-1, start, lastErr)
		}
		lastErr = err
		if list != nil && list.version > searched {
			searched = list.version
			sels, p, err := a.match(list, podUID, containerID)
			if err != nil || p != nil {
				return sels, p, err
			}
			a.log.Debug("The workload's container is not in the kubelet's pod list yet; polling again", "pod_uid", podUID, "container_id", containerID, "poll", poll)
		}
		if a.s.maxPolls > 0 && poll >= a.s.maxPolls {
			return nil, nil, a.notFound(nil, podUID, containerID, poll, start, lastErr)
		}
	}
}

type containerKind int

const (
	notListed containerKind = iota
	regularContainer
	initContainer
	ephemeralContainer
)

// match finds the container in list: by pod UID when the cgroup path names
// the pod, else by container ID among all pods (CRI-O without pod UID in
// the path). The pod is nil when the list does not have it yet.
func (a *Attestor) match(list *podList, podUID, containerID string) (sels []selector.Selector, found *pod, err error) {
	var p *pod
	var twice bool
	if podUID != "" {
		p, twice = list.lookup(list.byUID, podUID)
	} else {
		p, twice = list.lookup(list.byContainer, containerID)
	}
	switch {
	case twice && podUID != "":
		return nil, nil, fmt.Errorf("the kubelet lists two pods with UID %s: refusing to choose one", podUID)
	case twice:
		return nil, nil, fmt.Errorf("the kubelet lists container %s in two pods: refusing to choose one", containerID)
	case p == nil:
		return nil, nil, nil
	}
	cs, spec, kind := findContainer(p, containerID)
	switch {
	case kind == regularContainer || kind == initContainer:
		sels = podSelectors(p)
		if !a.s.disableContainerSelectors {
			sels = containerSelectors(sels, cs, spec)
		}
		return sels, p, nil
	case a.s.disableContainerSelectors && podUID != "":
		// The pod is known but the container not (yet): with container
		// selectors disabled the pod's are enough, as in SPIRE.
		return podSelectors(p), p, nil
	case kind == ephemeralContainer:
		return nil, nil, fmt.Errorf("container %s is an ephemeral container (kubectl debug) of pod %s/%s: ephemeral containers get no k8s selectors", containerID, p.Metadata.Namespace, p.Metadata.Name)
	}
	return nil, nil, nil
}

func findContainer(p *pod, containerID string) (containerStatus, []specContainer, containerKind) {
	for _, l := range []struct {
		statuses []containerStatus
		spec     []specContainer
		kind     containerKind
	}{
		{p.Status.ContainerStatuses, p.Spec.Containers, regularContainer},
		{p.Status.InitContainerStatuses, p.Spec.InitContainers, initContainer},
		{p.Status.EphemeralContainerStatuses, nil, ephemeralContainer},
	} {
		for _, cs := range l.statuses {
			if id, ok := runtimeID(cs.ContainerID); ok && id == containerID {
				return cs, l.spec, l.kind
			}
		}
	}
	return containerStatus{}, nil, notListed
}

// errKubeletDisabled: disable_kubelet_client is set (SPIRE answers
// FailedPrecondition).
var errKubeletDisabled = errors.New("disable_kubelet_client is set: the k8s attestor does not ask the kubelet, so processes in pods get no k8s selectors")

// errNotListed: the pod or container never appeared in the pod list.
var errNotListed = errors.New("not in the kubelet's pod list")

// notFound is the error, and the log line, of an attestation that gave up.
func (a *Attestor) notFound(ctxErr error, podUID, containerID string, polls int, start time.Time, lastErr error) error {
	what := "container " + containerID
	if podUID != "" {
		what = "pod " + podUID + ", container " + containerID + ","
	}
	took := time.Since(start).Round(time.Millisecond)
	a.log.Warn("The workload's container is not in the kubelet's pod list; giving up", "pod_uid", podUID, "container_id", containerID, "polls", polls, "waited", took, "kubelet_error", lastErr)
	err := fmt.Errorf("%s %w after %d polls in %s", what, errNotListed, polls, took)
	if lastErr != nil {
		err = fmt.Errorf("%w; the last poll failed: %w", err, lastErr)
	} else {
		err = fmt.Errorf("%w: a container is listed once the kubelet has seen it start; one that never is runs in no pod of this node's kubelet", err)
	}
	if ctxErr != nil {
		err = fmt.Errorf("%w (%w)", err, ctxErr)
	}
	return err
}
