package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestHelperCommandLine: spiffe-helper's flags, its default config name,
// and exit codes 2 for a bad command line and 1 for a bad config.
func TestHelperCommandLine(t *testing.T) {
	dir := t.TempDir()
	t.Chdir(dir)
	bad := filepath.Join(dir, "bad.conf")
	if err := os.WriteFile(bad, []byte("daemon_mode = \"yes\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"helper", "-version"}, 0, "lanyard "},
		{[]string{"helper", "extra"}, 2, `unexpected argument "extra"`},
		{[]string{"helper", "-daemon-mode=maybe"}, 2, "daemon-mode"},
		{[]string{"helper"}, 1, "helper.conf"}, // spiffe-helper's default name
		{[]string{"helper", "-config", bad}, 1, bad + ":1:15: daemon_mode: want true or false"},
		{[]string{"helper", "-h"}, 0, "-daemon-mode"},
		{[]string{"help"}, 0, "helper "},
	} {
		var stdout, stderr bytes.Buffer
		code := run(tc.args, &stdout, &stderr)
		if out := stdout.String() + stderr.String(); code != tc.code || !strings.Contains(out, tc.want) {
			t.Errorf("%v: exit %d, output %q; want %d and %q", tc.args, code, out, tc.code, tc.want)
		}
	}
}
