package agent

import (
	"context"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/conf"
	"github.com/lanyard-dev/lanyard/internal/registry"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// AttestationData opens node attestation: the attestor's type (its plugin
// name, which the server's attestor of the same name reads) and payload.
type AttestationData struct {
	Type    string
	Payload []byte
}

// AttestationStream is the agent's end of a SPIRE Server's AttestAgent
// exchange. Each call returns the server's next challenge, or nil once the
// server has accepted the node.
type AttestationStream interface {
	SendAttestationData(ctx context.Context, data AttestationData) (challenge []byte, err error)
	SendChallengeResponse(ctx context.Context, response []byte) (challenge []byte, err error)
}

// NodeAttestor proves the node's identity to a SPIRE Server. Attest runs one
// attestation over stream: it sends the attestation data and answers every
// challenge until the server accepts the node or refuses it.
type NodeAttestor interface {
	Attest(ctx context.Context, stream AttestationStream) error
}

// NodeAttestorConfig is what a node attestor is built from.
type NodeAttestorConfig struct {
	Name        string
	Data        *conf.Section // the plugin_data block; never nil
	Log         hclog.Logger
	TrustDomain spiffeid.TrustDomain
	// JoinToken is agent.join_token or -joinToken; only join_token reads it.
	JoinToken string
}

// NodeAttestorFactory builds a configured node attestor. It checks its
// plugin_data (errors from cfg.Data.Errorf) without talking to the server.
type NodeAttestorFactory func(cfg NodeAttestorConfig) (NodeAttestor, error)

var nodeAttestors = registry.New[NodeAttestorFactory]("agent: node attestor")

// RegisterNodeAttestor makes a node attestor available under name, from the
// init function of its plugin package.
func RegisterNodeAttestor(name string, f NodeAttestorFactory) { nodeAttestors.Register(name, f) }
