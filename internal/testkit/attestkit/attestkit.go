// Package attestkit is what tests of the APIs that attest workloads (the
// admin API, the Broker API) share: the real unix workload attestor, the
// selector it reports for the test's own processes, and entries for it.
// It is apart from testkit, which the unix plugin's own tests import.
package attestkit

import (
	"os"
	"strconv"
	"testing"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/attestor"
	"github.com/lanyard-dev/lanyard/attestor/selector"
	"github.com/lanyard-dev/lanyard/conf"
	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/lanyard-dev/lanyard/internal/testkit/fakeagent"
	unixattestor "github.com/lanyard-dev/lanyard/plugins/workloadattestor/unix"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Unix is the real unix workload attestor with its defaults, as the agent
// runs it.
func Unix(t testing.TB, log hclog.Logger, td spiffeid.TrustDomain) *attestor.MultiAttestor {
	t.Helper()
	section, err := conf.NewSection("test.conf", "")
	if err != nil {
		t.Fatal(err)
	}
	wa, err := unixattestor.New(attestor.PluginConfig{Name: "unix", Data: section, Log: log.Named("unix"), TrustDomain: td})
	if err != nil {
		t.Fatal(err)
	}
	return attestor.NewMultiAttestor(log.Named("attestor"), 0, attestor.Plugin{Name: "unix", Attestor: wa})
}

// Cache is a real SVID cache over a fake upstream whose CA is "ca 1" of td,
// logging to log.
func Cache(t testing.TB, log hclog.Logger, td spiffeid.TrustDomain) (*fakeagent.Upstream, *agent.SVIDManager) {
	t.Helper()
	up := fakeagent.NewUpstream(t, td)
	up.SetCA(testkit.NewTrustDomainCA(t, td, testkit.WithCommonName("ca 1")))
	return up, agent.NewSVIDManager(log.Named("cache"), up)
}

// MySelector is what Unix reports for the test's processes: its uid.
func MySelector() selector.Selector {
	return selector.Selector{Type: "unix", Value: "uid:" + strconv.Itoa(os.Getuid())}
}

// Entry is a registration entry for id with one selector.
func Entry(id spiffeid.ID, createdAt int64, sel selector.Selector, federatesWith ...spiffeid.TrustDomain) *agent.Entry {
	return &agent.Entry{ID: "entry-" + id.Path()[1:], SPIFFEID: id, Selectors: []selector.Selector{sel}, CreatedAt: createdAt, FederatesWith: federatesWith}
}
