package local

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/lanyard-dev/lanyard/agent"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// selfSVID is the agent's own X509-SVID under the local CA: the broker
// endpoint presents it, as spire-agent presents its agent SVID there. It
// is signed on first use and again at half-life or once its CA no longer
// signs, so that it always ends at a root of the published bundle.
type selfSVID struct {
	mu      sync.Mutex
	svid    *x509svid.SVID
	ca      *authority
	renewAt time.Time
}

// SelfPathPrefix is the path of the agent's own SPIFFE ID under the local
// CA, before the host name: the shape of spire-agent's agent IDs
// (/spire/agent/<attestor>/<node>), with "local" as the attestor.
const SelfPathPrefix = "/spire/agent/local/"

// selfID is the agent's SPIFFE ID: the node's host name under
// SelfPathPrefix, with what a path segment may not hold replaced.
func selfID(td spiffeid.TrustDomain) (spiffeid.ID, error) {
	host, _ := os.Hostname()
	host = strings.Map(func(r rune) rune {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '-', r == '_', r == '.':
			return r
		}
		return '-'
	}, host)
	if host == "" || strings.Trim(host, ".") == "" {
		host = "localhost"
	}
	return spiffeid.FromPath(td, SelfPathPrefix+host)
}

// GetX509SVID returns the agent's own X509-SVID, signing a new one when
// the last is past half its life or its CA no longer signs.
func (l *Local) GetX509SVID() (*x509svid.SVID, error) {
	ca, s, err := l.activeCA()
	if err != nil {
		return nil, err
	}
	l.self.mu.Lock()
	defer l.self.mu.Unlock()
	now := l.now()
	if l.self.svid != nil && l.self.ca == ca && now.Before(l.self.renewAt) {
		return l.self.svid, nil
	}
	id, err := selfID(l.td)
	if err != nil {
		return nil, fmt.Errorf("the agent's own SPIFFE ID: %w", err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	chain, err := signX509SVID(ca, agent.X509Request{Entry: &agent.Entry{SPIFFEID: id}, Key: key}, s.x509TTL, now)
	if err != nil {
		return nil, err
	}
	leaf := chain[0]
	l.self.svid = &x509svid.SVID{ID: id, Certificates: chain, PrivateKey: key}
	l.self.ca = ca
	l.self.renewAt = now.Add(leaf.NotAfter.Sub(now) / 2)
	return l.self.svid, nil
}

// LastSync is when the CA and the entries were last published with
// success.
func (l *Local) LastSync() time.Time {
	if ns := l.lastSync.Load(); ns != 0 {
		return time.Unix(0, ns)
	}
	return time.Time{}
}
