package k8s

import (
	"context"
	"errors"
	"fmt"

	"github.com/lanyard-dev/lanyard/attestor"
	"github.com/lanyard-dev/lanyard/attestor/selector"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/sys/unix"
)

// AttestPod returns the selectors of the pod that namespace and name, uid,
// or all three name, for broker, a SPIFFE Broker API caller (a
// KubernetesObjectReference to a pod). They are the pod-level selectors of
// Attest (sa, ns, node-name, pod-uid, pod-name, pod-image-count,
// pod-init-image-count, pod-image, pod-init-image, pod-label, pod-owner,
// pod-owner-uid), without any container's, as SPIRE answers.
//
// As in SPIRE, the k8s plugin_data's experimental.broker block decides:
//   - broker must be listed in its brokers;
//   - its pod_reference_scope "agent_node" looks only among the pods the
//     kubelet of this node lists; "cluster" looks there first (unless
//     disable_kubelet_client), then (the pod not there, or the kubelet
//     failing) asks the API server: by
//     namespace and name a GET, by uid alone a paged list of the pods'
//     metadata (there is no field selector on a pod's UID) and then a GET;
//   - with access_policy "enforced", a SubjectAccessReview must allow user
//     broker (no groups) the verb impersonate-via-spire on the pod found.
//
// namespace and name go together; when uid is given with them, the pod
// named must have it. Through the kubelet a static pod's UID is its config
// hash; through the API server it is its mirror pod's.
//
// The errors, for the caller to map to gRPC codes:
//   - attestor.ErrBrokerNotAuthorized (PermissionDenied): no
//     experimental.broker block, broker not listed in it, or the
//     SubjectAccessReview denied (its reason is in the message). Checked
//     before the reference.
//   - attestor.ErrInvalidReference (ErrInvalidPodReference,
//     InvalidArgument): neither name nor uid, a name without namespace or
//     a namespace without name, a namespace that is not a DNS label, a name
//     that is not a DNS subdomain, a uid that is neither a lowercase UUID
//     nor 32 lowercase hex digits. Nothing is fetched then.
//   - attestor.ErrWorkloadNotFound (ErrPodNotFound, ErrPodMismatch;
//     NotFound): no such pod in the scope, or the pod of that name has
//     another UID.
//   - ctx's error (errors.Is context.Canceled or DeadlineExceeded).
//   - any other error (Unavailable): the kubelet's list or the API server
//     could not be had (a SubjectAccessReview that failed, too), or the
//     kubelet lists two pods under the reference.
//
// See findPodOnNode for how the kubelet's shared list answers.
func (a *Attestor) AttestPod(ctx context.Context, broker spiffeid.ID, namespace, name, uid string) ([]selector.Selector, error) {
	scope, err := a.brokerScope(broker)
	if err != nil {
		return nil, err
	}
	if err := validatePodReference(namespace, name, uid); err != nil {
		return nil, err
	}
	p, err := a.findPod(ctx, scope, namespace, name, uid)
	if err != nil {
		return nil, err
	}
	if err := a.authorizeBroker(ctx, broker, p); err != nil {
		return nil, err
	}
	return podSelectors(p), nil
}

// AuthorizeBrokerPID decides whether broker may have the process pid
// attested, for a Broker API WorkloadPIDReference. The Broker endpoint
// calls it after attesting pid with every workload attestor (SPIRE
// answers a PID reference with k8s selectors only; Lanyard with all).
//
//   - A process in no pod's container: nil (nothing of Kubernetes to
//     authorize).
//   - Without an experimental.broker block: nil. Unlike SPIRE, which then
//     refuses every reference, Lanyard lets the Broker endpoint's own
//     broker list (agent.experimental.broker) authorize PID references.
//   - With the block: broker must be listed in it
//     (attestor.ErrBrokerNotAuthorized otherwise), and with access_policy
//     "enforced" a SubjectAccessReview must allow it impersonate-via-spire
//     on the process's pod, found as Attest finds it (cgroup, then the
//     kubelet's list; with disable_kubelet_client it cannot be, an error).
//     A denial is attestor.ErrBrokerNotAuthorized with the reviewer's
//     reason.
//
// A process that does not exist is attestor.ErrWorkloadNotFound; ctx's
// error is returned when it ends; any other error means Unavailable.
func (a *Attestor) AuthorizeBrokerPID(ctx context.Context, broker spiffeid.ID, pid int32) error {
	if a.s.broker == nil {
		return nil
	}
	if pid <= 0 {
		return fmt.Errorf("pid %d is not a process id: %w", pid, attestor.ErrInvalidReference)
	}
	data, err := readCgroupFile(a.procRoot, pid)
	if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ESRCH) {
		return fmt.Errorf("%w: %w", attestor.ErrWorkloadNotFound, err)
	}
	if err != nil {
		return err
	}
	podUID, containerID, found, err := podFromCgroups(data)
	if err != nil {
		return fmt.Errorf("pid %d: %s/%d/cgroup: %w", pid, a.procRoot, pid, err)
	}
	if !found || containerID == "" {
		return nil
	}
	if _, err := a.brokerScope(broker); err != nil {
		return err
	}
	if !a.s.broker.enforced {
		return nil
	}
	if a.s.noKubelet {
		return fmt.Errorf("pid %d: cannot find its pod to review broker %s: %w", pid, broker, errKubeletDisabled)
	}
	_, p, err := a.attestContainer(ctx, podKey(podUID), containerID)
	if err != nil {
		return fmt.Errorf("pid %d: finding its pod to review broker %s: %w", pid, broker, err)
	}
	return a.authorizeBroker(ctx, broker, p)
}

// brokerScope is broker's pod_reference_scope, or why it may not use the
// k8s attestor.
func (a *Attestor) brokerScope(broker spiffeid.ID) (string, error) {
	if a.s.broker == nil {
		return "", fmt.Errorf("broker %s: the k8s workload attestor's plugin_data has no experimental.broker block: add one whose brokers list this broker to have pods attested by reference: %w", broker, attestor.ErrBrokerNotAuthorized)
	}
	scope, ok := a.s.broker.scopes[broker]
	if !ok {
		return "", fmt.Errorf("broker %s is not listed in the k8s workload attestor's experimental.broker.brokers: %w", broker, attestor.ErrBrokerNotAuthorized)
	}
	return scope, nil
}

// findPod finds the pod a reference names in scope.
func (a *Attestor) findPod(ctx context.Context, scope, namespace, name, uid string) (*pod, error) {
	if !a.s.noKubelet { // with it, every scope is "cluster"
		p, err := a.findPodOnNode(ctx, namespace, name, uid)
		if err == nil || scope != scopeCluster || ctx.Err() != nil || errors.Is(err, ErrPodMismatch) {
			return p, err
		}
		// Not on this node, or the kubelet failing: the API server knows
		// every pod, as SPIRE falls back to it.
		a.log.Debug("A pod reference is not answered by the kubelet; asking the API server", "namespace", namespace, "name", name, "uid", uid, "kubelet", err)
	}
	if name == "" {
		return a.api.findPodByUID(ctx, uid)
	}
	p, err := a.api.getPod(ctx, namespace, name)
	if err == nil && uid != "" && p.Metadata.UID != uid {
		return nil, fmt.Errorf("pod %s: %w: it is %s", describePodReference(namespace, name, uid), ErrPodMismatch, p.Metadata.UID)
	}
	return p, err
}

// authorizeBroker runs access_policy "enforced"'s SubjectAccessReview.
func (a *Attestor) authorizeBroker(ctx context.Context, broker spiffeid.ID, p *pod) error {
	if !a.s.broker.enforced {
		return nil
	}
	ns, name := p.Metadata.Namespace, p.Metadata.Name
	allowed, reason, err := a.api.reviewImpersonation(ctx, broker.String(), ns, name)
	switch {
	case err != nil:
		return fmt.Errorf("broker %s, pod %s/%s: %w", broker, ns, name, err)
	case !allowed:
		if reason == "" {
			reason = "no rule allows it"
		}
		a.log.Info("The Kubernetes authorizer denied a broker a pod", "broker", broker, "namespace", ns, "pod", name, "reason", reason)
		return fmt.Errorf("the Kubernetes authorizer does not allow broker %s to %s pod %s/%s (%s): %w", broker, impersonateVerb, ns, name, reason, attestor.ErrBrokerNotAuthorized)
	}
	return nil
}
