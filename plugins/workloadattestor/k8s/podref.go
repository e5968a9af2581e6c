package k8s

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/lanyard-dev/lanyard/attestor"
)

// The errors of AttestPod, for the SPIFFE Broker API's codes. Each is
// also the attestor package's error of its class, which the Broker
// endpoint maps: errors.Is(ErrPodNotFound, attestor.ErrWorkloadNotFound).
var (
	// ErrInvalidPodReference: the reference is malformed (InvalidArgument,
	// WORKLOAD_REFERENCE_INVALID). Nothing was fetched.
	ErrInvalidPodReference error = &attestor.ReferenceError{Msg: "invalid pod reference", Kind: attestor.ErrInvalidReference}
	// ErrPodNotFound: no such pod where the broker's pod_reference_scope
	// looks (NotFound, WORKLOAD_NOT_FOUND): with "agent_node" a pod on
	// another node is not found.
	ErrPodNotFound error = &attestor.ReferenceError{Msg: "pod not found", Kind: attestor.ErrWorkloadNotFound}
	// ErrPodMismatch: the pod named by namespace and name has another UID
	// than the reference's (NotFound, as SPIRE answers; for the Broker API
	// spec that workload has stopped).
	ErrPodMismatch error = &attestor.ReferenceError{Msg: "the pod of that name has another UID", Kind: attestor.ErrWorkloadNotFound}
)

// Bounds of the names Kubernetes accepts (RFC 1123, as
// k8s.io/apimachinery/pkg/util/validation checks them; its regexps are not
// used here so that the agent does not link klog).
const (
	maxNamespaceLength = 63  // a DNS label
	maxPodNameLength   = 253 // a DNS subdomain
)

// findPodOnNode finds the pod that namespace and name, uid, or all three
// name among the pods the kubelet of this node lists (the
// pod_reference_scope "agent_node"; AttestPod checks the reference and
// the broker first).
//
// uid is the UID the kubelet lists: an API pod's UUID, or a static pod's
// config hash (32 hex digits), not its mirror pod's UID. When uid is given
// with a name, the pod named must have it.
//
// The errors: ErrPodNotFound, no pod of that namespace and name, or of
// that uid, in a kubelet list fetched after the call began;
// ErrPodMismatch, the pod of that name has another UID; ctx's error; any
// other (Unavailable): the kubelet's list could not be had, or it lists
// two pods under the reference.
//
// The pod list is the one Attest shares: a list younger than
// poll_retry_interval answers, else the next fetch's does, so a pod
// deleted less than poll_retry_interval ago may still be found, as in
// SPIRE. A pod missing from a list whose fetch began before the call is
// looked for in the next list, fetched after the call began, so a pod
// created just before the call is found. While the kubelet fails, a
// pod in the last good list (at most two minutes old) still answers, as
// for Attest, and its absence there is the kubelet's error, not
// ErrPodNotFound. It returns when ctx ends; the kubelet call runs on a
// goroutine of its own, bounded by its own timeout.
func (a *Attestor) findPodOnNode(ctx context.Context, namespace, name, uid string) (*pod, error) {
	begin := time.Now()
	var searched uint64
	var lastErr error
	resolveErr := fmt.Errorf("pod %s: %w on this node", describePodReference(namespace, name, uid), ErrPodNotFound)
	// At most two lists: the cached one or one whose fetch began before
	// the call (a fetch starts only once the cached list is stale), then
	// one fetched after the call began.
	for range 2 {
		list, err := a.lists.next(ctx, searched)
		if ctx.Err() != nil {
			return nil, fmt.Errorf("pod %s: %w", describePodReference(namespace, name, uid), ctx.Err())
		}
		lastErr = err
		if list == nil {
			break
		}
		if list.version > searched {
			searched = list.version
			p, err := list.resolve(namespace, name, uid)
			if err == nil {
				return p, nil
			}
			resolveErr = err
		}
		if err == nil && !list.fetched.Before(begin) {
			break
		}
	}
	if lastErr != nil {
		return nil, fmt.Errorf("pod %s: the kubelet's pod list is unavailable: %w", describePodReference(namespace, name, uid), lastErr)
	}
	a.log.Debug("A pod reference names no pod of the kubelet's list", "namespace", namespace, "name", name, "uid", uid, "error", resolveErr)
	return nil, resolveErr
}

// resolve finds the pod a reference names: by namespace and name when they
// are given (then checking uid), else by uid.
func (l *podList) resolve(namespace, name, uid string) (*pod, error) {
	var p *pod
	var twice bool
	if name != "" {
		p, twice = l.byName(namespace, name)
	} else {
		p, twice = l.lookup(l.byUID, podKey(uid))
	}
	switch {
	case twice:
		return nil, fmt.Errorf("pod %s: the kubelet lists two pods under it: refusing to choose one", describePodReference(namespace, name, uid))
	case p == nil:
		return nil, fmt.Errorf("pod %s: %w on this node", describePodReference(namespace, name, uid), ErrPodNotFound)
	case uid != "" && podKey(p.Metadata.UID) != podKey(uid):
		return nil, fmt.Errorf("pod %s: %w: it is %s", describePodReference(namespace, name, uid), ErrPodMismatch, p.Metadata.UID)
	}
	return p, nil
}

// byName scans the list: 1.3 µs for 500 pods (BenchmarkResolveByName500),
// where an index built with every list would keep 45 KiB more
// (TestDecodeMemory500).
func (l *podList) byName(namespace, name string) (p *pod, twice bool) {
	for i := range l.pods {
		m := &l.pods[i].Metadata
		if m.Name != name || m.Namespace != namespace {
			continue
		}
		if p != nil {
			return nil, true
		}
		p = &l.pods[i]
	}
	return p, false
}

func describePodReference(namespace, name, uid string) string {
	switch {
	case name == "":
		return "with UID " + uid
	case uid == "":
		return namespace + "/" + name
	}
	return namespace + "/" + name + " with UID " + uid
}

// validatePodReference checks a reference as Kubernetes bounds its parts,
// before anything is fetched. The values are not quoted back when too long
// or malformed: they come from the caller.
func validatePodReference(namespace, name, uid string) error {
	switch {
	case name == "" && uid == "":
		return fmt.Errorf("%w: a pod reference needs a namespace and name, a UID, or both", ErrInvalidPodReference)
	case name != "" && namespace == "":
		return fmt.Errorf("%w: a pod name needs its namespace", ErrInvalidPodReference)
	case name == "" && namespace != "":
		return fmt.Errorf("%w: a namespace needs a pod name", ErrInvalidPodReference)
	case name != "" && !isDNSSubdomain(name):
		return fmt.Errorf("%w: the pod name is not a lowercase RFC 1123 subdomain of at most %d characters", ErrInvalidPodReference, maxPodNameLength)
	case namespace != "" && !isDNSLabel(namespace):
		return fmt.Errorf("%w: the namespace is not a lowercase RFC 1123 label of at most %d characters", ErrInvalidPodReference, maxNamespaceLength)
	case uid != "" && !isPodUID(uid):
		return fmt.Errorf("%w: the UID is neither a lowercase UUID nor 32 lowercase hex digits (a static pod's)", ErrInvalidPodReference)
	}
	return nil
}

// isDNSLabel: 1-63 of [a-z0-9-], starting and ending alphanumeric: a
// subdomain of one label.
func isDNSLabel(s string) bool {
	return len(s) <= maxNamespaceLength && !strings.Contains(s, ".") && isDNSSubdomain(s)
}

// isDNSSubdomain: at most 253 characters of labels joined by dots, each
// label as isDNSLabel but of any length (as Kubernetes checks names).
func isDNSSubdomain(s string) bool {
	if len(s) == 0 || len(s) > maxPodNameLength {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if isLowerAlnum(c) {
			continue
		}
		// '-' and '.' only between alphanumerics or hyphens, a dot only
		// between alphanumerics.
		first, last := i == 0, i == len(s)-1
		switch {
		case first || last:
			return false
		case c == '-' && s[i-1] != '.' && s[i+1] != '.':
		case c == '.' && isLowerAlnum(s[i-1]) && isLowerAlnum(s[i+1]):
		default:
			return false
		}
	}
	return true
}

// isPodUID: a UUID in its dashed form, or the 32 hex digits of a static
// pod's UID as the kubelet lists it; lowercase, as Kubernetes writes them.
func isPodUID(s string) bool {
	_, ok := parsePodUID([]byte(s))
	return ok && !strings.Contains(s, "_")
}

func isLowerAlnum(c byte) bool { return 'a' <= c && c <= 'z' || '0' <= c && c <= '9' }
