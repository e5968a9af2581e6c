package conf

import (
	"fmt"
	"net"
	"path/filepath"
	"strconv"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// The reference types of the SPIFFE Broker API that Lanyard resolves, and
// the wildcard that allows each of them.
const (
	PIDReferenceType        = "type.googleapis.com/spiffe.broker.WorkloadPIDReference"
	KubernetesReferenceType = "type.googleapis.com/spiffe.broker.KubernetesObjectReference"
	AnyReferenceType        = "*"
)

// Broker is agent.experimental.broker: the SPIFFE Broker Endpoint, as
// spire-agent configures it. At least one of SocketPath and BindAddress is
// set, and Brokers has at least one broker.
type Broker struct {
	SocketPath  string // a Unix socket; "" for none
	BindAddress string // "host:port" for TCP; "" for none
	Brokers     []AuthorizedBroker
}

// AuthorizedBroker is a broker allowed at the endpoint: its SPIFFE ID (of
// any trust domain, as in SPIRE) and the reference types it may use.
type AuthorizedBroker struct {
	ID                    spiffeid.ID
	AllowedReferenceTypes []AllowedReferenceType
}

// AllowedReferenceType is one reference type a broker may use; TypeURL
// AnyReferenceType allows every type, and is then the only one listed.
type AllowedReferenceType struct {
	TypeURL string
	// AllowOverTCP allows the type on the TCP listener too; otherwise only
	// on the Unix socket, as a PID means something only on this node.
	AllowOverTCP bool
}

type rawExperimental struct {
	Broker *rawBroker `hcl:"broker"`
}

type rawBroker struct {
	SocketPath  string           `hcl:"socket_path"`
	BindAddress string           `hcl:"bind_address"`
	Brokers     []rawBrokerEntry `hcl:"brokers"`
}

type rawBrokerEntry struct {
	ID                    *string                   `hcl:"id"`
	AllowedReferenceTypes []rawAllowedReferenceType `hcl:"allowed_reference_types"`
}

type rawAllowedReferenceType struct {
	TypeURL      *string `hcl:"type_url"`
	AllowOverTCP bool    `hcl:"allow_over_tcp"`
}

// refusedExperimentalKeys are spire-agent's other experimental keys, each
// refused by name rather than as a typo.
var refusedExperimentalKeys = func() map[string]string {
	m := map[string]string{}
	for _, k := range []string{"jwt_svid_cache_hit_timeout", "named_pipe_name", "admin_named_pipe_name",
		"use_sync_authorized_entries", "require_pq_kem", "ratelimit", "feature_flags",
		"x509_svid_cache_max_size", "disable_lru_cache"} {
		m[k] = fmt.Sprintf("spire-agent key experimental.%s is not supported by Lanyard (of experimental, only broker is)", k)
	}
	m["sync_interval"] = "spire-agent key experimental.sync_interval is not supported by Lanyard here: set sync_interval in the agent block"
	return m
}()

const brokerKey = "agent.experimental.broker"

// buildBroker checks the broker block as spire-agent does, and also that
// its socket is neither where workloads reach nor the admin socket.
func buildBroker(top *Section, a *Agent, r *rawBroker, errs *errList) *Broker {
	b := &Broker{SocketPath: r.SocketPath, BindAddress: r.BindAddress}
	fail := func(key, format string, args ...any) {
		if !errs.has(key) {
			errs.addAll(top.Errorf(key, format, args...))
		}
	}
	if b.SocketPath == "" && b.BindAddress == "" {
		fail(brokerKey, "the broker endpoint needs socket_path, bind_address, or both")
	}
	if b.SocketPath != "" {
		switch {
		case sameOrBelow(filepath.Dir(b.SocketPath), filepath.Dir(a.SocketPath)):
			fail(brokerKey+".socket_path", "broker socket %q is in the directory of socket_path %q (or below it); put it in a directory workloads cannot reach", b.SocketPath, a.SocketPath)
		case a.AdminSocketPath != "" && samePath(b.SocketPath, a.AdminSocketPath):
			fail(brokerKey+".socket_path", "broker socket %q is the admin socket; give each its own path", b.SocketPath)
		}
	}
	if b.BindAddress != "" {
		if msg := checkBindAddress(b.BindAddress); msg != "" {
			fail(brokerKey+".bind_address", "%s", msg)
		}
	}
	if len(r.Brokers) == 0 && !errs.has(brokerKey+".brokers") {
		fail(brokerKey, "brokers is missing: list at least one broker, as brokers = [{ id = \"spiffe://%s/broker\", allowed_reference_types = [{ type_url = %q }] }]", trustDomainName(a.TrustDomain), PIDReferenceType)
	}
	seen := map[spiffeid.ID]int{}
	for i, rb := range r.Brokers {
		key := fmt.Sprintf("%s.brokers[%d]", brokerKey, i)
		ab, ok := buildAuthorizedBroker(top, key, rb, fail)
		if !ok {
			continue
		}
		if first, dup := seen[ab.ID]; dup {
			fail(key+".id", "broker %q is listed twice (first as brokers[%d]); merge its allowed_reference_types into one", ab.ID, first)
			continue
		}
		seen[ab.ID] = i
		b.Brokers = append(b.Brokers, ab)
	}
	return b
}

func buildAuthorizedBroker(top *Section, key string, rb rawBrokerEntry, fail func(key, format string, args ...any)) (AuthorizedBroker, bool) {
	var ab AuthorizedBroker
	ok := true
	switch {
	case rb.ID == nil || *rb.ID == "":
		fail(key, "id is missing: give the broker's SPIFFE ID, as id = \"spiffe://example.org/broker\"")
		ok = false
	default:
		id, err := spiffeid.FromString(*rb.ID)
		if err != nil {
			fail(key+".id", "invalid SPIFFE ID %q: %v", *rb.ID, err)
			ok = false
		}
		ab.ID = id
	}
	if len(rb.AllowedReferenceTypes) == 0 {
		fail(key, "allowed_reference_types is missing: list at least one, as allowed_reference_types = [{ type_url = %q }]", PIDReferenceType)
		return ab, false
	}
	listed := map[string]bool{}
	for j, rt := range rb.AllowedReferenceTypes {
		tkey := fmt.Sprintf("%s.allowed_reference_types[%d]", key, j)
		switch {
		case rt.TypeURL == nil || *rt.TypeURL == "":
			fail(tkey, "type_url is missing: give %q, %q, or \"*\" for any", PIDReferenceType, KubernetesReferenceType)
			ok = false
			continue
		case *rt.TypeURL == AnyReferenceType && len(rb.AllowedReferenceTypes) > 1:
			fail(tkey+".type_url", "the wildcard \"*\" must be the only allowed reference type of a broker")
			ok = false
		case *rt.TypeURL != AnyReferenceType && *rt.TypeURL != PIDReferenceType && *rt.TypeURL != KubernetesReferenceType:
			fail(tkey+".type_url", "unknown reference type %q: Lanyard resolves %q and %q (or \"*\" for both)", *rt.TypeURL, PIDReferenceType, KubernetesReferenceType)
			ok = false
		case listed[*rt.TypeURL]:
			fail(tkey+".type_url", "reference type %q is listed twice for this broker; keep one", *rt.TypeURL)
			ok = false
		}
		listed[*rt.TypeURL] = true
		ab.AllowedReferenceTypes = append(ab.AllowedReferenceTypes, AllowedReferenceType{TypeURL: *rt.TypeURL, AllowOverTCP: rt.AllowOverTCP})
	}
	return ab, ok
}

// checkBindAddress returns why addr is not "host:port", or "". The host may
// be empty (every interface); names are resolved when the agent binds.
func checkBindAddress(addr string) string {
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Sprintf("bind_address %q is not host:port (%v); write it like \"127.0.0.1:8443\"", addr, err)
	}
	if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
		return fmt.Sprintf("bind_address %q has port %q; use a number from 1 to 65535", addr, port)
	}
	return ""
}

// samePath reports whether a and b name the same path once made absolute.
func samePath(a, b string) bool {
	if abs, err := filepath.Abs(a); err == nil {
		a = abs
	}
	if abs, err := filepath.Abs(b); err == nil {
		b = abs
	}
	return filepath.Clean(a) == filepath.Clean(b)
}
