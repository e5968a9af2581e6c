package main

import (
	"errors"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/brokerapi"
	"github.com/lanyard-dev/lanyard/conf"
	"github.com/lanyard-dev/lanyard/supervisor"
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
		Log:        log.Named("broker"),
		Attestor:   a,
		Identities: a.SVIDManager(),
		SVIDSource: self,
		Broker:     *cfg.Agent.Broker,
		Grace:      shutdownGrace,
	})
}
