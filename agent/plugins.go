package agent

import (
	"sort"
	"sync"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/conf"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// UpstreamConfig is what an upstream CA is built from.
type UpstreamConfig struct {
	Name        string
	Data        *conf.Section // the plugin_data block; never nil
	Config      *conf.Config  // the whole config, for upstreams that need the agent block or other plugins
	Log         hclog.Logger
	TrustDomain spiffeid.TrustDomain
	DataDir     string
}

// UpstreamFactory builds a configured upstream. Errors about plugin_data
// should come from cfg.Data.Errorf so that they name the file, line and key.
type UpstreamFactory func(cfg UpstreamConfig) (Upstream, error)

var (
	upstreamsMu sync.RWMutex
	upstreams   = map[string]UpstreamFactory{}
)

// RegisterUpstream makes an upstream available under name, from the init
// function of its plugin package.
func RegisterUpstream(name string, f UpstreamFactory) {
	upstreamsMu.Lock()
	defer upstreamsMu.Unlock()
	if _, dup := upstreams[name]; dup {
		panic("agent: upstream registered twice: " + name)
	}
	upstreams[name] = f
}

func lookupUpstream(name string) (UpstreamFactory, bool) {
	upstreamsMu.RLock()
	defer upstreamsMu.RUnlock()
	f, ok := upstreams[name]
	return f, ok
}

func registeredUpstreams() []string {
	upstreamsMu.RLock()
	defer upstreamsMu.RUnlock()
	names := make([]string, 0, len(upstreams))
	for n := range upstreams {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}
