package agent

import (
	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/conf"
	"github.com/lanyard-dev/lanyard/internal/registry"
	"github.com/lanyard-dev/lanyard/telemetry"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// UpstreamConfig is what an upstream CA is built from. Nothing in it is
// the whole config: the agent hands each part only what it reads.
type UpstreamConfig struct {
	Name        string
	Data        *conf.Section // the plugin_data block; never nil
	Log         hclog.Logger
	TrustDomain spiffeid.TrustDomain
	DataDir     string
	// Server is the SPIRE Server to use and the node attestor to attest
	// to it with; set only for the ServerUpstream.
	Server *ServerConfig
	// Metrics records the upstream's calls, the server it uses and the
	// embedded CA's rotations; nil records nothing.
	Metrics *telemetry.Metrics
}

// UpstreamFactory builds a configured upstream. Errors about plugin_data
// should come from cfg.Data.Errorf so that they name the file, line and key.
// It must not touch the disk or the network: `lanyard validate` runs it
// too, so state is read and created in Run.
type UpstreamFactory func(cfg UpstreamConfig) (Upstream, error)

// EmbeddedUpstream is the upstream when the config names none and sets no
// server_address: the CA the agent keeps itself.
const EmbeddedUpstream = "local"

var upstreams = registry.New[UpstreamFactory]("agent: upstream")

// RegisterUpstream makes an upstream available under name, from the init
// function of its plugin package.
func RegisterUpstream(name string, f UpstreamFactory) { upstreams.Register(name, f) }
