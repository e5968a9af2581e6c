package spiretest

import (
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/lanyard-dev/lanyard/attestor/selector"
)

// JoinToken generates a join token. If spiffeID is not empty, the agent that
// attests with it also gets that SPIFFE ID (a node alias), so it can be used
// as the parent ID of workload entries.
func (s *Server) JoinToken(t testing.TB, spiffeID string) string {
	t.Helper()
	args := []string{"token", "generate", "-output", "json"}
	if spiffeID != "" {
		args = append(args, "-spiffeID", spiffeID)
	}
	var resp struct {
		Value string `json:"value"`
	}
	decodeJSON(t, s.CLI(t, args...), &resp)
	if resp.Value == "" {
		t.Fatalf("spire-server token generate returned no token")
	}
	return resp.Value
}

// Entry is a registration entry to create; selectors are "type:value",
// e.g. "unix:uid:1000".
type Entry struct {
	ParentID  string
	SPIFFEID  string
	Selectors []string
}

// CreateEntry creates a registration entry and returns its ID.
func (s *Server) CreateEntry(t testing.TB, parentID, spiffeID string, selectors ...string) string {
	t.Helper()
	return s.CreateEntries(t, []Entry{{ParentID: parentID, SPIFFEID: spiffeID, Selectors: selectors}})[0]
}

// entriesPerCall bounds one `entry create -data` call.
const entriesPerCall = 1000

// CreateEntries creates entries with `spire-server entry create -data`, a
// thousand per call, and returns their IDs in order.
func (s *Server) CreateEntries(t testing.TB, entries []Entry) []string {
	t.Helper()
	type jsonSelector struct {
		Type  string `json:"type"`
		Value string `json:"value"`
	}
	type entry struct {
		SPIFFEID  string         `json:"spiffe_id"`
		ParentID  string         `json:"parent_id"`
		Selectors []jsonSelector `json:"selectors"`
	}
	var ids []string
	for chunk := range slices.Chunk(entries, entriesPerCall) {
		doc := struct {
			Entries []entry `json:"entries"`
		}{}
		for _, e := range chunk {
			je := entry{SPIFFEID: e.SPIFFEID, ParentID: e.ParentID}
			for _, sel := range e.Selectors {
				parsed, err := selector.Parse(sel)
				if err != nil {
					t.Fatalf("entry %s: %v", e.SPIFFEID, err)
				}
				je.Selectors = append(je.Selectors, jsonSelector{Type: parsed.Type, Value: parsed.Value})
			}
			doc.Entries = append(doc.Entries, je)
		}
		data, err := json.Marshal(doc)
		if err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(t.TempDir(), "entries.json")
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		var resp struct {
			Results []struct {
				Status struct {
					Code    int    `json:"code"`
					Message string `json:"message"`
				} `json:"status"`
				Entry struct {
					ID string `json:"id"`
				} `json:"entry"`
			} `json:"results"`
		}
		decodeJSON(t, s.CLI(t, "entry", "create", "-data", path, "-output", "json"), &resp)
		if len(resp.Results) != len(chunk) {
			t.Fatalf("spire-server entry create: %d results for %d entries", len(resp.Results), len(chunk))
		}
		for _, r := range resp.Results {
			if r.Status.Code != 0 || r.Entry.ID == "" {
				t.Fatalf("spire-server entry create failed: code %d: %s", r.Status.Code, r.Status.Message)
			}
			ids = append(ids, r.Entry.ID)
		}
	}
	return ids
}

// DeleteEntry deletes the registration entry with the given ID.
func (s *Server) DeleteEntry(t testing.TB, id string) {
	t.Helper()
	s.CLI(t, "entry", "delete", "-entryID", id)
}

// BundlePEM returns the server's X.509 trust bundle as PEM.
func (s *Server) BundlePEM(t testing.TB) []byte {
	t.Helper()
	out := s.CLI(t, "bundle", "show", "-format", "pem")
	if !strings.Contains(out, "-----BEGIN CERTIFICATE-----") {
		t.Fatalf("spire-server bundle show returned no certificate:\n%s", out)
	}
	return []byte(out)
}

// BundleCerts returns the server's X.509 trust bundle's certificates.
func (s *Server) BundleCerts(t testing.TB) []*x509.Certificate {
	t.Helper()
	var certs []*x509.Certificate
	for rest := s.BundlePEM(t); ; {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			return certs
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			t.Fatalf("parsing bundle certificate: %v", err)
		}
		certs = append(certs, c)
	}
}

// PrepareX509Authority prepares a new X.509 authority (adding it to the
// bundle) and returns its authority ID.
func (s *Server) PrepareX509Authority(t testing.TB) string {
	t.Helper()
	return s.prepareAuthority(t, "x509")
}

// ActivateX509Authority makes the prepared X.509 authority the active one.
func (s *Server) ActivateX509Authority(t testing.TB, id string) {
	t.Helper()
	s.CLI(t, "localauthority", "x509", "activate", "-authorityID", id)
}

// PrepareJWTAuthority prepares a new JWT authority (adding its key to the
// bundle) and returns its authority ID.
func (s *Server) PrepareJWTAuthority(t testing.TB) string {
	t.Helper()
	return s.prepareAuthority(t, "jwt")
}

// ActivateJWTAuthority makes the prepared JWT authority the active one.
func (s *Server) ActivateJWTAuthority(t testing.TB, id string) {
	t.Helper()
	s.CLI(t, "localauthority", "jwt", "activate", "-authorityID", id)
}

func (s *Server) prepareAuthority(t testing.TB, kind string) string {
	t.Helper()
	var resp struct {
		PreparedAuthority struct {
			AuthorityID string `json:"authority_id"`
		} `json:"prepared_authority"`
	}
	decodeJSON(t, s.CLI(t, "localauthority", kind, "prepare", "-output", "json"), &resp)
	if resp.PreparedAuthority.AuthorityID == "" {
		t.Fatalf("spire-server localauthority %s prepare returned no authority ID", kind)
	}
	return resp.PreparedAuthority.AuthorityID
}
