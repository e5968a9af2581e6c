package attestor

import "errors"

// The errors of attesting a workload named by reference (a SPIFFE Broker
// API reference) rather than by the caller's own process. They belong to
// no consumer: an attestor wraps them so that the Broker endpoint can map
// them to codes without the attestor importing it.
var (
	// ErrInvalidReference: the reference is malformed (InvalidArgument).
	ErrInvalidReference = errors.New("invalid workload reference")
	// ErrWorkloadNotFound: nothing the reference names exists, or it is
	// not the workload named (NotFound).
	ErrWorkloadNotFound = errors.New("workload not found")
	// ErrBrokerNotAuthorized: the broker may not act for that workload
	// (PermissionDenied).
	ErrBrokerNotAuthorized = errors.New("broker not authorized for the workload")
)

// ReferenceError is an error of one attestor that is also one of the
// errors above: errors.Is matches both it and Kind.
type ReferenceError struct {
	Msg  string
	Kind error
}

func (e *ReferenceError) Error() string { return e.Msg }

// Unwrap returns Kind.
func (e *ReferenceError) Unwrap() error { return e.Kind }
