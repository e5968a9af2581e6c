package local

import (
	"context"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"net/url"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/lanyard-dev/lanyard/agent"
)

// activeCA returns the signing authority, checking first that the state on
// disk has not changed or gone, and that the authority is published and
// saved (a reloaded state is published here, before it signs).
func (l *Local) activeCA() (*authority, *settings, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if err := l.openLocked(); err != nil {
		return nil, nil, fmt.Errorf("the local CA is unavailable: %w", err)
	}
	reloaded, err := l.ensureCALocked()
	if err != nil {
		return nil, nil, fmt.Errorf("the local CA is unavailable: %w", err)
	}
	if reloaded {
		// Wake Run to reschedule for the reloaded authorities.
		select {
		case l.changed <- struct{}{}:
		default:
		}
	}
	a, err := l.signerLocked()
	if err != nil {
		return nil, nil, fmt.Errorf("the local CA cannot sign: %w", err)
	}
	return a, l.settings, nil
}

// MintX509SVIDs signs X509-SVIDs with the active CA.
func (l *Local) MintX509SVIDs(_ context.Context, reqs []agent.X509Request) ([]agent.X509Result, error) {
	ca, s, err := l.activeCA()
	if err != nil {
		return nil, err
	}
	defaultTTL := s.x509TTL
	out := make([]agent.X509Result, len(reqs))
	now := l.now()
	for i, req := range reqs {
		out[i].Chain, out[i].Err = signX509SVID(ca, req, defaultTTL, now)
	}
	return out, nil
}

func signX509SVID(ca *authority, req agent.X509Request, defaultTTL time.Duration, now time.Time) ([]*x509.Certificate, error) {
	ttl := req.Entry.X509SVIDTTL
	if ttl == 0 {
		ttl = defaultTTL
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, err
	}
	id, err := url.Parse(req.Entry.SPIFFEID.String())
	if err != nil {
		return nil, err
	}
	subject := pkix.Name{Organization: []string{"Lanyard"}}
	if len(req.Entry.DNSNames) > 0 {
		subject.CommonName = req.Entry.DNSNames[0]
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               subject,
		URIs:                  []*url.URL{id},
		DNSNames:              req.Entry.DNSNames,
		NotBefore:             now.Add(-backdate),
		NotAfter:              minTime(now.Add(ttl), ca.cert.NotAfter),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, req.Key.Public(), ca.key)
	if err != nil {
		return nil, fmt.Errorf("signing the X509-SVID for %s: %w", req.Entry.SPIFFEID, err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return append([]*x509.Certificate{leaf}, ca.chain...), nil
}

// MintJWTSVID signs a JWT-SVID with the active JWT key.
func (l *Local) MintJWTSVID(_ context.Context, entry *agent.Entry, audience []string) (*agent.JWTSVID, error) {
	ca, s, err := l.activeCA()
	if err != nil {
		return nil, err
	}
	ttl := s.jwtTTL
	if entry.JWTSVIDTTL != 0 {
		ttl = entry.JWTSVIDTTL
	}
	now := l.now()
	exp := minTime(now.Add(ttl), ca.notAfter)
	signer, err := jose.NewSigner(
		jose.SigningKey{Algorithm: jose.ES256, Key: jose.JSONWebKey{Key: ca.jwtKey, KeyID: ca.jwtKID}},
		(&jose.SignerOptions{}).WithType("JWT"))
	if err != nil {
		return nil, fmt.Errorf("preparing the JWT signer: %w", err)
	}
	claims := jwt.Claims{
		Subject:  entry.SPIFFEID.String(),
		Audience: jwt.Audience(audience),
		Expiry:   jwt.NewNumericDate(exp),
		IssuedAt: jwt.NewNumericDate(now),
	}
	token, err := jwt.Signed(signer).Claims(claims).Serialize()
	if err != nil {
		return nil, fmt.Errorf("signing the JWT-SVID for %s: %w", entry.SPIFFEID, err)
	}
	return &agent.JWTSVID{
		Token:     token,
		ID:        entry.SPIFFEID,
		Audience:  audience,
		IssuedAt:  now.Truncate(time.Second),
		ExpiresAt: exp.Truncate(time.Second),
	}, nil
}

func minTime(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}
