package conf

import (
	"strings"
	"testing"
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
