package jointoken

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/conf"
)

// recordingStream plays the server: it records what the attestor sends and
// answers with a scripted challenge.
type recordingStream struct {
	data      []agent.AttestationData
	challenge []byte
}

func (r *recordingStream) SendAttestationData(_ context.Context, d agent.AttestationData) ([]byte, error) {
	r.data = append(r.data, d)
	return r.challenge, nil
}

func (r *recordingStream) SendChallengeResponse(context.Context, []byte) ([]byte, error) {
	return nil, errors.New("join_token must not answer challenges")
}

func build(t *testing.T, body, token string) (agent.NodeAttestor, error) {
	t.Helper()
	data, err := conf.NewSection("agent.conf", body)
	if err != nil {
		t.Fatal(err)
	}
	return New(agent.NodeAttestorConfig{Name: Name, Data: data, Log: hclog.NewNullLogger(), JoinToken: token})
}

func TestSendsTheToken(t *testing.T) {
	a, err := build(t, "", "abc-123")
	if err != nil {
		t.Fatal(err)
	}
	s := &recordingStream{}
	if err := a.Attest(context.Background(), s); err != nil {
		t.Fatal(err)
	}
	if len(s.data) != 1 || s.data[0].Type != "join_token" || string(s.data[0].Payload) != "abc-123" {
		t.Fatalf("sent %+v, want one join_token message carrying the token", s.data)
	}
}

func TestRefusesAChallenge(t *testing.T) {
	a, err := build(t, "", "abc-123")
	if err != nil {
		t.Fatal(err)
	}
	err = a.Attest(context.Background(), &recordingStream{challenge: []byte("nonce")})
	if err == nil || !strings.Contains(err.Error(), "challenge") {
		t.Fatalf("err = %v, want a complaint about the challenge", err)
	}
}

func TestNoTokenSaysHowToGetOne(t *testing.T) {
	a, err := build(t, "", "")
	if err != nil {
		t.Fatal(err)
	}
	s := &recordingStream{}
	err = a.Attest(context.Background(), s)
	if !errors.Is(err, ErrNoToken) || !strings.Contains(err.Error(), "-joinToken") {
		t.Fatalf("err = %v, want ErrNoToken naming -joinToken", err)
	}
	if len(s.data) != 0 {
		t.Fatalf("sent %d messages without a token", len(s.data))
	}
}

func TestRefusesPluginData(t *testing.T) {
	_, err := build(t, `token = "x"`, "")
	if err == nil || !strings.Contains(err.Error(), "token") {
		t.Fatalf("err = %v, want the unknown key refused by name", err)
	}
}
