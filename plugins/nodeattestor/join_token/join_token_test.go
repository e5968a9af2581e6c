package jointoken

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/conf"
	"github.com/lanyard-dev/lanyard/internal/testkit/fakeagent"
)

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
	s := &fakeagent.AttestationRecorder{}
	if err := a.Attest(context.Background(), s); err != nil {
		t.Fatal(err)
	}
	if len(s.Data) != 1 || s.Data[0].Type != "join_token" || string(s.Data[0].Payload) != "abc-123" {
		t.Fatalf("sent %+v, want one join_token message carrying the token", s.Data)
	}
}

func TestRefusesAChallenge(t *testing.T) {
	a, err := build(t, "", "abc-123")
	if err != nil {
		t.Fatal(err)
	}
	err = a.Attest(context.Background(), &fakeagent.AttestationRecorder{Challenge: []byte("nonce")})
	if err == nil || !strings.Contains(err.Error(), "challenge") {
		t.Fatalf("err = %v, want a complaint about the challenge", err)
	}
}

func TestNoTokenSaysHowToGetOne(t *testing.T) {
	a, err := build(t, "", "")
	if err != nil {
		t.Fatal(err)
	}
	s := &fakeagent.AttestationRecorder{}
	err = a.Attest(context.Background(), s)
	if !errors.Is(err, ErrNoToken) || !strings.Contains(err.Error(), "-joinToken") {
		t.Fatalf("err = %v, want ErrNoToken naming -joinToken", err)
	}
	if len(s.Data) != 0 {
		t.Fatalf("sent %d messages without a token", len(s.Data))
	}
}

func TestRefusesPluginData(t *testing.T) {
	_, err := build(t, `token = "x"`, "")
	if err == nil || !strings.Contains(err.Error(), "token") {
		t.Fatalf("err = %v, want the unknown key refused by name", err)
	}
}
