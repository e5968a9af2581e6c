package main

import (
	"context"
	"errors"
	"fmt"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/attestor"
	"github.com/lanyard-dev/lanyard/attestor/selector"
	"github.com/lanyard-dev/lanyard/brokerapi"
	"github.com/lanyard-dev/lanyard/conf"
	"github.com/lanyard-dev/lanyard/supervisor"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// newBrokerEndpoint binds the SPIFFE Broker Endpoint of
// agent.experimental.broker. It presents the agent's own SVID, as
// spire-agent presents its agent SVID there.
func newBrokerEndpoint(cfg *conf.Config, a *agent.Agent, log hclog.Logger) (supervisor.Service, error) {
	self := a.SelfIdentity()
	if self == nil {
		return nil, errors.New("agent.experimental.broker: the upstream gives the agent no SVID of its own to present to brokers")
	}
	return brokerapi.New(brokerapi.Config{
		Log:         log.Named("broker"),
		Attestor:    a,
		Identities:  a.SVIDManager(),
		SVIDSource:  self,
		PodAttestor: podReferences{a},
		Broker:      *cfg.Agent.Broker,
		Grace:       shutdownGrace,
	})
}

// podReferences resolves the Broker API's pod references through the k8s
// workload attestor configured now (a reload may replace or remove it),
// which applies its own broker policy.
type podReferences struct{ a *agent.Agent }

// brokerPolicy is what the k8s attestor offers the broker endpoint.
type brokerPolicy interface {
	brokerapi.PodAttestor
	brokerapi.PIDAuthorizer
}

func (p podReferences) k8s() brokerPolicy {
	policy, _ := p.a.WorkloadAttestor("k8s").(brokerPolicy)
	return policy
}

func (p podReferences) AttestPod(ctx context.Context, broker spiffeid.ID, namespace, name, uid string) ([]selector.Selector, error) {
	k8s := p.k8s()
	if k8s == nil {
		return nil, fmt.Errorf("%w: this agent resolves no pod references: configure the k8s workload attestor with an experimental.broker block", attestor.ErrInvalidReference)
	}
	return k8s.AttestPod(ctx, broker, namespace, name, uid)
}

// AuthorizeBrokerPID applies the k8s attestor's policy to a process in a
// pod; without that attestor the endpoint's broker list decides alone.
func (p podReferences) AuthorizeBrokerPID(ctx context.Context, broker spiffeid.ID, pid int32) error {
	if k8s := p.k8s(); k8s != nil {
		return k8s.AuthorizeBrokerPID(ctx, broker, pid)
	}
	return nil
}
