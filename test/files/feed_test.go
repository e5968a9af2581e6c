package files

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testkit"
)

// helperConfig is a spiffe-helper config file, written as spiffe-helper's
// users write it.
type helperConfig struct {
	socket, certDir           string
	cmd, cmdArgs              string
	pidFile, renewSignal      string
	svid, svidKey, svidBundle string
	// extra is more HCL: jwt_svids, credential_folder.
	extra string
}

func (c helperConfig) hcl() string {
	var b strings.Builder
	line := func(key, value string) {
		if value != "" {
			fmt.Fprintf(&b, "%s = %q\n", key, value)
		}
	}
	line("agent_address", c.socket)
	line("cmd", c.cmd)
	line("cmd_args", c.cmdArgs)
	line("cert_dir", c.certDir)
	line("renew_signal", c.renewSignal)
	line("pid_file_name", c.pidFile)
	line("svid_file_name", c.svid)
	line("svid_key_file_name", c.svidKey)
	line("svid_bundle_file_name", c.svidBundle)
	b.WriteString(c.extra)
	return b.String()
}

// waitFile waits until path exists, as the helper's first write.
func waitFile(t *testing.T, path string) {
	t.Helper()
	testkit.WaitFor(t, 30*time.Second, path, func() bool {
		_, err := os.Stat(path)
		return err == nil
	})
}

// runHelper runs `lanyard helper` on c until the test ends, when it must
// stop (and stop its cmd) and exit 0 on SIGTERM.
func runHelper(t *testing.T, c helperConfig) *testkit.Process {
	t.Helper()
	path := filepath.Join(t.TempDir(), "helper.conf")
	if err := os.WriteFile(path, []byte(c.hcl()), 0o600); err != nil {
		t.Fatal(err)
	}
	p, err := testkit.Start(t, lanyardBin, "helper", "-config", path)
	if err != nil {
		t.Fatal(err)
	}
	return p
}
