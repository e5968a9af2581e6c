package files

import (
	"path/filepath"
	"testing"
)

// TestNginxReloadsOnRenewSignal: nginx with ssl_verify_client on, fed by
// the helper, which signals the process in nginx's pid file with SIGHUP
// after each rotation.
func TestNginxReloadsOnRenewSignal(t *testing.T) {
	bin := requireApp(t, "nginx")
	socket := startAgent(t)
	certDir := t.TempDir()
	n := newNginx(t)
	cfg := helperConfig{socket: socket, certDir: certDir, renewSignal: "SIGHUP",
		pidFile: n.pidFile, svid: "svid.pem", svidKey: "svid_key.pem", svidBundle: "svid_bundle.pem"}
	feed(t, cfg)
	waitFile(t, filepath.Join(certDir, "svid.pem"))
	n.start(t, bin, certDir)
	requireReloadsAcrossRotations(t, socket, filepath.Join(certDir, "svid.pem"), n.port, n.errorLog)
}

// TestHAProxyReloadsAsHelperChild: HAProxy in master-worker mode as the
// helper's cmd, reloaded with SIGUSR2 after each rotation.
func TestHAProxyReloadsAsHelperChild(t *testing.T) {
	bin := requireApp(t, "haproxy")
	socket := startAgent(t)
	certDir := t.TempDir()
	conf, port := writeHAProxyConf(t, certDir)
	cfg := helperConfig{socket: socket, certDir: certDir, renewSignal: "SIGUSR2",
		cmd: bin, cmdArgs: "-W -db -f " + conf, svid: "svid.pem", svidKey: "svid.pem.key", svidBundle: "svid_bundle.pem"}
	feed(t, cfg)
	waitFile(t, filepath.Join(certDir, "svid.pem"))
	waitListening(t, port, "haproxy", nil)
	requireReloadsAcrossRotations(t, socket, filepath.Join(certDir, "svid.pem"), port, func() string { return "" })
}
