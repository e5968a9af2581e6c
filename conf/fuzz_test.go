package conf

import (
	"errors"
	"os"
	"testing"
)

// FuzzParse checks that no input makes Parse, or a plugin's use of its
// section, panic, and that every error is positioned in the file. Seeds are
// in testdata/fuzz/FuzzParse; run with go test -fuzz=FuzzParse ./conf.
func FuzzParse(f *testing.F) {
	example, err := os.ReadFile("examples/local.conf")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(example)
	f.Add([]byte(spireAgentConf))
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, err := Parse("fuzz.conf", data)
		if err != nil {
			if cfg != nil {
				t.Fatal("config returned with an error")
			}
			checkPositioned(t, err)
			return
		}
		if cfg.Agent.TrustDomain.IsZero() {
			t.Fatal("parsed without a trust domain")
		}
		for _, p := range cfg.Plugins {
			if p.Data == nil || p.Pos.Line < 1 {
				t.Fatalf("plugin %s/%s: Data %v Pos %v", p.Type, p.Name, p.Data, p.Pos)
			}
			var v struct {
				Name    string            `hcl:"name"`
				N       int               `hcl:"n"`
				On      bool              `hcl:"on"`
				Labels  map[string]string `hcl:"labels"`
				Entries []testEntry       `hcl:"entry"`
			}
			if err := p.Data.Decode(&v); err != nil {
				checkPositioned(t, err)
			}
			checkPositioned(t, p.Data.Errorf("entry[1].selectors[0]", "m"))
		}
	})
}

func checkPositioned(t *testing.T, err error) {
	t.Helper()
	var errs Errors
	if !errors.As(err, &errs) {
		var e *Error
		if !errors.As(err, &e) {
			t.Fatalf("error of type %T: %v", err, err)
		}
		errs = Errors{e}
	}
	for _, e := range errs {
		if e.Pos.File != "fuzz.conf" || e.Pos.Line < 1 || e.Pos.Column < 1 || e.Msg == "" {
			t.Fatalf("error without a position or message: %#v", e)
		}
	}
}
