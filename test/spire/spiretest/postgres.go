package spiretest

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Postgres is a private PostgreSQL cluster for StartSharedServer's
// datastore, shared by test/ha and the benchmark's HA section.
type Postgres struct {
	bin  string // the cluster's programs
	port int
}

// StartPostgres runs a private PostgreSQL cluster (Debian's, `make
// postgres`) on a loopback port as nobody (PostgreSQL refuses root), in the
// foreground so that it dies with the caller, and stops it in t.Cleanup.
func StartPostgres(t testing.TB) *Postgres {
	t.Helper()
	testkit.RequireRoot(t, "PostgreSQL runs as another user")
	pg := &Postgres{bin: postgresBinDir(t)}
	nobody, err := user.Lookup("nobody")
	if err != nil {
		t.Fatal(err)
	}
	uid, _ := strconv.Atoi(nobody.Uid)
	gid, _ := strconv.Atoi(nobody.Gid)
	asNobody := &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}, Pdeathsig: syscall.SIGKILL}

	dir := testkit.ShortDir(t, "lypg-")
	if err := os.Chown(dir, uid, gid); err != nil {
		t.Fatal(err)
	}
	data := filepath.Join(dir, "data")
	initdb := exec.Command(filepath.Join(pg.bin, "initdb"), "-D", data, "-U", "spire", "-A", "trust", "--no-sync", "--no-instructions")
	initdb.SysProcAttr = asNobody
	if out, err := initdb.CombinedOutput(); err != nil {
		t.Fatalf("initdb: %v\n%s", err, out)
	}
	pg.port = FreePortOn(t, "127.0.0.1")
	logPath := filepath.Join(dir, "postgres.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logFile.Close()
	// Durability is not measured: fsync off spares the shared disk.
	cmd := exec.Command(filepath.Join(pg.bin, "postgres"), "-D", data, "-p", strconv.Itoa(pg.port), "-k", dir,
		"-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "max_connections=300")
	cmd.SysProcAttr = asNobody
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(exited)
	}()
	t.Cleanup(func() {
		// SIGINT: PostgreSQL's fast shutdown.
		_ = cmd.Process.Signal(syscall.SIGINT)
		select {
		case <-exited:
		case <-time.After(30 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
			t.Error("PostgreSQL did not stop within 30s of SIGINT")
		}
		if t.Failed() {
			logTail(t, "PostgreSQL", logPath)
		}
	})
	testkit.WaitFor(t, 60*time.Second, "PostgreSQL to accept connections", func() bool {
		select {
		case <-exited:
			t.Fatalf("PostgreSQL exited:\n%s", readTail(logPath))
		default:
		}
		return exec.Command(filepath.Join(pg.bin, "pg_isready"), "-q", "-h", "127.0.0.1", "-p", strconv.Itoa(pg.port)).Run() == nil
	})
	return pg
}

// Database creates database name and returns its connection string for
// SPIRE's sql datastore (database_type "postgres"): a fresh datastore on
// the same cluster.
func (pg *Postgres) Database(t testing.TB, name string) string {
	t.Helper()
	out, err := exec.Command(filepath.Join(pg.bin, "createdb"), "-h", "127.0.0.1", "-p", strconv.Itoa(pg.port), "-U", "spire", name).CombinedOutput()
	if err != nil {
		t.Fatalf("createdb %s: %v\n%s", name, err, out)
	}
	return fmt.Sprintf("dbname=%s user=spire host=127.0.0.1 port=%d sslmode=disable", name, pg.port)
}

// postgresBinDir is FindPostgres for a test, which skips (fails in CI)
// without it.
func postgresBinDir(t testing.TB) string {
	t.Helper()
	dir, err := FindPostgres()
	if err != nil {
		testkit.Missing(t, "%v", err)
	}
	return dir
}

// FindPostgres finds Debian's PostgreSQL programs: on PATH, or in
// /usr/lib/postgresql/<version>/bin, where the package puts them (the
// newest version).
func FindPostgres() (binDir string, err error) {
	if p, err := exec.LookPath("initdb"); err == nil {
		if real, err := filepath.EvalSymlinks(p); err == nil {
			return filepath.Dir(real), nil
		}
	}
	found, _ := filepath.Glob("/usr/lib/postgresql/*/bin/initdb")
	if len(found) == 0 {
		return "", errors.New("PostgreSQL is not installed: make postgres (apt-get install postgresql)")
	}
	version := func(initdb string) int {
		v, _ := strconv.Atoi(filepath.Base(filepath.Dir(filepath.Dir(initdb))))
		return v
	}
	slices.SortFunc(found, func(a, b string) int { return version(a) - version(b) })
	return filepath.Dir(found[len(found)-1]), nil
}

// WriteUpstreamRoot writes a root for UpstreamAuthority "disk", made now
// as an operator would just before starting the servers, and returns its
// cert and key paths and the bundle (PEM) that agents trust.
func WriteUpstreamRoot(t testing.TB, trustDomain string) (certPath, keyPath string, bundle []byte) {
	t.Helper()
	now := time.Now()
	root := testkit.NewTrustDomainCA(t, spiffeid.RequireTrustDomainFromString(trustDomain), testkit.WithValidity(now, now.Add(30*24*time.Hour)))
	dir := t.TempDir()
	certPath, keyPath = filepath.Join(dir, "root.pem"), filepath.Join(dir, "root.key")
	testkit.WritePEM(t, certPath, "CERTIFICATE", root.Cert.Raw)
	testkit.WritePEM(t, keyPath, "PRIVATE KEY", testkit.PKCS8(t, root.Key))
	return certPath, keyPath, testkit.PEM("CERTIFICATE", root.Cert.Raw)
}

// FreePortOn returns a TCP port free on ip.
func FreePortOn(t testing.TB, ip string) int {
	t.Helper()
	l, err := net.Listen("tcp", net.JoinHostPort(ip, "0"))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// SharedPort returns a TCP port free on every ip, for servers behind one
// name (spire-agent dials one port for every address).
func SharedPort(t testing.TB, ips []string) int {
	t.Helper()
	for range 20 {
		port := FreePortOn(t, ips[0])
		free := true
		for _, ip := range ips[1:] {
			l, err := net.Listen("tcp", net.JoinHostPort(ip, strconv.Itoa(port)))
			if err != nil {
				free = false
				break
			}
			l.Close()
		}
		if free {
			return port
		}
	}
	t.Fatalf("no port free on all of %v", ips)
	return 0
}
