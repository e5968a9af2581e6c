package main

import (
	"github.com/lanyard-dev/lanyard/brokerapi"
	k8s "github.com/lanyard-dev/lanyard/plugins/workloadattestor/k8s"
)

// The k8s workload attestor is what the broker endpoint's pod references
// and PID policy reach through podReferences.
var _ brokerPolicy = (*k8s.Attestor)(nil)

var _ brokerapi.PIDAuthorizer = podReferences{}
