// Package x509pop is the x509pop node attestor: the node proves possession
// of the private key of an X.509 certificate that the SPIRE Server's x509pop
// attestor trusts. The wire format (JSON attestation data, challenge and
// response) is SPIRE's.
package x509pop

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"os"

	"github.com/lanyard-dev/lanyard/agent"
)

// Name is the plugin name, in the config and on the wire.
const Name = "x509pop"

// nonceLen is the size of both nonces, as SPIRE's server expects.
const nonceLen = 32

func init() {
	agent.RegisterNodeAttestor(Name, New)
}

type pluginConfig struct {
	PrivateKeyPath    string `hcl:"private_key_path"`
	CertificatePath   string `hcl:"certificate_path"`
	IntermediatesPath string `hcl:"intermediates_path"`
}

type attestor struct {
	cfg pluginConfig
}

// New checks plugin_data and that the key pair loads.
func New(cfg agent.NodeAttestorConfig) (agent.NodeAttestor, error) {
	var pc pluginConfig
	if err := cfg.Data.Decode(&pc); err != nil {
		return nil, err
	}
	switch {
	case pc.PrivateKeyPath == "":
		return nil, cfg.Data.Errorf("", "private_key_path is required: the path of the PEM private key of the node's certificate")
	case pc.CertificatePath == "":
		return nil, cfg.Data.Errorf("", "certificate_path is required: the path of the node's PEM certificate")
	}
	a := &attestor{cfg: pc}
	if _, _, err := a.load(); err != nil {
		return nil, cfg.Data.Errorf("", "%v", err)
	}
	return a, nil
}

// load reads the key pair and intermediates; it runs on every attestation,
// so that a certificate renewed on disk is picked up.
func (a *attestor) load() (crypto.Signer, []byte, error) {
	pair, err := tls.LoadX509KeyPair(a.cfg.CertificatePath, a.cfg.PrivateKeyPath)
	if err != nil {
		return nil, nil, fmt.Errorf("loading the key pair from certificate_path %s and private_key_path %s: %w", a.cfg.CertificatePath, a.cfg.PrivateKeyPath, err)
	}
	leaf := pair.Leaf
	if leaf == nil {
		if leaf, err = x509.ParseCertificate(pair.Certificate[0]); err != nil {
			return nil, nil, fmt.Errorf("parsing %s: %w", a.cfg.CertificatePath, err)
		}
	}
	if leaf.KeyUsage&x509.KeyUsageDigitalSignature == 0 {
		return nil, nil, fmt.Errorf("the certificate in %s lacks the digitalSignature key usage, so the SPIRE Server will refuse it: issue one that has it", a.cfg.CertificatePath)
	}
	signer, ok := pair.PrivateKey.(crypto.Signer)
	if !ok {
		return nil, nil, fmt.Errorf("the key in %s cannot sign", a.cfg.PrivateKeyPath)
	}
	switch signer.(type) {
	case *ecdsa.PrivateKey, *rsa.PrivateKey:
	default:
		return nil, nil, fmt.Errorf("the key in %s is a %T; x509pop needs an RSA or ECDSA key", a.cfg.PrivateKeyPath, signer)
	}
	certs := pair.Certificate
	if a.cfg.IntermediatesPath != "" {
		more, err := loadCertificates(a.cfg.IntermediatesPath)
		if err != nil {
			return nil, nil, err
		}
		certs = append(certs, more...)
	}
	payload, err := json.Marshal(attestationData{Certificates: certs})
	if err != nil {
		return nil, nil, fmt.Errorf("encoding the attestation data: %w", err)
	}
	return signer, payload, nil
}

func loadCertificates(path string) ([][]byte, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading intermediates_path: %w", err)
	}
	var out [][]byte
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			continue
		}
		if _, err := x509.ParseCertificate(block.Bytes); err != nil {
			return nil, fmt.Errorf("parsing a certificate in intermediates_path %s: %w", path, err)
		}
		out = append(out, block.Bytes)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("intermediates_path %s holds no PEM certificate", path)
	}
	return out, nil
}

// The JSON shapes below are SPIRE's (pkg/common/plugin/x509pop).
type attestationData struct {
	Certificates [][]byte `json:"certificates"`
}

type nonceChallenge struct {
	Nonce []byte `json:"nonce"`
}

type challenge struct {
	RSASignature   *nonceChallenge `json:"rsa_signature"`
	ECDSASignature *nonceChallenge `json:"ecdsa_signature"`
}

type rsaResponse struct {
	Nonce     []byte `json:"nonce"`
	Signature []byte `json:"signature"`
}

type ecdsaResponse struct {
	Nonce []byte `json:"nonce"`
	R     []byte `json:"r"`
	S     []byte `json:"s"`
}

type response struct {
	RSASignature   *rsaResponse   `json:"rsa_signature,omitempty"`
	ECDSASignature *ecdsaResponse `json:"ecdsa_signature,omitempty"`
}

func (a *attestor) Attest(ctx context.Context, stream agent.AttestationStream) error {
	key, payload, err := a.load()
	if err != nil {
		return err
	}
	raw, err := stream.SendAttestationData(ctx, agent.AttestationData{Type: Name, Payload: payload})
	if err != nil {
		return err
	}
	if raw == nil {
		return errors.New("the SPIRE Server accepted x509pop attestation without a challenge, which its x509pop attestor never does: check the server's NodeAttestor config")
	}
	var ch challenge
	if err := json.Unmarshal(raw, &ch); err != nil {
		return fmt.Errorf("decoding the x509pop challenge from the SPIRE Server: %w", err)
	}
	resp, err := respond(key, &ch)
	if err != nil {
		return err
	}
	out, err := json.Marshal(resp)
	if err != nil {
		return fmt.Errorf("encoding the x509pop response: %w", err)
	}
	next, err := stream.SendChallengeResponse(ctx, out)
	if err != nil {
		return err
	}
	if next != nil {
		return errors.New("the SPIRE Server sent a second x509pop challenge; x509pop has one")
	}
	return nil
}

// respond signs SHA-256(challenge nonce || our nonce) with the node's key.
func respond(key crypto.Signer, ch *challenge) (*response, error) {
	nonce := make([]byte, nonceLen)
	if _, err := rand.Read(nonce); err != nil {
		return nil, err
	}
	switch key := key.(type) {
	case *rsa.PrivateKey:
		if ch.RSASignature == nil {
			return nil, errors.New("the SPIRE Server sent no RSA challenge for the node's RSA key")
		}
		digest, err := combine(ch.RSASignature.Nonce, nonce)
		if err != nil {
			return nil, err
		}
		sig, err := rsa.SignPSS(rand.Reader, key, crypto.SHA256, digest, nil)
		if err != nil {
			return nil, fmt.Errorf("signing the x509pop challenge: %w", err)
		}
		return &response{RSASignature: &rsaResponse{Nonce: nonce, Signature: sig}}, nil
	case *ecdsa.PrivateKey:
		if ch.ECDSASignature == nil {
			return nil, errors.New("the SPIRE Server sent no ECDSA challenge for the node's ECDSA key")
		}
		digest, err := combine(ch.ECDSASignature.Nonce, nonce)
		if err != nil {
			return nil, err
		}
		r, s, err := ecdsa.Sign(rand.Reader, key, digest)
		if err != nil {
			return nil, fmt.Errorf("signing the x509pop challenge: %w", err)
		}
		return &response{ECDSASignature: &ecdsaResponse{Nonce: nonce, R: r.Bytes(), S: s.Bytes()}}, nil
	default:
		return nil, fmt.Errorf("x509pop needs an RSA or ECDSA key, not %T", key)
	}
}

func combine(challengeNonce, ours []byte) ([]byte, error) {
	if len(challengeNonce) != nonceLen {
		return nil, fmt.Errorf("the SPIRE Server's challenge nonce is %d bytes, want %d", len(challengeNonce), nonceLen)
	}
	h := sha256.New()
	h.Write(challengeNonce)
	h.Write(ours)
	return h.Sum(nil), nil
}
