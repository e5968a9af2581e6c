package k8s

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"syscall"
	"time"
	"unicode"
)

// Timeouts of one kubelet request. The whole request is bounded as in
// SPIRE (10 s); connecting and the TLS handshake get less, so that a
// kubelet that is down fails the fetch quickly and the next poll retries.
const (
	kubeletRequestTimeout = 10 * time.Second
	kubeletDialTimeout    = 3 * time.Second
	kubeletTLSTimeout     = 3 * time.Second
	// maxErrorBodySize bounds what is read of a refusal to quote it.
	maxErrorBodySize = 512
)

// The classes of fetch failure; each error wraps one and says what to fix.
var (
	errKubeletCredentials  = errors.New("cannot load the agent's credentials for the kubelet")
	errKubeletUnreachable  = errors.New("cannot reach the kubelet")
	errKubeletUnauthorized = errors.New("the kubelet refused the agent's credentials (401 Unauthorized)")
	errKubeletForbidden    = errors.New("the kubelet denied the agent the pod list (403 Forbidden)")
	errKubeletStatus       = errors.New("the kubelet answered with an error")
	errKubeletNotTrusted   = errors.New("the kubelet's certificate is not trusted")
)

// kubeletClient fetches the pod list. It keeps one transport for its
// life, so that connections to the kubelet are reused.
type kubeletClient struct {
	s         settings
	url       string
	creds     *credentials
	transport *http.Transport
	http      *http.Client
	warn      func(msg string, args ...any)
	// timeout bounds each request: kubeletRequestTimeout.
	timeout time.Duration
}

// dialFunc connects to the kubelet; tests point a node name at their
// server with it.
type dialFunc func(ctx context.Context, network, addr string) (net.Conn, error)

func newKubeletClient(s settings, dial dialFunc, warn func(string, ...any)) *kubeletClient {
	creds := newCredentials(s)
	if dial == nil {
		dial = (&net.Dialer{Timeout: kubeletDialTimeout, KeepAlive: 30 * time.Second}).DialContext
	}
	transport := &http.Transport{
		// Never a proxy from the environment: the kubelet is on this node.
		Proxy:                 nil,
		DialContext:           dial,
		TLSClientConfig:       creds.tlsConfig(),
		TLSHandshakeTimeout:   kubeletTLSTimeout,
		ResponseHeaderTimeout: kubeletRequestTimeout,
		// Node-local: gzip would cost CPU on both ends for nothing.
		DisableCompression:  true,
		MaxIdleConnsPerHost: 1,
		IdleConnTimeout:     90 * time.Second,
	}
	return &kubeletClient{
		s:         s,
		url:       s.kubeletURL(),
		creds:     creds,
		transport: transport,
		http:      &http.Client{Transport: transport, CheckRedirect: noRedirects},
		warn:      warn,
		timeout:   kubeletRequestTimeout,
	}
}

// The kubelet never redirects /pods; following one would send the token
// elsewhere.
func noRedirects(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }

// fetch gets and decodes the pod list once, within kubeletRequestTimeout.
func (k *kubeletClient) fetch(ctx context.Context) (*podList, error) {
	bearer, tlsChanged, err := k.creds.refresh(time.Now())
	if err != nil {
		return nil, err
	}
	if tlsChanged {
		// Pooled connections were checked with the old CA or made with the
		// old client certificate.
		k.transport.CloseIdleConnections()
	}
	ctx, cancel := context.WithTimeout(ctx, k.timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, k.url, nil)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", errKubeletUnreachable, err)
	}
	req.Header.Set("Accept", "application/json")
	if bearer != "" {
		req.Header.Set("Authorization", "Bearer "+bearer)
	}
	resp, err := k.http.Do(req)
	if err != nil {
		return nil, k.requestError(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, k.statusError(resp)
	}
	body := &limitedReader{r: resp.Body, limit: k.s.maxPodListSize}
	list, err := decodePodList(body, k.warn)
	if err != nil {
		if errors.Is(err, context.DeadlineExceeded) || ctx.Err() != nil {
			return nil, fmt.Errorf("%w: GET %s: the pod list (%d bytes so far) did not arrive within %s", errKubeletUnreachable, k.url, body.n, k.timeout)
		}
		return nil, fmt.Errorf("GET %s: %w", k.url, err)
	}
	list.size = body.n
	return list, nil
}

// requestError says why no answer came, and where to look.
func (k *kubeletClient) requestError(err error) error {
	// The URL is said once, below.
	var uerr *url.Error
	if errors.As(err, &uerr) {
		err = uerr.Err
	}
	var (
		hint   string
		dnsErr *net.DNSError
	)
	switch {
	case errors.Is(err, context.DeadlineExceeded):
		hint = fmt.Sprintf("no answer within %s: is the kubelet up and listening on port %d?", k.timeout, k.s.port)
	case errors.Is(err, syscall.ECONNREFUSED):
		hint = fmt.Sprintf("nothing listens on port %d: check %s", k.s.port, k.portKey())
		if k.s.nodeName == "" && k.s.secure {
			hint += "; the kubelet is reached on 127.0.0.1 when no node name is set, which needs hostNetwork: true (or set node_name_env to a variable holding spec.nodeName)"
		}
	case errors.As(err, &dnsErr):
		hint = fmt.Sprintf("the node name %q does not resolve: set node_name, or node_name_env to a variable holding spec.nodeName", k.s.nodeName)
	case errors.Is(err, errKubeletNotTrusted):
		return fmt.Errorf("%w: GET %s: %w", errKubeletUnreachable, k.url, err)
	case strings.Contains(err.Error(), "remote error: tls:") && k.s.auth == authCertificate:
		hint = fmt.Sprintf("the kubelet refused the client certificate %s in the TLS handshake: it must be valid and signed by the kubelet's --client-ca-file", k.s.certPath)
	case strings.Contains(err.Error(), "server gave HTTP response to HTTPS client"):
		hint = fmt.Sprintf("port %d serves plain HTTP: use kubelet_read_only_port for it", k.s.port)
	}
	if hint == "" {
		return fmt.Errorf("%w: GET %s: %v", errKubeletUnreachable, k.url, err)
	}
	return fmt.Errorf("%w: GET %s: %s (%v)", errKubeletUnreachable, k.url, hint, err)
}

func (k *kubeletClient) portKey() string {
	if k.s.secure {
		return "kubelet_secure_port"
	}
	return "kubelet_read_only_port"
}

// statusError turns a refusal into what to fix, quoting the kubelet (its
// 403 names the user and the resource it wanted).
func (k *kubeletClient) statusError(resp *http.Response) error {
	said := quoteBody(resp.Body)
	switch resp.StatusCode {
	case http.StatusUnauthorized:
		var hint string
		switch k.s.auth {
		case authAnonymous:
			hint = "the kubelet does not allow anonymous requests (--anonymous-auth=false): set token_path or certificate_path instead of use_anonymous_authentication"
		case authCertificate:
			hint = fmt.Sprintf("the client certificate %s is not accepted: it must be valid and signed by the kubelet's --client-ca-file", k.s.certPath)
		default:
			// Perhaps rotated since it was read: read it again next time.
			k.creds.tokenRefused()
			hint = fmt.Sprintf("the token in %s is not accepted: it may have expired (it is read again at the next poll), or the kubelet cannot review tokens (it needs --authentication-token-webhook and a reachable API server)", k.s.tokenPath)
		}
		return fmt.Errorf("%w: GET %s: %s (the kubelet said %q)", errKubeletUnauthorized, k.url, hint, said)
	case http.StatusForbidden:
		return fmt.Errorf("%w: GET %s: the kubelet said %q: grant the agent's identity get on nodes/proxy (a ClusterRole with resources [nodes/proxy] and verbs [get], bound to its service account)", errKubeletForbidden, k.url, said)
	}
	if !k.s.secure && strings.Contains(said, "HTTP request to an HTTPS server") {
		return fmt.Errorf("%w: GET %s: port %d serves TLS: use kubelet_secure_port for it (the kubelet said %q)", errKubeletStatus, k.url, k.s.port, said)
	}
	return fmt.Errorf("%w: GET %s: %s: %q", errKubeletStatus, k.url, resp.Status, said)
}

// quoteBody reads the start of an error answer, printable characters only:
// it goes into logs and errors.
func quoteBody(r io.Reader) string {
	b, _ := io.ReadAll(io.LimitReader(r, maxErrorBodySize))
	return printable(string(b), maxErrorBodySize)
}

// printable is s cut to limit bytes with every unprintable character a
// space, for logs and errors.
func printable(s string, limit int) string {
	if len(s) > limit {
		s = s[:limit]
	}
	s = strings.Map(func(r rune) rune {
		if unicode.IsPrint(r) {
			return r
		}
		return ' '
	}, s)
	return strings.TrimSpace(s)
}
