package k8spsat

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/conf"
	"github.com/lanyard-dev/lanyard/internal/testkit/fakeagent"
)

func build(t *testing.T, body string) (agent.NodeAttestor, error) {
	t.Helper()
	data, err := conf.NewSection("agent.conf", body)
	if err != nil {
		t.Fatal(err)
	}
	return New(agent.NodeAttestorConfig{Name: Name, Data: data, Log: hclog.NewNullLogger()})
}

func attest(t *testing.T, a agent.NodeAttestor) attestationData {
	t.Helper()
	s := &fakeagent.AttestationRecorder{}
	if err := a.Attest(context.Background(), s); err != nil {
		t.Fatal(err)
	}
	if len(s.Data) != 1 || s.Data[0].Type != "k8s_psat" {
		t.Fatalf("sent %+v, want one k8s_psat message", s.Data)
	}
	var got attestationData
	if err := json.Unmarshal(s.Data[0].Payload, &got); err != nil {
		t.Fatalf("payload %q: %v", s.Data[0].Payload, err)
	}
	return got
}

// TestSendsTheCurrentToken: the payload is SPIRE's {"cluster","token"}, and
// each attestation reads the token again, as the kubelet rotates it through
// a symlink swap.
func TestSendsTheCurrentToken(t *testing.T) {
	dir := t.TempDir()
	for _, d := range []string{"v1", "v2"} {
		if err := os.Mkdir(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, d, "token"), []byte("header.claims-"+d+".sig\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	link := filepath.Join(dir, "token")
	if err := os.Symlink("v1/token", link); err != nil {
		t.Fatal(err)
	}
	a, err := build(t, `cluster = "prod"`+"\n"+`token_path = "`+link+`"`)
	if err != nil {
		t.Fatal(err)
	}
	if got := attest(t, a); got != (attestationData{Cluster: "prod", Token: "header.claims-v1.sig"}) {
		t.Fatalf("payload %+v", got)
	}
	if err := os.Remove(link); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("v2/token", link); err != nil {
		t.Fatal(err)
	}
	if got := attest(t, a); got.Token != "header.claims-v2.sig" {
		t.Fatalf("after rotation sent %q, want the new token", got.Token)
	}
}

func TestConfig(t *testing.T) {
	a, err := build(t, `cluster = "prod"`)
	if err != nil {
		t.Fatal(err)
	}
	if got := a.(*attestor).tokenPath; got != DefaultTokenPath {
		t.Errorf("token_path defaults to %q, want SPIRE's %q", got, DefaultTokenPath)
	}
	for body, want := range map[string]string{
		``:                                  "agent.conf:1:1: cluster is required",
		`token_path = "/t"`:                 "cluster is required",
		"cluster = \"c\"\naudience = \"x\"": "agent.conf:2:1: audience: unknown key",
	} {
		if _, err := build(t, body); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: err = %v, want it to contain %q", body, err, want)
		}
	}
}

func TestTokenErrorsSayWhatToDo(t *testing.T) {
	dir := t.TempDir()
	empty := filepath.Join(dir, "empty")
	huge := filepath.Join(dir, "huge")
	if err := os.WriteFile(empty, []byte("\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(huge, make([]byte, maxTokenSize+1), 0o600); err != nil {
		t.Fatal(err)
	}
	for path, want := range map[string]string{
		filepath.Join(dir, "missing"): "serviceAccountToken volume with audience spire-server",
		empty:                         "is empty",
		huge:                          "larger than 64 KiB",
	} {
		a, err := build(t, `cluster = "c"`+"\n"+`token_path = "`+path+`"`)
		if err != nil {
			t.Fatal(err)
		}
		s := &fakeagent.AttestationRecorder{}
		if err := a.Attest(context.Background(), s); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: err = %v, want it to contain %q", filepath.Base(path), err, want)
		}
		if len(s.Data) != 0 {
			t.Errorf("%s: sent %d messages without a token", filepath.Base(path), len(s.Data))
		}
	}
}

func TestRefusesAChallenge(t *testing.T) {
	token := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(token, []byte("a.b.c"), 0o600); err != nil {
		t.Fatal(err)
	}
	a, err := build(t, `cluster = "c"`+"\n"+`token_path = "`+token+`"`)
	if err != nil {
		t.Fatal(err)
	}
	err = a.Attest(context.Background(), &fakeagent.AttestationRecorder{Challenge: []byte("nonce")})
	if err == nil || !strings.Contains(err.Error(), "challenge") {
		t.Fatalf("err = %v, want a complaint about the challenge", err)
	}
}
