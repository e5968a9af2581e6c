package agent

import (
	"context"
	"encoding/base64"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/internal/testkit"
)

// FuzzValidateJWTSVID feeds arbitrary tokens to validation: it must never
// panic, and must accept nothing but a token signed by the bundle's key for
// the audience.
func FuzzValidateJWTSVID(f *testing.F) {
	c, up := newTestCache(&testing.T{})
	c.SetEntries(nil)
	c.SetBundles(up.bundle(), nil)
	now := time.Now()
	valid, err := testkit.SignJWT(up.jwtKey, up.jwtKID, "spiffe://example.org/web", []string{"db"}, now, now.Add(time.Hour))
	if err != nil {
		f.Fatal(err)
	}
	parts := strings.Split(valid, ".")
	for _, seed := range []string{
		valid,
		"", ".", "..", "a.b.c",
		parts[0] + "." + parts[1] + ".",
		parts[0] + ".e30." + parts[2],
		base64.RawURLEncoding.EncodeToString([]byte(`{"alg":"none"}`)) + "." + parts[1] + ".",
		base64.RawURLEncoding.EncodeToString([]byte(`{"alg":"ES256","kid":"kid-1"}`)) + "." + base64.RawURLEncoding.EncodeToString([]byte(`{"sub":"spiffe://example.org/x","aud":"db","exp":99999999999}`)) + "." + parts[2],
	} {
		f.Add(seed, "db")
	}
	f.Fuzz(func(t *testing.T, token, audience string) {
		svid, err := c.ValidateJWTSVID(context.Background(), nil, token, audience)
		if err != nil {
			return
		}
		// Only the genuine token verifies; a fuzzer cannot forge ES256.
		if token != valid || audience != "db" || svid.ID.String() != "spiffe://example.org/web" {
			t.Fatalf("accepted token %q for audience %q as %s", token, audience, svid.ID)
		}
	})
}

// FuzzLoadCache feeds arbitrary bytes as the saved cache file: loading must
// never panic, and a file it rejects must leave the cache empty.
func FuzzLoadCache(f *testing.F) {
	// A genuine file as a seed, saved by a real cache.
	seedDir := f.TempDir()
	c, up := newTestCache(&testing.T{})
	c.PersistTo(seedDir, testTD)
	e := testEntry("e1", "spiffe://example.org/web", 1, "unix:uid:1000")
	hold(c, up, e)
	if _, err := c.X509Identities(context.Background(), e.Selectors); err != nil {
		f.Fatal(err)
	}
	c.persister.persist()
	good, err := os.ReadFile(filepath.Join(seedDir, cacheFileName))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(good)
	f.Add([]byte(`{"version":1,"trust_domain":"example.org","local_bundle":{"keys":[]}}`))
	f.Add([]byte(`{"version":1}`))
	f.Add([]byte(`null`))
	f.Add(good[:len(good)/2])
	// Execs within one fuzz worker run one at a time, so they share a dir.
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, data []byte) {
		for _, name := range []string{cacheFileName, cacheFileName + ".corrupt"} {
			if err := os.Remove(filepath.Join(dir, name)); err != nil && !os.IsNotExist(err) {
				t.Fatal(err)
			}
		}
		if err := os.WriteFile(filepath.Join(dir, cacheFileName), data, 0o600); err != nil {
			t.Fatal(err)
		}
		// The upstream only mints; loading never calls it, so one serves all.
		c := NewSVIDManager(hclog.NewNullLogger(), up)
		c.PersistTo(dir, testTD)
		h := c.Health()
		if _, err := os.Stat(filepath.Join(dir, cacheFileName+".corrupt")); err == nil {
			if h.Ready || h.Entries != 0 || h.X509SVIDs != 0 {
				t.Fatalf("a rejected file left state behind: %+v", h)
			}
		}
	})
}
