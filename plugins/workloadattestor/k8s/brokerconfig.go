package k8s

import (
	"net"
	"strconv"

	"github.com/lanyard-dev/lanyard/conf"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// experimentalConfig is SPIRE's experimental block of the k8s plugin_data
// (SPIRE after 1.13, PR #6915). Only broker is built; api_server and
// sigstore are refused by name (refusedKeys).
type experimentalConfig struct {
	Broker *brokerConfig `hcl:"broker"`
}

// brokerConfig is experimental.broker: which brokers may have pods named
// by reference attested, and how.
type brokerConfig struct {
	AccessPolicy string              `hcl:"access_policy"`
	Brokers      []brokerEntryConfig `hcl:"brokers"`
}

type brokerEntryConfig struct {
	ID                string `hcl:"id"`
	PodReferenceScope string `hcl:"pod_reference_scope"`
}

// SPIRE's values (pkg/agent/plugin/workloadattestor/k8s).
const (
	accessPolicyPermissive = "permissive"
	accessPolicyEnforced   = "enforced"
	scopeAgentNode         = "agent_node"
	scopeCluster           = "cluster"
	// impersonateVerb is SPIRE's own verb, which a SubjectAccessReview asks
	// about: granting it gives no Kubernetes power, unlike "impersonate".
	impersonateVerb = "impersonate-via-spire"
)

// brokerPolicy is the validated experimental.broker block.
type brokerPolicy struct {
	enforced bool
	// scopes maps each broker's SPIFFE ID to its pod_reference_scope.
	scopes map[spiffeid.ID]string
}

// needsAPIServer reports whether any broker's answer needs the API server.
func (b *brokerPolicy) needsAPIServer() bool {
	if b == nil {
		return false
	}
	if b.enforced {
		return true
	}
	for _, s := range b.scopes {
		if s == scopeCluster {
			return true
		}
	}
	return false
}

// parseBroker checks experimental.broker as SPIRE does: access_policy is
// required and is "permissive" or "enforced"; at least one broker; each id
// a SPIFFE ID, given once; pod_reference_scope "agent_node" (the default)
// or "cluster". Every problem is reported, each at its key.
func parseBroker(sec *conf.Section, exp *experimentalConfig, errs []error) (*brokerPolicy, []error) {
	if exp == nil || exp.Broker == nil {
		return nil, errs
	}
	const path = "experimental.broker"
	c := exp.Broker
	fail := func(key, format string, args ...any) { errs = append(errs, sec.Errorf(key, format, args...)) }
	p := &brokerPolicy{scopes: make(map[spiffeid.ID]string, len(c.Brokers))}
	switch c.AccessPolicy {
	case accessPolicyEnforced:
		p.enforced = true
	case accessPolicyPermissive:
	case "":
		fail(path+".access_policy", "missing: set access_policy = \"enforced\" (a SubjectAccessReview decides each reference) or \"permissive\" (the brokers listed here are trusted for every pod)")
	default:
		fail(path+".access_policy", "%q is not an access policy: use \"enforced\" or \"permissive\"", c.AccessPolicy)
	}
	if len(c.Brokers) == 0 {
		fail(path+".brokers", "missing or empty: list at least one broker, as brokers = [{ id = \"spiffe://example.org/broker\" }]")
	}
	for i, b := range c.Brokers {
		key := path + ".brokers[" + strconv.Itoa(i) + "]"
		id, err := spiffeid.FromString(b.ID)
		switch {
		case b.ID == "":
			fail(key+".id", "missing: the broker's SPIFFE ID, as in spiffe://example.org/broker")
			continue
		case err != nil:
			fail(key+".id", "%q is not a SPIFFE ID: %v", b.ID, err)
			continue
		}
		if _, dup := p.scopes[id]; dup {
			fail(key+".id", "broker %s is listed twice: keep one entry", id)
			continue
		}
		switch b.PodReferenceScope {
		case "", scopeAgentNode:
			p.scopes[id] = scopeAgentNode
		case scopeCluster:
			p.scopes[id] = scopeCluster
		default:
			fail(key+".pod_reference_scope", "%q is not a pod reference scope: use \"agent_node\" (pods of this node, from the kubelet) or \"cluster\" (any pod, from the API server)", b.PodReferenceScope)
		}
	}
	return p, errs
}

// checkNoKubelet refuses what disable_kubelet_client contradicts, as SPIRE
// does: every kubelet setting, and a broker of scope "agent_node".
func checkNoKubelet(sec *conf.Section, c Config, b *brokerPolicy, errs []error) []error {
	if !c.DisableKubeletClient {
		return errs
	}
	for _, k := range []struct {
		key string
		set bool
	}{
		{"kubelet_read_only_port", c.KubeletReadOnlyPort != 0},
		{"kubelet_secure_port", c.KubeletSecurePort != 0},
		{"kubelet_ca_path", c.KubeletCAPath != ""},
		{"skip_kubelet_verification", c.SkipKubeletVerification},
		{"token_path", c.TokenPath != ""},
		{"certificate_path", c.CertificatePath != ""},
		{"private_key_path", c.PrivateKeyPath != ""},
		{"use_anonymous_authentication", c.UseAnonymousAuthentication},
		{"node_name_env", c.NodeNameEnv != ""},
		{"node_name", c.NodeName != ""},
		{"reload_interval", c.ReloadInterval != ""},
	} {
		if k.set {
			errs = append(errs, sec.Errorf(k.key, "cannot be used with disable_kubelet_client = true, which turns the kubelet client off: remove one of them"))
		}
	}
	if b == nil {
		return errs
	}
	for i, e := range c.Experimental.Broker.Brokers {
		id, err := spiffeid.FromString(e.ID)
		if err == nil && b.scopes[id] == scopeAgentNode {
			errs = append(errs, sec.Errorf("experimental.broker.brokers["+strconv.Itoa(i)+"].pod_reference_scope", "must be \"cluster\" with disable_kubelet_client = true: without the kubelet client only the API server can find pods"))
		}
	}
	return errs
}

// apiServerURL is the kube-apiserver's address in a pod, as client-go's
// rest.InClusterConfig forms it; empty outside a pod.
func apiServerURL(getenv func(string) string) string {
	host, port := getenv("KUBERNETES_SERVICE_HOST"), getenv("KUBERNETES_SERVICE_PORT")
	if host == "" || port == "" {
		return ""
	}
	return "https://" + net.JoinHostPort(host, port)
}
