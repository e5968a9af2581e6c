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
	runHelper(t, cfg)
	waitFile(t, filepath.Join(certDir, "svid.pem"))
	n.start(t, bin, certDir)
	requireReloadsAcrossRotations(t, socket, filepath.Join(certDir, "svid.pem"), n.port, n.errorLog)
}

// TestHAProxyReloadsAsHelperChild: HAProxy in master-worker mode (-W,
// which reloads on SIGUSR2) as the helper's cmd, reloaded with SIGUSR2
// after each rotation, and stopped with the helper.
func TestHAProxyReloadsAsHelperChild(t *testing.T) {
	bin := requireApp(t, "haproxy")
	socket := startAgent(t)
	certDir := t.TempDir()
	conf, port := writeHAProxyConf(t, certDir)
	pidFile := filepath.Join(filepath.Dir(conf), "haproxy.pid")
	// Runs after the helper has stopped (cleanups run last first).
	t.Cleanup(func() { requireStopped(t, "haproxy", pidFile) })
	cfg := helperConfig{socket: socket, certDir: certDir, renewSignal: "SIGUSR2",
		cmd: bin, cmdArgs: "-W -db -f " + conf + " -p " + pidFile,
		svid: "svid.pem", svidKey: "svid.pem.key", svidBundle: "svid_bundle.pem"}
	runHelper(t, cfg)
	waitFile(t, filepath.Join(certDir, "svid.pem"))
	waitListening(t, port, "haproxy", nil)
	requireReloadsAcrossRotations(t, socket, filepath.Join(certDir, "svid.pem"), port, func() string { return "" })
}
