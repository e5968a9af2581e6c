package local

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"slices"
	"strings"

	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/attestor/selector"
	"github.com/lanyard-dev/lanyard/conf"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

type entryConfig struct {
	SPIFFEID      string   `hcl:"spiffe_id"`
	Selectors     []string `hcl:"selectors"`
	X509SVIDTTL   string   `hcl:"x509_svid_ttl"`
	JWTSVIDTTL    string   `hcl:"jwt_svid_ttl"`
	Hint          string   `hcl:"hint"`
	DNSNames      []string `hcl:"dns_names"`
	FederatesWith []string `hcl:"federates_with"`
}

type federatedBundleConfig struct {
	TrustDomain string `hcl:"trust_domain"`
	Path        string `hcl:"path"`
}

// maxHint is the Workload API's limit on a hint's length.
const maxHint = 1024

// parseEntries validates the entry blocks. An entry's ID is derived from its
// SPIFFE ID and selectors, so a reload that keeps an entry keeps its SVID.
func parseEntries(data *conf.Section, td spiffeid.TrustDomain, cfgs []entryConfig) ([]*agent.Entry, error) {
	entries := make([]*agent.Entry, 0, len(cfgs))
	seen := map[string]int{}
	for i, ec := range cfgs {
		key := func(field string) string { return fmt.Sprintf("entry[%d].%s", i, field) }
		if ec.SPIFFEID == "" {
			return nil, data.Errorf(fmt.Sprintf("entry[%d]", i), "spiffe_id is missing")
		}
		id, err := spiffeid.FromString(ec.SPIFFEID)
		if err != nil {
			return nil, data.Errorf(key("spiffe_id"), "%q is not a valid SPIFFE ID: %v", ec.SPIFFEID, err)
		}
		if id.TrustDomain() != td {
			return nil, data.Errorf(key("spiffe_id"), "%s is not in the agent's trust domain %s", id, td)
		}
		if id.Path() == "" {
			return nil, data.Errorf(key("spiffe_id"), "%s has no path: a workload's SPIFFE ID needs one, e.g. %s/web", id, td.IDString())
		}
		// SPIRE reserves /spire for its servers and agents; the agent's own
		// SVID is one of them, and a workload must not hold it.
		if p := id.Path(); p == "/spire" || strings.HasPrefix(p, "/spire/") {
			return nil, data.Errorf(key("spiffe_id"), "%s is under /spire, which SPIRE reserves for its servers and agents (the agent's own SVID is %s<host>): give the workload another path", id, SelfPathPrefix)
		}
		if len(ec.Selectors) == 0 {
			return nil, data.Errorf(fmt.Sprintf("entry[%d]", i), "the entry for %s has no selectors: give at least one, e.g. selectors = [\"unix:uid:1000\"]", id)
		}
		e := &agent.Entry{SPIFFEID: id, Hint: ec.Hint, DNSNames: ec.DNSNames, CreatedAt: int64(i)}
		for _, raw := range ec.Selectors {
			sel, err := selector.Parse(raw)
			if err != nil {
				return nil, data.Errorf(key("selectors"), "%v", err)
			}
			e.Selectors = append(e.Selectors, sel)
		}
		e.Selectors = selector.Sort(e.Selectors)
		if ec.X509SVIDTTL != "" {
			if e.X509SVIDTTL, err = data.Duration(key("x509_svid_ttl"), ec.X509SVIDTTL); err != nil {
				return nil, err
			}
		}
		if ec.JWTSVIDTTL != "" {
			if e.JWTSVIDTTL, err = data.Duration(key("jwt_svid_ttl"), ec.JWTSVIDTTL); err != nil {
				return nil, err
			}
		}
		if len(ec.Hint) > maxHint {
			return nil, data.Errorf(key("hint"), "the hint is %d bytes long; the Workload API allows %d", len(ec.Hint), maxHint)
		}
		for _, name := range ec.DNSNames {
			if name == "" || strings.ContainsAny(name, " \t/:") {
				return nil, data.Errorf(key("dns_names"), "%q is not a DNS name", name)
			}
		}
		for _, raw := range ec.FederatesWith {
			ftd, err := spiffeid.TrustDomainFromString(raw)
			if err != nil {
				return nil, data.Errorf(key("federates_with"), "%q is not a trust domain: %v", raw, err)
			}
			if ftd == td {
				return nil, data.Errorf(key("federates_with"), "an entry cannot federate with its own trust domain %s", td)
			}
			e.FederatesWith = append(e.FederatesWith, ftd)
		}
		e.ID = entryID(e)
		if j, dup := seen[e.ID]; dup {
			return nil, data.Errorf(fmt.Sprintf("entry[%d]", i), "the same as entry[%d]: same spiffe_id and selectors", j)
		}
		seen[e.ID] = i
		entries = append(entries, e)
	}
	return entries, nil
}

func entryID(e *agent.Entry) string {
	h := sha256.New()
	h.Write([]byte(e.SPIFFEID.String()))
	for _, s := range e.Selectors {
		h.Write([]byte{0})
		h.Write([]byte(s.String()))
	}
	return "local-" + hex.EncodeToString(h.Sum(nil)[:12])
}

// loadFederatedBundles reads the bundles of other trust domains: SPIFFE
// bundle (JWKS) files, or PEM files of X.509 roots.
func loadFederatedBundles(data *conf.Section, td spiffeid.TrustDomain, cfgs []federatedBundleConfig) ([]*spiffebundle.Bundle, error) {
	var out []*spiffebundle.Bundle
	for i, fc := range cfgs {
		key := func(field string) string { return fmt.Sprintf("federated_bundle[%d].%s", i, field) }
		ftd, err := spiffeid.TrustDomainFromString(fc.TrustDomain)
		if err != nil {
			return nil, data.Errorf(key("trust_domain"), "%q is not a trust domain: %v", fc.TrustDomain, err)
		}
		if ftd == td {
			return nil, data.Errorf(key("trust_domain"), "%s is the agent's own trust domain", td)
		}
		if slices.ContainsFunc(out, func(b *spiffebundle.Bundle) bool { return b.TrustDomain() == ftd }) {
			return nil, data.Errorf(key("trust_domain"), "a second bundle for %s", ftd)
		}
		if fc.Path == "" {
			return nil, data.Errorf(key("path"), "path is missing: the file with %s's bundle", ftd)
		}
		raw, err := os.ReadFile(fc.Path)
		if err != nil {
			return nil, data.Errorf(key("path"), "reading the bundle of %s: %v", ftd, err)
		}
		var b *spiffebundle.Bundle
		if strings.HasPrefix(strings.TrimSpace(string(raw)), "-----BEGIN") {
			xb, perr := x509bundle.Parse(ftd, raw)
			if perr != nil {
				return nil, data.Errorf(key("path"), "%s is not a PEM bundle: %v", fc.Path, perr)
			}
			b = spiffebundle.FromX509Bundle(xb)
		} else if b, err = spiffebundle.Parse(ftd, raw); err != nil {
			return nil, data.Errorf(key("path"), "%s is not a SPIFFE bundle: %v", fc.Path, err)
		}
		if b.Empty() {
			return nil, data.Errorf(key("path"), "the bundle in %s has no authorities", fc.Path)
		}
		out = append(out, b)
	}
	return out, nil
}
