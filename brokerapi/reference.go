package brokerapi

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/lanyard-dev/lanyard/attestor"
	"github.com/lanyard-dev/lanyard/attestor/selector"
	"github.com/lanyard-dev/lanyard/conf"
	"github.com/lanyard-dev/lanyard/workloadapi"
	"github.com/spiffe/go-spiffe/v2/exp/proto/spiffe/broker"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// PodAttestor resolves a pod named by namespace and name, by uid, or by
// all three (then the pod of that name must have that uid), to its
// selectors, for broker; the k8s workload attestor is the real one, and
// applies its own broker policy (its experimental.broker block). Its
// errors wrap attestor.ErrInvalidReference (answered InvalidArgument),
// attestor.ErrWorkloadNotFound (NotFound) or attestor.ErrBrokerNotAuthorized
// (PermissionDenied); any other is answered Unavailable.
type PodAttestor interface {
	AttestPod(ctx context.Context, broker spiffeid.ID, namespace, name, uid string) ([]selector.Selector, error)
}

// PIDAuthorizer, when the PodAttestor is one, says whether broker may act
// for the process pid: the k8s attestor's policy for a process in a pod.
type PIDAuthorizer interface {
	AuthorizeBrokerPID(ctx context.Context, broker spiffeid.ID, pid int32) error
}

// The reasons of the google.rpc.ErrorInfo that the Broker API spec (4.8)
// attaches to the errors about a workload reference.
const (
	reasonInvalid     = "WORKLOAD_REFERENCE_INVALID"
	reasonNotFound    = "WORKLOAD_NOT_FOUND"
	reasonNotEntitled = "WORKLOAD_NOT_ENTITLED"
	errorDomain       = "spiffe.io"
)

// referenceError is a status with the spec's ErrorInfo.
func referenceError(code codes.Code, reason string, metadata map[string]string, format string, args ...any) error {
	st := status.Newf(code, format, args...)
	if withInfo, err := st.WithDetails(&errdetails.ErrorInfo{Reason: reason, Domain: errorDomain, Metadata: metadata}); err == nil {
		st = withInfo
	}
	return st.Err()
}

// policy is what one broker may use: reference types, each on the Unix
// socket only or on TCP too.
type policy struct {
	any, anyOverTCP bool
	overTCP         map[string]bool // allowed types: whether over TCP too
}

func policies(brokers []conf.AuthorizedBroker) map[spiffeid.ID]policy {
	out := make(map[spiffeid.ID]policy, len(brokers))
	for _, b := range brokers {
		p := policy{overTCP: map[string]bool{}}
		for _, t := range b.AllowedReferenceTypes {
			if t.TypeURL == conf.AnyReferenceType {
				p.any, p.anyOverTCP = true, t.AllowOverTCP
			}
			p.overTCP[t.TypeURL] = t.AllowOverTCP
		}
		out[b.ID] = p
	}
	return out
}

// workload is what a reference resolved to: its selectors, and how to
// tell that it stopped.
type workload struct {
	sels []selector.Selector
	desc string           // "pid 123", "pod ns/name"
	pid  *attestor.Caller // pinned, for a PID reference
	pod  *podRef          // for a pod reference
	// broker asked for a PID reference; its authorization for the
	// process's pod is checked again on each update.
	broker spiffeid.ID
}

type podRef struct {
	namespace, name, uid string
	broker               spiffeid.ID // who asked: the attestor's policy is per broker
}

func (w *workload) release() {
	if w.pid != nil {
		w.pid.Release()
	}
}

// resolve checks that the caller may use the reference, then attests the
// workload it names, as spire-agent does in that order: a malformed
// reference is InvalidArgument, a type the broker may not use (here, or
// over TCP) PermissionDenied, a workload that is not there NotFound.
func (e *Endpoint) resolve(ctx context.Context, ref *broker.WorkloadReference) (*workload, error) {
	b, err := brokerOf(ctx)
	if err != nil {
		return nil, err
	}
	anyRef := ref.GetReference()
	typeURL := anyRef.GetTypeUrl()
	switch {
	case typeURL == "":
		return nil, referenceError(codes.InvalidArgument, reasonInvalid, nil, "the request has no workload reference")
	case len(typeURL) > maxReferenceField:
		return nil, referenceError(codes.InvalidArgument, reasonInvalid, nil, "the reference's type URL is %d bytes long, the limit is %d", len(typeURL), maxReferenceField)
	}
	p, ok := e.policy[b.id]
	overTCP, allowed := p.overTCP[typeURL]
	if p.any {
		allowed, overTCP = true, p.anyOverTCP
	}
	switch {
	case !ok || !allowed:
		e.cfg.Log.Warn("Refusing a broker a reference type it is not allowed", "broker", b.id.String(), "type_url", typeURL)
		return nil, status.Errorf(codes.PermissionDenied, "broker %q is not allowed to use reference type %q: add it to its allowed_reference_types", b.id, typeURL)
	case !overTCP && !overUnixSocket(ctx):
		e.cfg.Log.Warn("Refusing a broker a reference type over TCP", "broker", b.id.String(), "type_url", typeURL)
		return nil, status.Errorf(codes.PermissionDenied, "reference type %q is not allowed over TCP for broker %q: use the Unix socket, or set allow_over_tcp", typeURL, b.id)
	}
	var w *workload
	switch typeURL {
	case conf.PIDReferenceType:
		var pidRef broker.WorkloadPIDReference
		if err := anyRef.UnmarshalTo(&pidRef); err != nil {
			return nil, referenceError(codes.InvalidArgument, reasonInvalid, nil, "the WorkloadPIDReference does not decode: %v", err)
		}
		w, err = e.resolvePID(ctx, b.id, pidRef.GetPid())
	case conf.KubernetesReferenceType:
		var objRef broker.KubernetesObjectReference
		if err := anyRef.UnmarshalTo(&objRef); err != nil {
			return nil, referenceError(codes.InvalidArgument, reasonInvalid, nil, "the KubernetesObjectReference does not decode: %v", err)
		}
		w, err = e.resolvePod(ctx, b.id, &objRef)
	default:
		return nil, referenceError(codes.InvalidArgument, reasonInvalid, map[string]string{"type_url": typeURL},
			"unknown reference type %q: this agent resolves %s and %s", typeURL, conf.PIDReferenceType, conf.KubernetesReferenceType)
	}
	if err != nil {
		e.cfg.Log.Debug("Could not resolve a broker's workload reference", "broker", b.id.String(), "error", err)
		return nil, err
	}
	e.cfg.Log.Debug("Resolved a broker's workload reference", "broker", b.id.String(), "workload", w.desc, "selectors", len(w.sels))
	return w, nil
}

// resolvePID attests a process on this node, pinned for the request
// (workloadapi.AttestPID): its PID cannot be reused under the request.
func (e *Endpoint) resolvePID(ctx context.Context, brokerID spiffeid.ID, pid int32) (*workload, error) {
	md := map[string]string{"pid": strconv.Itoa(int(pid))}
	if pid <= 0 {
		return nil, referenceError(codes.InvalidArgument, reasonInvalid, md, "pid %d: a PID reference must be a positive integer", pid)
	}
	sels, c, err := workloadapi.AttestPID(ctx, e.cfg.Attestor, e.cfg.Log, pid)
	if err != nil {
		return nil, withReason(err, md)
	}
	if authz, ok := e.cfg.PodAttestor.(PIDAuthorizer); ok {
		if err := authz.AuthorizeBrokerPID(ctx, brokerID, pid); err != nil {
			c.Release()
			return nil, referenceStatus(ctx, "pid "+md["pid"], md, err)
		}
		// The policy read the PID's pod from /proc: it must still be the
		// process attested, not one that took its number since.
		if err := c.Verify(); err != nil {
			c.Release()
			return nil, withReason(workloadapi.PIDStatus(e.cfg.Log, pid, err), md)
		}
	}
	return &workload{sels: sels, pid: c, desc: "pid " + md["pid"], broker: brokerID}, nil
}

// withReason adds the ErrorInfo of a NotFound status.
func withReason(err error, md map[string]string) error {
	if st := status.Convert(err); st.Code() == codes.NotFound {
		return referenceError(codes.NotFound, reasonNotFound, md, "%s", st.Message())
	}
	return err
}

// maxReferenceField bounds each string of a reference, which goes into
// errors and the log: a Kubernetes name (a DNS subdomain) is at most 253
// bytes, and type URLs are far shorter.
const maxReferenceField = 253

// resolvePod checks a KubernetesObjectReference as the spec asks and
// resolves the pod it names.
func (e *Endpoint) resolvePod(ctx context.Context, brokerID spiffeid.ID, ref *broker.KubernetesObjectReference) (*workload, error) {
	t, key, uid := ref.GetType(), ref.GetKey(), ref.GetUid()
	for _, field := range []string{t.GetPlural(), t.GetGroup(), key.GetNamespace(), key.GetName(), uid} {
		if len(field) > maxReferenceField {
			return nil, referenceError(codes.InvalidArgument, reasonInvalid, nil, "a field of the KubernetesObjectReference is %d bytes long, the limit is %d", len(field), maxReferenceField)
		}
	}
	switch {
	case t.GetPlural() == "" || t.GetGroup() == "":
		return nil, referenceError(codes.InvalidArgument, reasonInvalid, nil, "the KubernetesObjectReference needs a type with plural and group (\"pods\", \"core\")")
	case t.GetPlural() != "pods" || t.GetGroup() != "core":
		return nil, referenceError(codes.InvalidArgument, reasonInvalid, map[string]string{"plural": t.GetPlural(), "group": t.GetGroup()},
			"Kubernetes objects of type %s/%s are not resolved by this agent: only pods (core/pods)", t.GetGroup(), t.GetPlural())
	case key == nil && uid == "":
		return nil, referenceError(codes.InvalidArgument, reasonInvalid, nil, "the KubernetesObjectReference needs a key, a uid, or both")
	case key != nil && (key.GetName() == "" || key.GetNamespace() == ""):
		return nil, referenceError(codes.InvalidArgument, reasonInvalid, nil, "a pod's key needs its namespace and name")
	case e.cfg.PodAttestor == nil:
		return nil, referenceError(codes.InvalidArgument, reasonInvalid, nil,
			"this agent does not resolve %s: configure the k8s workload attestor", conf.KubernetesReferenceType)
	}
	pod := &podRef{namespace: key.GetNamespace(), name: key.GetName(), uid: uid, broker: brokerID}
	sels, err := e.attestPod(ctx, pod)
	if err != nil {
		return nil, err
	}
	desc := pod.String()
	// A pod named without its uid is pinned to the one resolved now, so
	// that a pod deleted and made again under its name (a StatefulSet's)
	// ends the stream rather than inherit it (the spec's 4.9).
	if pod.uid == "" {
		pod.uid = podUID(sels)
	}
	return &workload{sels: sels, pod: pod, desc: desc}, nil
}

// podUID is the uid in a pod's k8s:pod-uid selector, or "".
func podUID(sels []selector.Selector) string {
	for _, s := range sels {
		if uid, ok := strings.CutPrefix(s.Value, "pod-uid:"); ok && s.Type == "k8s" {
			return uid
		}
	}
	return ""
}

func (p *podRef) String() string {
	switch {
	case p.name == "":
		return "pod uid " + p.uid
	case p.uid == "":
		return "pod " + p.namespace + "/" + p.name
	}
	return fmt.Sprintf("pod %s/%s (uid %s)", p.namespace, p.name, p.uid)
}

// attestPod asks the PodAttestor for the pod's selectors, with the spec's
// codes for its errors.
func (e *Endpoint) attestPod(ctx context.Context, pod *podRef) ([]selector.Selector, error) {
	sels, err := e.cfg.PodAttestor.AttestPod(ctx, pod.broker, pod.namespace, pod.name, pod.uid)
	if err != nil {
		return nil, referenceStatus(ctx, pod.String(), map[string]string{"namespace": pod.namespace, "name": pod.name, "uid": pod.uid}, err)
	}
	return sels, nil
}

// referenceStatus is the Broker API's status of an attestor's error about
// the workload what.
func referenceStatus(ctx context.Context, what string, md map[string]string, err error) error {
	switch {
	case errors.Is(err, attestor.ErrInvalidReference):
		return referenceError(codes.InvalidArgument, reasonInvalid, md, "%s: %v", what, err)
	case errors.Is(err, attestor.ErrWorkloadNotFound):
		return referenceError(codes.NotFound, reasonNotFound, md, "%s: %v", what, err)
	case errors.Is(err, attestor.ErrBrokerNotAuthorized):
		return status.Errorf(codes.PermissionDenied, "%s: %v", what, err)
	case errors.Is(err, context.Canceled) && ctx.Err() != nil:
		return status.Error(codes.Canceled, "the call ended")
	}
	return status.Errorf(codes.Unavailable, "could not resolve %s, retry: %v", what, err)
}

// checkLive reports, as a status ending the stream, that the workload
// stopped: its process exited, or its pod is gone (or another pod took
// its name).
func (e *Endpoint) checkLive(ctx context.Context, w *workload) error {
	if w.pid != nil {
		md := map[string]string{"pid": strconv.Itoa(int(w.pid.PID))}
		if err := w.pid.Verify(); err != nil {
			return withReason(workloadapi.PIDStatus(e.cfg.Log, w.pid.PID, err), md)
		}
		authz, ok := e.cfg.PodAttestor.(PIDAuthorizer)
		if !ok {
			return nil
		}
		err := authz.AuthorizeBrokerPID(ctx, w.broker, w.pid.PID)
		if err != nil && errors.Is(err, attestor.ErrBrokerNotAuthorized) {
			return referenceStatus(ctx, w.desc, md, err)
		}
		// The answer was about the process attested only if it still runs.
		if err := w.pid.Verify(); err != nil {
			return withReason(workloadapi.PIDStatus(e.cfg.Log, w.pid.PID, err), md)
		}
		return nil
	}
	_, err := e.attestPod(ctx, w.pod)
	// A pod gone, or a grant revoked, ends the stream; anything else (the
	// kubelet unreachable) is no proof of either.
	if code := status.Code(err); code == codes.NotFound || code == codes.PermissionDenied {
		return err
	}
	return nil
}

// notEntitled is the status for a workload that no entry matches.
func notEntitled(w *workload, id spiffeid.ID) error {
	what := "no registration entry matches the workload"
	if !id.IsZero() {
		what = "no registration entry with SPIFFE ID " + id.String() + " matches the workload"
	}
	return referenceError(codes.PermissionDenied, reasonNotEntitled, nil, "%s: %s; register one for it", w.desc, what)
}
