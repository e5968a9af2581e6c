package fakeagent

import (
	"context"
	"errors"

	"github.com/lanyard-dev/lanyard/agent"
)

// AttestationRecorder plays a SPIRE Server to a node attestor whose
// attestation has no challenge: it records the attestation data and answers
// with Challenge (nil: the node is accepted).
type AttestationRecorder struct {
	Data      []agent.AttestationData
	Challenge []byte
}

// SendAttestationData records d.
func (r *AttestationRecorder) SendAttestationData(_ context.Context, d agent.AttestationData) ([]byte, error) {
	r.Data = append(r.Data, d)
	return r.Challenge, nil
}

// SendChallengeResponse fails: these attestors answer no challenge.
func (r *AttestationRecorder) SendChallengeResponse(context.Context, []byte) ([]byte, error) {
	return nil, errors.New("this node attestor must not answer challenges")
}
