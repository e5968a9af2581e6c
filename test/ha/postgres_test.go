package ha

import (
	"fmt"
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
)

// postgresBinDir finds Debian's PostgreSQL programs: on PATH, or in
// /usr/lib/postgresql/<version>/bin, where the package puts them.
func postgresBinDir(t *testing.T) string {
	t.Helper()
	if p, err := exec.LookPath("initdb"); err == nil {
		if real, err := filepath.EvalSymlinks(p); err == nil {
			return filepath.Dir(real)
		}
	}
	found, _ := filepath.Glob("/usr/lib/postgresql/*/bin/initdb")
	if len(found) == 0 {
		const why = "PostgreSQL is not installed: make postgres (apt-get install postgresql)"
		if os.Getenv("CI") != "" {
			t.Fatal(why)
		}
		t.Skip(why)
	}
	slices.SortFunc(found, func(a, b string) int { return versionOf(a) - versionOf(b) })
	return filepath.Dir(found[len(found)-1])
}

func versionOf(initdb string) int {
	v, _ := strconv.Atoi(filepath.Base(filepath.Dir(filepath.Dir(initdb))))
	return v
}

// startPostgres runs a private PostgreSQL cluster on a loopback port as
// nobody (PostgreSQL refuses root), stopped when the test ends and killed
// with the test binary; it returns a connection string for SPIRE's sql
// datastore. The server runs in the foreground rather than through
// pg_ctl, which would detach it from the test.
func startPostgres(t *testing.T) string {
	t.Helper()
	testkit.RequireRoot(t, "PostgreSQL runs as another user")
	bin := postgresBinDir(t)
	nobody, err := user.Lookup("nobody")
	if err != nil {
		t.Fatal(err)
	}
	uid, _ := strconv.Atoi(nobody.Uid)
	gid, _ := strconv.Atoi(nobody.Gid)
	asNobody := &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}, Pdeathsig: syscall.SIGKILL}

	dir := testkit.ShortDir(t, "lyha-pg-")
	if err := os.Chown(dir, uid, gid); err != nil {
		t.Fatal(err)
	}
	data := filepath.Join(dir, "data")
	initdb := exec.Command(filepath.Join(bin, "initdb"), "-D", data, "-U", "spire", "-A", "trust", "--no-sync", "--no-instructions")
	initdb.SysProcAttr = asNobody
	if out, err := initdb.CombinedOutput(); err != nil {
		t.Fatalf("initdb: %v\n%s", err, out)
	}
	port := freePort(t, "127.0.0.1")
	logPath := filepath.Join(dir, "postgres.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logFile.Close()
	// Durability is not under test: fsync off spares the shared disk.
	pg := exec.Command(filepath.Join(bin, "postgres"), "-D", data, "-p", strconv.Itoa(port), "-k", dir,
		"-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off")
	pg.SysProcAttr = asNobody
	pg.Stdout, pg.Stderr = logFile, logFile
	if err := pg.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() {
		_ = pg.Wait()
		close(exited)
	}()
	t.Cleanup(func() {
		// SIGINT: PostgreSQL's fast shutdown.
		_ = pg.Process.Signal(syscall.SIGINT)
		select {
		case <-exited:
		case <-time.After(30 * time.Second):
			_ = pg.Process.Kill()
			<-exited
			t.Error("PostgreSQL did not stop within 30s of SIGINT")
		}
		if t.Failed() {
			if b, err := os.ReadFile(logPath); err == nil {
				t.Logf("PostgreSQL log:\n%s", b)
			}
		}
	})
	testkit.WaitFor(t, 60*time.Second, "PostgreSQL to accept connections", func() bool {
		select {
		case <-exited:
			b, _ := os.ReadFile(logPath)
			t.Fatalf("PostgreSQL exited:\n%s", b)
		default:
		}
		return exec.Command(filepath.Join(bin, "pg_isready"), "-q", "-h", "127.0.0.1", "-p", strconv.Itoa(port)).Run() == nil
	})
	return fmt.Sprintf("dbname=postgres user=spire host=127.0.0.1 port=%d sslmode=disable", port)
}
