// Package k8spsat is the k8s_psat node attestor: the node proves itself
// with the projected service account token of the agent's pod, which the
// SPIRE Server's k8s_psat attestor reviews with the cluster's API server.
// The node's SPIFFE ID is spiffe://<td>/spire/agent/k8s_psat/<cluster>/<node
// UID>. The server marks such agents re-attestable, so an agent whose SVID
// can no longer be renewed attests again with a fresh token.
package k8spsat

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/lanyard-dev/lanyard/agent"
)

// Name is the plugin name, in the config and on the wire.
const Name = "k8s_psat"

// DefaultTokenPath is where SPIRE's manifests project the token, with
// audience spire-server.
const DefaultTokenPath = "/var/run/secrets/tokens/spire-agent"

// maxTokenSize bounds the read of the token file: a service account token is
// a JWT of one or two KiB.
const maxTokenSize = 64 << 10

func init() {
	agent.RegisterNodeAttestor(Name, New)
}

type pluginConfig struct {
	Cluster   string `hcl:"cluster"`
	TokenPath string `hcl:"token_path"`
}

// attestationData is the payload SPIRE's server plugin decodes.
type attestationData struct {
	Cluster string `json:"cluster"`
	Token   string `json:"token"`
}

type attestor struct {
	cluster   string
	tokenPath string
}

// New checks plugin_data; the token is read at each attestation, since the
// kubelet rotates it.
func New(cfg agent.NodeAttestorConfig) (agent.NodeAttestor, error) {
	var pc pluginConfig
	if err := cfg.Data.Decode(&pc); err != nil {
		return nil, err
	}
	if pc.Cluster == "" {
		return nil, cfg.Data.Errorf("", "cluster is required: the name of this cluster as the SPIRE Server's k8s_psat attestor lists it in its clusters block")
	}
	if pc.TokenPath == "" {
		pc.TokenPath = DefaultTokenPath
	}
	return &attestor{cluster: pc.Cluster, tokenPath: pc.TokenPath}, nil
}

func (a *attestor) Attest(ctx context.Context, stream agent.AttestationStream) error {
	token, err := readToken(a.tokenPath)
	if err != nil {
		return err
	}
	payload, err := json.Marshal(attestationData{Cluster: a.cluster, Token: token})
	if err != nil {
		return fmt.Errorf("k8s_psat: encoding the attestation data: %w", err)
	}
	challenge, err := stream.SendAttestationData(ctx, agent.AttestationData{Type: Name, Payload: payload})
	if err != nil {
		return err
	}
	if challenge != nil {
		return errors.New("the SPIRE Server sent a challenge to k8s_psat attestation, which has none: is the server's k8s_psat attestor replaced by another plugin?")
	}
	return nil
}

// readToken reads the projected token. The kubelet writes it through a
// symlink it swaps on rotation (..data), so the link is followed.
func readToken(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("k8s_psat: reading the service account token: %w; project one into the agent's pod at token_path (a serviceAccountToken volume with audience spire-server)", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxTokenSize+1))
	if err != nil {
		return "", fmt.Errorf("k8s_psat: reading the service account token %s: %w", path, err)
	}
	if len(data) > maxTokenSize {
		return "", fmt.Errorf("k8s_psat: %s is larger than %d KiB: it is not a service account token", path, maxTokenSize>>10)
	}
	// A JWT has no white space; a hand-written file may end in a newline.
	token := string(bytes.TrimSpace(data))
	if token == "" {
		return "", fmt.Errorf("k8s_psat: %s is empty: the kubelet has not written the projected token yet", path)
	}
	return token, nil
}
