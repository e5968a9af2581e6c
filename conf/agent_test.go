package conf

import (
	"strings"
	"testing"
	"time"
)

func TestSDSBlockAndAgentErrorf(t *testing.T) {
	cfg, err := Parse("a.conf", []byte(`agent {
  trust_domain      = "example.org"
  trust_bundle_path = "/nope.pem"
  server_address    = "spire-server"
  sds {
    default_svid_name              = "svid"
    default_bundle_name            = "roots"
    default_all_bundles_name       = "everything"
    disable_spiffe_cert_validation = true
  }
}`))
	if err != nil {
		t.Fatal(err)
	}
	want := SDS{DefaultSVIDName: "svid", DefaultBundleName: "roots", DefaultAllBundlesName: "everything", DisableSPIFFECertValidation: true}
	if cfg.Agent.SDS != want {
		t.Fatalf("SDS = %+v, want %+v", cfg.Agent.SDS, want)
	}
	got := cfg.Agent.Errorf("trust_bundle_path", "cannot read it").Error()
	if !strings.HasPrefix(got, "a.conf:3:3: agent.trust_bundle_path: cannot read it") {
		t.Fatalf("Agent.Errorf = %q", got)
	}
}

func TestWorkloadAttestorTimeout(t *testing.T) {
	cfg, err := Parse("a.conf", []byte(`agent { trust_domain = "example.org" }`))
	if err != nil {
		t.Fatal(err)
	}
	if got := cfg.Agent.WorkloadAttestorTimeout; got != DefaultWorkloadAttestorTimeout {
		t.Errorf("default = %v, want %v", got, DefaultWorkloadAttestorTimeout)
	}
	cfg, err = Parse("a.conf", []byte("agent {\n  trust_domain = \"example.org\"\n  workload_attestor_timeout = \"1m\"\n}"))
	if err != nil {
		t.Fatal(err)
	}
	if got := cfg.Agent.WorkloadAttestorTimeout; got != time.Minute {
		t.Errorf("set to 1m: %v", got)
	}

	tests := []struct{ value, want string }{
		{`"0s"`, `a.conf:3:3: agent.workload_attestor_timeout: bad duration "0s": it must be more than zero, like "1h" or "90s"`},
		{`"-1s"`, `a.conf:3:3: agent.workload_attestor_timeout: bad duration "-1s": it must be more than zero, like "1h" or "90s"`},
		{`"5"`, `a.conf:3:3: agent.workload_attestor_timeout: bad duration "5": write it like "1h" or "90s"`},
		{`"61s"`, `a.conf:3:3: agent.workload_attestor_timeout: workload_attestor_timeout "61s" is too long: a fetch would wait that long on a stuck attestor; use at most "1m0s"`},
		{`5`, `a.conf:3:3: agent.workload_attestor_timeout: bad duration "5": write it like "1h" or "90s"`},
		{`true`, `a.conf:3:31: agent.workload_attestor_timeout: want a string, got true: put it in quotes`},
	}
	for _, tt := range tests {
		_, err := Parse("a.conf", []byte("agent {\n  trust_domain = \"example.org\"\n  workload_attestor_timeout = "+tt.value+"\n}"))
		if err == nil || err.Error() != tt.want {
			t.Errorf("workload_attestor_timeout = %s:\n got %v\nwant %s", tt.value, err, tt.want)
		}
	}
}
