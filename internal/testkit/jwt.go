package testkit

import (
	"crypto"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
)

// SignJWT signs an ES256 JWT-SVID with key, naming kid in its header.
func SignJWT(key crypto.Signer, kid, subject string, audience []string, issuedAt, expiry time.Time) (string, error) {
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: jose.JSONWebKey{Key: key, KeyID: kid}},
		(&jose.SignerOptions{}).WithType("JWT"))
	if err != nil {
		return "", err
	}
	return jwt.Signed(signer).Claims(jwt.Claims{Subject: subject, Audience: audience,
		IssuedAt: jwt.NewNumericDate(issuedAt), Expiry: jwt.NewNumericDate(expiry)}).Serialize()
}

// SignJWTSVID signs a JWT-SVID as an upstream does: issued at now (whole
// seconds, the resolution of JWT times) for ttl, five minutes when zero.
// It returns the token and its issue and expiry times.
func SignJWTSVID(key crypto.Signer, kid, subject string, audience []string, now time.Time, ttl time.Duration) (token string, issuedAt, expiry time.Time, err error) {
	if ttl == 0 {
		ttl = 5 * time.Minute
	}
	issuedAt = now.Truncate(time.Second)
	expiry = issuedAt.Add(ttl)
	token, err = SignJWT(key, kid, subject, audience, issuedAt, expiry)
	return token, issuedAt, expiry, err
}
