package spire

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/attestor"
	"github.com/lanyard-dev/lanyard/conf"
	_ "github.com/lanyard-dev/lanyard/plugins/nodeattestor/join_token"
	_ "github.com/lanyard-dev/lanyard/plugins/nodeattestor/x509pop"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/spire-api-sdk/proto/spire/api/types"
	"google.golang.org/protobuf/proto"
)

var td = spiffeid.RequireTrustDomainFromString("example.org")

// newCA returns a self-signed CA certificate and its key.
func newCA(t *testing.T) (*x509.Certificate, *ecdsa.PrivateKey) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "ca"},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
		URIs: []*url.URL{td.ID().URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return c, key
}

// newSVID signs an agent SVID for key.
func newSVID(t *testing.T, ca *x509.Certificate, caKey *ecdsa.PrivateKey, key *ecdsa.PrivateKey, ttl time.Duration) *x509.Certificate {
	t.Helper()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		NotBefore:    time.Now().Add(-10 * time.Second), NotAfter: time.Now().Add(ttl),
		KeyUsage: x509.KeyUsageDigitalSignature,
		URIs:     []*url.URL{spiffeid.RequireFromPath(td, "/spire/agent/join_token/secret-token").URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, key.Public(), caKey)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return c
}

func writeBundle(t *testing.T, dir string, certs ...*x509.Certificate) string {
	t.Helper()
	var out []byte
	for _, c := range certs {
		out = append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	path := filepath.Join(dir, "bundle.pem")
	if err := os.WriteFile(path, out, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// build parses an agent.conf and builds the upstream from it, as the agent does.
func build(t *testing.T, body string) (*Spire, error) {
	t.Helper()
	cfg, err := conf.Parse("agent.conf", []byte(body))
	if err != nil {
		t.Fatalf("the config does not parse: %v", err)
	}
	up, err := agent.BuildUpstream(cfg, hclog.NewNullLogger())
	if err != nil {
		return nil, err
	}
	return up.(*Spire), nil
}

// spireConf is an agent.conf as SPIRE's docs write it.
const spireConf = `
agent {
    data_dir = "%[1]s/data"
    log_level = "DEBUG"
    server_address = "spire-server.example"
    server_port = "8081"
    socket_path = "%[1]s/api.sock"
    trust_bundle_path = "%[2]s"
    trust_domain = "example.org"
    join_token = "abc"
}

plugins {
    NodeAttestor "join_token" {
        plugin_data {}
    }
    KeyManager "disk" {
        plugin_data {
            directory = "%[1]s/keys"
        }
    }
    WorkloadAttestor "unix" {
        plugin_data {}
    }
}
`

func TestSPIREAgentConfigLoads(t *testing.T) {
	dir := t.TempDir()
	ca, _ := newCA(t)
	s, err := build(t, fmt.Sprintf(spireConf, dir, writeBundle(t, dir, ca)))
	if err != nil {
		t.Fatal(err)
	}
	if s.client.addr != "spire-server.example:8081" || s.identity.attestorName != "join_token" || s.syncer.interval != 5*time.Second {
		t.Fatalf("addr %q attestor %q sync %s", s.client.addr, s.identity.attestorName, s.syncer.interval)
	}
	if s.identity.store.keyDir != filepath.Join(dir, "keys") || s.identity.store.statePath != filepath.Join(dir, "data", stateFileName) {
		t.Fatalf("key dir %q, state %q", s.identity.store.keyDir, s.identity.store.statePath)
	}
	if len(s.identity.bootstrap) != 1 || !s.identity.bootstrap[0].Equal(ca) {
		t.Fatal("the bootstrap bundle was not loaded")
	}
	if s.client.serverID.String() != "spiffe://example.org/spire/server" || s.syncer.serverID != s.client.serverID {
		t.Fatalf("server ID %s", s.client.serverID)
	}
}

func TestConfigErrors(t *testing.T) {
	dir := t.TempDir()
	ca, _ := newCA(t)
	bundle := writeBundle(t, dir, ca)
	notPEM := filepath.Join(dir, "notpem")
	if err := os.WriteFile(notPEM, []byte("hello"), 0o600); err != nil {
		t.Fatal(err)
	}
	base := func(agentExtra, plugins string) string {
		return fmt.Sprintf(`agent {
  trust_domain = "example.org"
  data_dir = %q
  server_address = "127.0.0.1"
%s
}
plugins {
  WorkloadAttestor "unix" { plugin_data {} }
%s
}`, dir, agentExtra, plugins)
	}
	withBundle := fmt.Sprintf("trust_bundle_path = %q", bundle)
	joinToken := `NodeAttestor "join_token" { plugin_data {} }`
	for _, tc := range []struct {
		name, config, want string
	}{
		{"no bundle", base("", joinToken), "trust_bundle_path is not set"},
		{"missing bundle", base(fmt.Sprintf("trust_bundle_path = %q", filepath.Join(dir, "nope.pem")), joinToken), "nope.pem"},
		{"not PEM", base(fmt.Sprintf("trust_bundle_path = %q", notPEM), joinToken), "holds no PEM certificate"},
		{"not SPIFFE", base(fmt.Sprintf("trust_bundle_path = %q\ntrust_bundle_format = \"spiffe\"", bundle), joinToken), "is not a SPIFFE bundle"},
		{"no node attestor", base(withBundle, ""), "no NodeAttestor is configured"},
		{"unknown node attestor", base(withBundle, `NodeAttestor "aws_iid" { plugin_data {} }`), `NodeAttestor "aws_iid" is not supported by Lanyard`},
		{"two node attestors", base(withBundle, joinToken+"\n"+`NodeAttestor "x509pop" { plugin_data {} }`), "a second NodeAttestor"},
		{"unknown key manager", base(withBundle, joinToken+"\n"+`KeyManager "tpm" { plugin_data {} }`), `KeyManager "tpm" is not supported by Lanyard`},
		{"unknown disk key", base(withBundle, joinToken+"\n"+`KeyManager "disk" { plugin_data { keys_path = "/x" } }`), "keys_path"},
		{"memory takes no keys", base(withBundle, joinToken+"\n"+`KeyManager "memory" { plugin_data { directory = "/x" } }`), "directory"},
		{"disk directory is a file", base(withBundle, joinToken+"\n"+fmt.Sprintf(`KeyManager "disk" { plugin_data { directory = %q } }`, bundle)), "is not a directory"},
		{"join_token takes no keys", base(withBundle, `NodeAttestor "join_token" { plugin_data { token = "x" } }`), "token"},
		{"x509pop checks its files", base(withBundle, `NodeAttestor "x509pop" { plugin_data { private_key_path = "/nope.key" certificate_path = "/nope.pem" } }`), "nope"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := build(t, tc.config)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want it to contain %q", err, tc.want)
			}
		})
	}
}

func TestUpstreamAuthorityDataIsRefused(t *testing.T) {
	data, err := conf.NewSection("agent.conf", `server_address = "x"`)
	if err != nil {
		t.Fatal(err)
	}
	server := &agent.ServerConfig{Address: "x:8081", InsecureBootstrap: true, SyncInterval: time.Second, NodeAttestorName: "join_token"}
	_, err = New(agent.UpstreamConfig{Name: Name, Data: data, Server: server, Log: hclog.NewNullLogger(), TrustDomain: td, DataDir: t.TempDir()})
	if err == nil || !strings.Contains(err.Error(), "server_address") {
		t.Fatalf("err = %v, want plugin_data's key refused", err)
	}
}

func TestSPIFFEBundleAndInsecureBootstrap(t *testing.T) {
	dir := t.TempDir()
	ca, _ := newCA(t)
	doc, err := spiffebundle.FromX509Authorities(td, []*x509.Certificate{ca}).Marshal()
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "bundle.json")
	if err := os.WriteFile(path, doc, 0o600); err != nil {
		t.Fatal(err)
	}
	s, err := build(t, fmt.Sprintf(`agent {
  trust_domain = "example.org"
  data_dir = %q
  server_address = "127.0.0.1"
  trust_bundle_path = %q
  trust_bundle_format = "spiffe"
}
plugins {
  NodeAttestor "join_token" { plugin_data {} }
  KeyManager "memory" { plugin_data {} }
  WorkloadAttestor "unix" { plugin_data {} }
}`, dir, path))
	if err != nil {
		t.Fatal(err)
	}
	if len(s.identity.bootstrap) != 1 || !s.identity.bootstrap[0].Equal(ca) || s.identity.store.persistsKeys() {
		t.Fatal("want the SPIFFE bundle loaded and keys kept in memory")
	}
	s, err = build(t, fmt.Sprintf(`agent {
  trust_domain = "example.org"
  data_dir = %q
  server_address = "127.0.0.1"
  server_port = 9000
  insecure_bootstrap = true
  join_token = "t"
}
plugins {
  NodeAttestor "x509pop" { plugin_data { private_key_path = "/nope" certificate_path = "/nope" } }
  WorkloadAttestor "unix" { plugin_data {} }
}`, dir))
	if err != nil {
		t.Fatal(err)
	}
	// A join token wins over the configured attestor, as in spire-agent;
	// with no KeyManager block the key is kept in data_dir.
	if s.identity.attestorName != "join_token" || !s.client.insecureBootstrap || s.client.addr != "127.0.0.1:9000" || s.identity.store.keyDir != dir {
		t.Fatalf("attestor %q insecure %v addr %q keydir %q", s.identity.attestorName, s.client.insecureBootstrap, s.client.addr, s.identity.store.keyDir)
	}
}

func TestStoreRoundTrip(t *testing.T) {
	dir := t.TempDir()
	ca, caKey := newCA(t)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	creds := &credentials{svid: []*x509.Certificate{newSVID(t, ca, caKey, key, time.Hour)}, key: key, reattestable: true}
	st := &store{statePath: filepath.Join(dir, stateFileName), keyDir: filepath.Join(dir, "keys"), td: td}
	if err := st.save(nil, creds, []*x509.Certificate{ca}); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{st.statePath, st.keysPath()} {
		info, err := os.Stat(f)
		if err != nil {
			t.Fatal(err)
		}
		if info.Mode().Perm() != 0o600 {
			t.Fatalf("%s has mode %v, want 0600", f, info.Mode().Perm())
		}
	}
	got, bundle, why, err := st.load()
	if err != nil || got == nil {
		t.Fatalf("load: %v (%s)", err, why)
	}
	if !got.svid[0].Equal(creds.svid[0]) || !got.key.Public().(*ecdsa.PublicKey).Equal(key.Public()) || !got.reattestable {
		t.Fatal("loaded other credentials than stored")
	}
	if len(bundle) != 1 || !bundle[0].Equal(ca) {
		t.Fatal("the bundle was not kept")
	}
	// Another trust domain's state is not used.
	other := &store{statePath: st.statePath, keyDir: st.keyDir, td: spiffeid.RequireTrustDomainFromString("other.org")}
	if c, _, why, err := other.load(); err != nil || c != nil || !strings.Contains(why, "example.org") {
		t.Fatalf("loaded state of another trust domain: %v %v %q", c, err, why)
	}
}

// A crash between the writes of a renewal leaves a key for whichever SVID
// the state file holds.
func TestStoreRenewalIsCrashSafe(t *testing.T) {
	dir := t.TempDir()
	ca, caKey := newCA(t)
	oldKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	newKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	prev := &credentials{svid: []*x509.Certificate{newSVID(t, ca, caKey, oldKey, time.Hour)}, key: oldKey}
	next := &credentials{svid: []*x509.Certificate{newSVID(t, ca, caKey, newKey, time.Hour)}, key: newKey}
	st := &store{statePath: filepath.Join(dir, stateFileName), keyDir: dir, td: td}
	if err := st.save(nil, prev, nil); err != nil {
		t.Fatal(err)
	}
	// The first write of a renewal: both keys, the old SVID.
	if err := st.writeKeys([]crypto.Signer{newKey, oldKey}); err != nil {
		t.Fatal(err)
	}
	got, _, _, err := st.load()
	if err != nil || got == nil || !got.svid[0].Equal(prev.svid[0]) {
		t.Fatalf("after the key write: %v, %v", got, err)
	}
	if err := st.save(prev, next, nil); err != nil {
		t.Fatal(err)
	}
	got, _, _, err = st.load()
	if err != nil || got == nil || !got.svid[0].Equal(next.svid[0]) {
		t.Fatalf("after the renewal: %v, %v", got, err)
	}
	var kf keysFile
	data, _ := os.ReadFile(st.keysPath())
	if err := json.Unmarshal(data, &kf); err != nil || len(kf.Keys) != 1 {
		t.Fatalf("the old key was kept: %d keys, %v", len(kf.Keys), err)
	}
}

func TestStoreEdgeCases(t *testing.T) {
	dir := t.TempDir()
	ca, caKey := newCA(t)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	creds := &credentials{svid: []*x509.Certificate{newSVID(t, ca, caKey, key, time.Hour)}, key: key}

	mem := &store{statePath: filepath.Join(dir, "mem.json"), td: td}
	if err := mem.save(nil, creds, []*x509.Certificate{ca}); err != nil {
		t.Fatal(err)
	}
	data, _ := os.ReadFile(mem.statePath)
	if strings.Contains(string(data), `"svid"`) {
		t.Fatal("the memory key manager stored the SVID, whose key is gone after a restart")
	}
	if c, b, why, err := mem.load(); err != nil || c != nil || len(b) != 1 || why == "" {
		t.Fatalf("memory: creds %v bundle %d why %q err %v", c, len(b), why, err)
	}

	disk := &store{statePath: filepath.Join(dir, "disk.json"), keyDir: filepath.Join(dir, "k"), td: td}
	if err := disk.save(nil, creds, nil); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(disk.keysPath()); err != nil {
		t.Fatal(err)
	}
	if c, _, why, err := disk.load(); err != nil || c != nil || !strings.Contains(why, "key") {
		t.Fatalf("without its key: creds %v why %q err %v", c, why, err)
	}
	if err := os.WriteFile(disk.statePath, []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, _, _, err := disk.load(); err == nil || !strings.Contains(err.Error(), "remove it") {
		t.Fatalf("corrupt state: err = %v, want advice", err)
	}
	if err := disk.forget(nil); err != nil {
		t.Fatal(err)
	}
	if c, _, _, err := disk.load(); err != nil || c != nil {
		t.Fatalf("after forget: %v %v", c, err)
	}
}

func TestEntryConversion(t *testing.T) {
	s := newSyncer(hclog.NewNullLogger(), td, spiffeid.RequireFromPath(td, "/spire/server"), time.Second, nil, nil)
	sid := func(path string) *types.SPIFFEID { return &types.SPIFFEID{TrustDomain: "example.org", Path: path} }
	full := &types.Entry{
		Id: "e1", SpiffeId: sid("/web"), ParentId: sid("/node"),
		Selectors:   []*types.Selector{{Type: "unix", Value: "uid:1000"}, {Type: "k8s", Value: "ns:default"}, {Type: "unix", Value: "uid:1000"}},
		X509SvidTtl: 600, JwtSvidTtl: 60, Hint: "db", DnsNames: []string{"web.example.org"},
		FederatesWith: []string{"spiffe://b.org", "a.org", "b.org"}, RevisionNumber: 3, CreatedAt: 1700000000,
	}
	se := s.convertEntry(full)
	e := se.entry
	if e == nil {
		t.Fatal("the entry was not converted")
	}
	want := []attestor.Selector{{Type: "k8s", Value: "ns:default"}, {Type: "unix", Value: "uid:1000"}}
	if fmt.Sprint(e.Selectors) != fmt.Sprint(want) {
		t.Fatalf("selectors %v, want %v", e.Selectors, want)
	}
	if e.SPIFFEID.String() != "spiffe://example.org/web" || e.X509SVIDTTL != 10*time.Minute || e.JWTSVIDTTL != time.Minute ||
		e.Hint != "db" || e.DNSNames[0] != "web.example.org" || e.CreatedAt != 1700000000 || e.RevisionNumber != 3 {
		t.Fatalf("converted %+v", e)
	}
	if fmt.Sprint(e.FederatesWith) != "[a.org b.org]" {
		t.Fatalf("federates with %v", e.FederatesWith)
	}
	for name, bad := range map[string]*types.Entry{
		"store_svid":       {Id: "s", SpiffeId: sid("/w"), ParentId: sid("/node"), StoreSvid: true, Selectors: full.Selectors},
		"node alias":       {Id: "a", SpiffeId: sid("/node"), ParentId: sid("/spire/server"), Selectors: []*types.Selector{{Type: "join_token", Value: "t"}}},
		"token alias":      {Id: "t", SpiffeId: sid("/node"), ParentId: sid("/spire/agent/join_token/t"), Selectors: []*types.Selector{{Type: "spiffe_id", Value: "spiffe://example.org/spire/agent/join_token/t"}}},
		"other trust":      {Id: "o", SpiffeId: &types.SPIFFEID{TrustDomain: "other.org", Path: "/w"}, ParentId: sid("/node"), Selectors: full.Selectors},
		"empty selector":   {Id: "x", SpiffeId: sid("/w"), ParentId: sid("/node"), Selectors: []*types.Selector{{Type: "unix"}}},
		"bad federation":   {Id: "f", SpiffeId: sid("/w"), ParentId: sid("/node"), Selectors: full.Selectors, FederatesWith: []string{"Bad Domain"}},
		"missing SPIFFEID": {Id: "m", ParentId: sid("/node"), Selectors: full.Selectors},
	} {
		if se := s.convertEntry(bad); se.entry != nil || se.revision != bad.RevisionNumber {
			t.Errorf("%s: served %+v", name, se.entry)
		}
	}
	// Same revision: kept as is. New revision, or recreated: replaced.
	s.putEntry(full)
	kept := s.view.entries["e1"].entry
	s.view.entriesDirty = false
	s.putEntry(full)
	if s.view.entries["e1"].entry != kept || s.view.entriesDirty {
		t.Fatal("an unchanged entry was replaced")
	}
	recreated := proto.Clone(full).(*types.Entry)
	recreated.CreatedAt++
	s.putEntry(recreated)
	if s.view.entries["e1"].entry == kept || !s.view.entriesDirty {
		t.Fatal("a recreated entry was not replaced")
	}
	s.dropEntriesExcept(map[string]bool{})
	if len(s.view.entries) != 0 {
		t.Fatal("entries not seen were kept")
	}
}

func TestBundleConversion(t *testing.T) {
	ca, _ := newCA(t)
	jwtKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	pub, err := x509.MarshalPKIXPublicKey(jwtKey.Public())
	if err != nil {
		t.Fatal(err)
	}
	b, err := bundleFromProto(&types.Bundle{
		TrustDomain:     "example.org",
		X509Authorities: []*types.X509Certificate{{Asn1: ca.Raw, Tainted: true}},
		JwtAuthorities:  []*types.JWTKey{{PublicKey: pub, KeyId: "k1"}},
		RefreshHint:     30, SequenceNumber: 7,
	})
	if err != nil {
		t.Fatal(err)
	}
	if b.TrustDomain() != td || len(b.X509Authorities()) != 1 || len(b.JWTAuthorities()) != 1 {
		t.Fatalf("converted %v", b)
	}
	if hint, _ := b.RefreshHint(); hint != 30*time.Second {
		t.Fatalf("refresh hint %s", hint)
	}
	if seq, _ := b.SequenceNumber(); seq != 7 {
		t.Fatalf("sequence %d", seq)
	}
	if _, err := bundleFromProto(&types.Bundle{TrustDomain: "example.org", JwtAuthorities: []*types.JWTKey{{PublicKey: pub}}}); err == nil {
		t.Fatal("a JWT authority without a key ID was accepted")
	}
	if _, err := bundleFromProto(&types.Bundle{TrustDomain: "example.org", X509Authorities: []*types.X509Certificate{{Asn1: []byte("junk")}}}); err == nil {
		t.Fatal("a junk X.509 authority was accepted")
	}
}

func TestRedactID(t *testing.T) {
	if got := redactID(spiffeid.RequireFromPath(td, "/spire/agent/join_token/secret-token")); strings.Contains(got, "secret") {
		t.Fatalf("redactID leaked the token: %s", got)
	}
	if got := redactID(spiffeid.RequireFromPath(td, "/spire/agent/x509pop/abc")); got != "spiffe://example.org/spire/agent/x509pop/abc" {
		t.Fatalf("redactID changed a non-token ID: %s", got)
	}
}

func TestRenewAtIsNearHalfLife(t *testing.T) {
	ca, caKey := newCA(t)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	leaf := newSVID(t, ca, caKey, key, time.Hour)
	life := leaf.NotAfter.Sub(leaf.NotBefore)
	for range 50 {
		at := renewAt(leaf).Sub(leaf.NotBefore)
		if at < life*45/100 || at > life*55/100 {
			t.Fatalf("renew at %s of a %s life, want 45%%-55%%", at, life)
		}
	}
}

// spire-agent's stored SVID and disk key are taken over, so swapping the
// binaries needs no new attestation.
func TestLoadsSpireAgentState(t *testing.T) {
	dir := t.TempDir()
	ca, caKey := newCA(t)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	other, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	svid := newSVID(t, ca, caKey, key, time.Hour)
	// The files as spire-agent writes them (pkg/agent/storage, keymanager/disk).
	pemOf := func(der []byte) []byte { return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}) }
	data, _ := json.Marshal(map[string]any{"svid": [][]byte{pemOf(svid.Raw)}, "bundle": [][]byte{pemOf(ca.Raw)}, "reattestable": false})
	if err := os.WriteFile(filepath.Join(dir, "agent-data.json"), data, 0o600); err != nil {
		t.Fatal(err)
	}
	keysDir := filepath.Join(dir, "km")
	if err := os.Mkdir(keysDir, 0o700); err != nil {
		t.Fatal(err)
	}
	der := func(k *ecdsa.PrivateKey) []byte {
		b, err := x509.MarshalPKCS8PrivateKey(k)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	keys, _ := json.Marshal(map[string]any{"keys": map[string][]byte{"agent-svid-A": der(other), "agent-svid-B": der(key)}})
	if err := os.WriteFile(filepath.Join(keysDir, "keys.json"), keys, 0o600); err != nil {
		t.Fatal(err)
	}
	st := &store{statePath: filepath.Join(dir, stateFileName), keyDir: keysDir, td: td}
	creds, bundle, err := st.loadSpireAgent(time.Now())
	if err != nil || creds == nil {
		t.Fatalf("spire-agent's state was not loaded: %v", err)
	}
	if !creds.svid[0].Equal(svid) || !creds.key.Public().(*ecdsa.PublicKey).Equal(key.Public()) || len(bundle) != 1 {
		t.Fatal("loaded the wrong key or SVID")
	}
	// Without a matching key, or with the memory key manager, nothing.
	if err := os.WriteFile(filepath.Join(keysDir, "keys.json"), []byte(`{"keys":{}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if creds, _, err := st.loadSpireAgent(time.Now()); creds != nil || err != nil {
		t.Fatalf("loaded an SVID without its key: %v", err)
	}
	mem := &store{statePath: st.statePath, td: td}
	if creds, _, err := mem.loadSpireAgent(time.Now()); creds != nil || err != nil {
		t.Fatalf("the memory key manager loaded spire-agent's state: %v", err)
	}
}

// TestResyncGivesUpWithItsCaller: a caller waiting for a sync on demand
// while another sync holds the lock (one that may run for rpcTimeout when
// the server is unreachable) leaves when its context ends.
func TestResyncGivesUpWithItsCaller(t *testing.T) {
	id := &agentIdentity{ready: make(chan struct{})}
	close(id.ready)
	s := newSyncer(hclog.NewNullLogger(), td, spiffeid.RequireFromPath(td, "/spire/server"), time.Second, nil, id)
	s.lock.Acquire(context.Background(), 1) // a periodic sync in progress
	defer s.lock.Release(1)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	done := make(chan error, 1)
	go func() {
		_, err := s.Resync(ctx)
		done <- err
	}()
	select {
	case err := <-done:
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Resync = %v, want the caller's deadline", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Resync kept waiting for the sync lock after its caller's context ended")
	}
}
