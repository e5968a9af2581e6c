package k8s

import (
	"errors"
	"net"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/conf"
)

// SPIRE 1.13's defaults (pkg/agent/plugin/workloadattestor/k8s).
const (
	defaultSecurePort        = 10250
	defaultKubeletCAPath     = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
	defaultTokenPath         = "/var/run/secrets/kubernetes.io/serviceaccount/token" //nolint:gosec // a path, not a token
	defaultNodeNameEnv       = "MY_NODE_NAME"
	defaultPollRetryInterval = 500 * time.Millisecond
	defaultReloadInterval    = time.Minute
	// defaultMaxPodListSize bounds the kubelet's answer. A pod as the
	// kubelet lists it is 5-20 KiB (managedFields make most of it), so a
	// node at the kubelet's 110-pod default answers about 2 MiB, and 64 MiB
	// leaves room for ten times the pods. Decoding is streamed, so the
	// limit bounds time and bandwidth, not memory.
	defaultMaxPodListSize = 64 << 20
)

// Config is the plugin_data of the k8s attestor. The keys are SPIRE 1.13's,
// plus max_pod_list_size.
type Config struct {
	KubeletReadOnlyPort         int    `hcl:"kubelet_read_only_port"`
	KubeletSecurePort           int    `hcl:"kubelet_secure_port"`
	KubeletCAPath               string `hcl:"kubelet_ca_path"`
	SkipKubeletVerification     bool   `hcl:"skip_kubelet_verification"`
	TokenPath                   string `hcl:"token_path"`
	CertificatePath             string `hcl:"certificate_path"`
	PrivateKeyPath              string `hcl:"private_key_path"`
	UseAnonymousAuthentication  bool   `hcl:"use_anonymous_authentication"`
	NodeNameEnv                 string `hcl:"node_name_env"`
	NodeName                    string `hcl:"node_name"`
	DisableContainerSelectors   bool   `hcl:"disable_container_selectors"`
	PollRetryInterval           string `hcl:"poll_retry_interval"`
	MaxPollAttempts             int    `hcl:"max_poll_attempts"`
	ReloadInterval              string `hcl:"reload_interval"`
	UseNewContainerLocator      *bool  `hcl:"use_new_container_locator"`
	VerboseContainerLocatorLogs bool   `hcl:"verbose_container_locator_logs"`
	// MaxPodListSize (bytes) is Lanyard's own: SPIRE reads any size.
	MaxPodListSize int64 `hcl:"max_pod_list_size"`
	// APIServerCAPath is Lanyard's own: SPIRE always trusts the service
	// account's ca.crt for the API server.
	APIServerCAPath string              `hcl:"api_server_ca_path"`
	Experimental    *experimentalConfig `hcl:"experimental"`
	// DisableKubeletClient is SPIRE's (after 1.13), for broker-only agents.
	DisableKubeletClient bool `hcl:"disable_kubelet_client"`
}

// refusedKeys are SPIRE's keys for features Lanyard does not build, with
// what to tell a user who sets them.
var refusedKeys = map[string]string{
	"experimental.api_server": "the api_server block (a controller-runtime cache for object references) is not supported by Lanyard: remove it; Lanyard asks the API server directly, and only for pods",
	"experimental.sigstore":   "sigstore image signature verification is not supported by Lanyard; remove the block, and any k8s:image-signature selectors",
	"sigstore":                "sigstore image signature verification is not supported by Lanyard; remove the block, and the k8s:image-signature selectors with it",
	"enable_namespace_labels": "enable_namespace_labels (k8s:ns-label selectors, from a SPIRE release after 1.13) is not supported by Lanyard",
	"api_server":              "the api_server block (from a SPIRE release after 1.13) is not supported by Lanyard: remove it; the API server is found from KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT",
	"broker":                  "the broker block belongs inside the experimental block: write experimental { broker { access_policy = ... brokers = [...] } }",
}

// settings is the validated configuration.
type settings struct {
	secure bool
	port   int
	// nodeName is where the secure port is reached and the name its
	// certificate must carry; empty means 127.0.0.1 and the chain only.
	nodeName   string
	skipVerify bool
	caPath     string
	// auth is how the agent proves itself on the secure port.
	auth      authMode
	tokenPath string
	certPath  string
	keyPath   string

	pollInterval time.Duration
	// maxPolls, when set, ends an attestation after that many lists were
	// searched. SPIRE's default is 60, which at 500 ms is the 30 s of
	// workload_attestor_timeout; Lanyard's default is the attestation's
	// deadline alone, so that one raising the timeout waits longer, and a
	// container not yet listed always ends as a timeout (Unavailable: the
	// caller retries), never as a failure that races with the deadline.
	maxPolls       int
	reloadInterval time.Duration
	maxPodListSize int64

	disableContainerSelectors bool
	verboseLocatorLogs        bool

	// broker is experimental.broker; nil without the block.
	broker *brokerPolicy
	// noKubelet is disable_kubelet_client: the kubelet is never asked, so
	// processes get no k8s selectors and only "cluster" brokers are
	// answered, from the API server.
	noKubelet bool
	// apiServer is the kube-apiserver's URL from KUBERNETES_SERVICE_HOST
	// and _PORT (empty outside a pod), apiCAPath the CA it is checked with.
	apiServer string
	apiCAPath string
}

type authMode int

const (
	authToken authMode = iota
	authCertificate
	authAnonymous
)

// kubeletURL is the pod list's address, as SPIRE forms it: the read-only
// port and a secure port without a node name on 127.0.0.1 (host
// networking), else the node name.
func (s *settings) kubeletURL() string {
	if !s.secure {
		return "http://" + net.JoinHostPort("127.0.0.1", strconv.Itoa(s.port)) + "/pods"
	}
	host := s.nodeName
	if host == "" {
		host = "127.0.0.1"
	}
	return "https://" + net.JoinHostPort(host, strconv.Itoa(s.port)) + "/pods"
}

// parseConfig decodes and checks plugin_data without any I/O. getenv reads
// the node name's variable.
func parseConfig(sec *conf.Section, getenv func(string) string, log hclog.Logger) (settings, error) {
	var c Config
	// Decoding errors and those found below are reported together, so one
	// pass over the file fixes them all.
	var errs []error
	if err := refuseUnbuilt(sec, sec.Decode(&c)); err != nil {
		errs = append(errs, err)
	}
	fail := func(key, format string, args ...any) { errs = append(errs, sec.Errorf(key, format, args...)) }

	s := settings{
		skipVerify:                c.SkipKubeletVerification,
		caPath:                    orDefault(c.KubeletCAPath, defaultKubeletCAPath),
		tokenPath:                 orDefault(c.TokenPath, defaultTokenPath),
		certPath:                  c.CertificatePath,
		keyPath:                   c.PrivateKeyPath,
		pollInterval:              defaultPollRetryInterval,
		reloadInterval:            defaultReloadInterval,
		maxPodListSize:            defaultMaxPodListSize,
		disableContainerSelectors: c.DisableContainerSelectors,
		verboseLocatorLogs:        c.VerboseContainerLocatorLogs,
		apiServer:                 apiServerURL(getenv),
		apiCAPath:                 orDefault(c.APIServerCAPath, defaultKubeletCAPath),
	}
	s.broker, errs = parseBroker(sec, c.Experimental, errs)
	s.noKubelet, errs = c.DisableKubeletClient, checkNoKubelet(sec, c, s.broker, errs)

	for _, p := range []struct {
		key  string
		port int
	}{{"kubelet_read_only_port", c.KubeletReadOnlyPort}, {"kubelet_secure_port", c.KubeletSecurePort}} {
		if p.port < 0 || p.port > 65535 {
			fail(p.key, "port %d is out of range: use 1-65535, or leave it out", p.port)
		}
	}
	switch {
	case c.KubeletReadOnlyPort > 0 && c.KubeletSecurePort > 0:
		fail("kubelet_read_only_port", "cannot use both the read-only and the secure port: set kubelet_read_only_port or kubelet_secure_port, not both")
	case c.KubeletReadOnlyPort > 0:
		s.port = c.KubeletReadOnlyPort
	case c.KubeletSecurePort > 0:
		s.secure, s.port = true, c.KubeletSecurePort
	default:
		s.secure, s.port = true, defaultSecurePort
	}

	switch {
	case c.UseAnonymousAuthentication:
		s.auth = authAnonymous
	case c.CertificatePath != "" && c.PrivateKeyPath == "":
		fail("certificate_path", "the private key path is required with the certificate path: set private_key_path too")
	case c.CertificatePath == "" && c.PrivateKeyPath != "":
		fail("private_key_path", "the certificate path is required with the private key path: set certificate_path too")
	case c.CertificatePath != "":
		s.auth = authCertificate
	}

	s.nodeName, errs = nodeName(sec, c, getenv, errs)

	if c.PollRetryInterval != "" {
		if d, err := sec.Duration("poll_retry_interval", c.PollRetryInterval); err != nil {
			errs = append(errs, err)
		} else {
			s.pollInterval = d
		}
	}
	if c.ReloadInterval != "" {
		if d, err := sec.Duration("reload_interval", c.ReloadInterval); err != nil {
			errs = append(errs, err)
		} else {
			s.reloadInterval = d
		}
	}
	switch {
	case c.MaxPollAttempts < 0:
		fail("max_poll_attempts", "%d is negative: use a count of polls, or leave it out to poll until workload_attestor_timeout", c.MaxPollAttempts)
	case c.MaxPollAttempts > 0:
		s.maxPolls = c.MaxPollAttempts
	}
	switch {
	case c.MaxPodListSize < 0:
		fail("max_pod_list_size", "%d is negative: use a size in bytes, or leave it out for %d (64 MiB)", c.MaxPodListSize, defaultMaxPodListSize)
	case c.MaxPodListSize > 0:
		s.maxPodListSize = c.MaxPodListSize
	}
	if err := errors.Join(errs...); err != nil {
		return settings{}, err
	}
	warnIgnored(c, s, log)
	return s, nil
}

// nodeName resolves the node name as SPIRE does: node_name, else the
// variable node_name_env names, else MY_NODE_NAME; it may stay empty.
func nodeName(sec *conf.Section, c Config, getenv func(string) string, errs []error) (string, []error) {
	name, key := c.NodeName, "node_name"
	if name == "" {
		env := orDefault(c.NodeNameEnv, defaultNodeNameEnv)
		name, key = getenv(env), "node_name_env"
		if name != "" && !validHost(name) {
			return "", append(errs, sec.Errorf(key, "environment variable %s holds %q, which is not a node name (a DNS name or an IP address)", env, name))
		}
		return name, errs
	}
	if !validHost(name) {
		errs = append(errs, sec.Errorf(key, "%q is not a node name: use the node's DNS name or IP address, as in spec.nodeName", name))
	}
	return name, errs
}

// validHost accepts what can stand in the kubelet's URL and be checked
// against its certificate: an IP address or a DNS name.
func validHost(h string) bool {
	if net.ParseIP(h) != nil {
		return true
	}
	if len(h) > 253 {
		return false
	}
	for _, r := range h {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '.' || r == '_') {
			return false
		}
	}
	u, err := url.Parse("https://" + h + "/")
	return err == nil && u.Hostname() == h
}

// warnIgnored says which keys have no effect, where SPIRE ignores them
// silently; a SPIRE config that sets them still loads.
func warnIgnored(c Config, s settings, log hclog.Logger) {
	if !s.secure {
		for key, set := range map[string]bool{
			"kubelet_ca_path": c.KubeletCAPath != "", "skip_kubelet_verification": c.SkipKubeletVerification,
			"token_path": c.TokenPath != "", "certificate_path": c.CertificatePath != "",
			"use_anonymous_authentication": c.UseAnonymousAuthentication, "node_name": c.NodeName != "",
		} {
			if set {
				log.Warn("This key has no effect with kubelet_read_only_port: the read-only port is plain HTTP on 127.0.0.1 without authentication", "key", key)
			}
		}
	}
	if s.secure && c.UseAnonymousAuthentication && (c.TokenPath != "" || c.CertificatePath != "") {
		log.Warn("use_anonymous_authentication is set: token_path, certificate_path and private_key_path are not used")
	}
	if s.secure && c.SkipKubeletVerification && c.KubeletCAPath != "" {
		log.Warn("skip_kubelet_verification is set: kubelet_ca_path is not used and the kubelet's certificate is not checked")
	}
	if s.broker.needsAPIServer() && s.apiServer == "" {
		log.Warn("experimental.broker needs the API server (access_policy \"enforced\" or a broker with pod_reference_scope \"cluster\"), but KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are not set: those references will fail until the agent runs in a pod")
	}
	if c.UseNewContainerLocator != nil && !*c.UseNewContainerLocator {
		log.Warn("use_new_container_locator = false has no effect: Lanyard has one container locator, which reads cgroup v1 and v2")
	}
}

// refuseUnbuilt turns the "unknown key" errors for SPIRE's keys of features
// Lanyard does not build into errors that say so.
func refuseUnbuilt(sec *conf.Section, err error) error {
	var list conf.Errors
	if err == nil || !errors.As(err, &list) {
		return err
	}
	out := make(conf.Errors, len(list))
	for i, e := range list {
		out[i] = e
		for key, msg := range refusedKeys {
			var want *conf.Error
			if errors.As(sec.Errorf(key, ""), &want) && strings.EqualFold(e.Key, want.Key) && strings.HasPrefix(e.Msg, "unknown key") {
				out[i] = &conf.Error{Pos: e.Pos, Key: e.Key, Msg: msg}
			}
		}
	}
	return out
}

func orDefault(v, def string) string {
	if v == "" {
		return def
	}
	return v
}
