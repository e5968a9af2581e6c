package spire

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/lanyard-dev/lanyard/agent"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	agentv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/server/agent/v1"
	"github.com/spiffe/spire-api-sdk/proto/spire/api/types"
)

// attestStream runs AttestAgent for a NodeAttestor.
type attestStream struct {
	client agentv1.AgentClient
	csr    []byte
	stream agentv1.Agent_AttestAgentClient
	result *agentv1.AttestAgentResponse_Result
}

var _ agent.AttestationStream = (*attestStream)(nil)

func (a *attestStream) SendAttestationData(ctx context.Context, data agent.AttestationData) ([]byte, error) {
	return a.send(ctx, &agentv1.AttestAgentRequest{Step: &agentv1.AttestAgentRequest_Params_{
		Params: &agentv1.AttestAgentRequest_Params{
			Data:   &types.AttestationData{Type: data.Type, Payload: data.Payload},
			Params: &agentv1.AgentX509SVIDParams{Csr: a.csr},
		},
	}})
}

func (a *attestStream) SendChallengeResponse(ctx context.Context, response []byte) ([]byte, error) {
	if a.stream == nil {
		return nil, errors.New("a challenge response was sent before the attestation data")
	}
	return a.send(ctx, &agentv1.AttestAgentRequest{Step: &agentv1.AttestAgentRequest_ChallengeResponse{ChallengeResponse: response}})
}

func (a *attestStream) send(ctx context.Context, req *agentv1.AttestAgentRequest) ([]byte, error) {
	if a.result != nil {
		return nil, errors.New("attestation already completed")
	}
	if a.stream == nil {
		stream, err := a.client.AttestAgent(ctx)
		if err != nil {
			return nil, fmt.Errorf("opening the attestation stream: %w", err)
		}
		a.stream = stream
	}
	if err := a.stream.Send(req); err != nil {
		// The server's reason is in the status Recv returns.
		if _, rerr := a.stream.Recv(); rerr != nil {
			err = rerr
		}
		return nil, fmt.Errorf("node attestation: %w", err)
	}
	resp, err := a.stream.Recv()
	if err != nil {
		return nil, fmt.Errorf("node attestation: %w", err)
	}
	if ch := resp.GetChallenge(); ch != nil {
		return ch, nil
	}
	res := resp.GetResult()
	if res == nil || res.Svid == nil {
		return nil, errors.New("node attestation: the SPIRE Server answered with neither a challenge nor an SVID")
	}
	a.result = res
	_ = a.stream.CloseSend()
	return nil, nil
}

// redactID hides the token in join_token agent IDs, which spell it out
// (spiffe://td/spire/agent/join_token/<token>).
func redactID(id spiffeid.ID) string {
	const marker = "/spire/agent/join_token/"
	s := id.String()
	if i := strings.Index(s, marker); i >= 0 {
		return s[:i+len(marker)] + "<redacted>"
	}
	return s
}
