package spire

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/x509"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/sys/unix"
)

// attackerUID owns the files another user planted; it needs no passwd entry.
const attackerUID = 47001

// watchUntouched reports, when the test ends, any open, read or write of
// path (inotify: the kernel's word, not a timestamp's) and any change of
// its bytes.
func watchUntouched(t *testing.T, path string) {
	t.Helper()
	before, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	in, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := unix.InotifyAddWatch(in, path, unix.IN_OPEN|unix.IN_ACCESS|unix.IN_MODIFY|unix.IN_ATTRIB); err != nil {
		unix.Close(in)
		t.Fatal(err)
	}
	t.Cleanup(func() {
		defer unix.Close(in)
		buf := make([]byte, 4096)
		if n, err := unix.Read(in, buf); n > 0 {
			// struct inotify_event: int32 wd, uint32 mask, ...
			t.Errorf("%s, the link's target, was touched (inotify mask %#x)", path, binary.NativeEndian.Uint32(buf[4:8]))
		} else if !errors.Is(err, unix.EAGAIN) {
			t.Errorf("reading inotify events of %s: %v", path, err)
		}
		if after, err := os.ReadFile(path); err != nil || !bytes.Equal(after, before) {
			t.Errorf("%s, the link's target, changed: %v", path, err)
		}
	})
}

// plantSymlink replaces path by a symbolic link to a copy of it elsewhere:
// a valid file, owned by the agent (root), mode 0600. The copy must be
// neither read nor written.
func plantSymlink(t *testing.T, path string) string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	target := filepath.Join(t.TempDir(), "elsewhere-"+filepath.Base(path))
	if err := agent.WriteFileAtomic(target, data); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(target, path); err != nil {
		t.Fatal(err)
	}
	watchUntouched(t, target)
	return target
}

// chownToAttacker gives path, unchanged, to attackerUID.
func chownToAttacker(t *testing.T, path string) {
	t.Helper()
	if err := os.Chown(path, attackerUID, attackerUID); err != nil {
		t.Fatal(err)
	}
}

// attacks are what another user plants at a path the agent reads: each
// plant returns the words the refusal must hold.
var attacks = []struct {
	name  string
	plant func(t *testing.T, path string) []string
}{
	{"a symlink", func(t *testing.T, path string) []string {
		return []string{"symbolic link", plantSymlink(t, path)}
	}},
	{"owned by another uid", func(t *testing.T, path string) []string {
		chownToAttacker(t, path)
		return []string{"uid 47001", "0600"}
	}},
}

func wantRefused(t *testing.T, what string, err error, names ...string) {
	t.Helper()
	var unsafe *agent.UnsafeFileError
	if !errors.As(err, &unsafe) {
		t.Fatalf("%s: %v, want the file refused (an *agent.UnsafeFileError)", what, err)
	}
	for _, n := range names {
		if !strings.Contains(err.Error(), n) {
			t.Errorf("%s: %v; want it to name %q", what, err, n)
		}
	}
}

func requireRoot(t *testing.T) {
	t.Helper()
	testkit.RequireRoot(t, "to give a file to another uid")
}

// Lanyard's own state and key files are read only if they are the agent's
// own private files: a link (even to a valid file of the agent's) or a file
// of another user is refused with an error saying which file, its owner or
// target, and what to do; the node is not attested again over it.
func TestStoreRefusesUnsafeFiles(t *testing.T) {
	requireRoot(t)
	ca := testkit.NewTrustDomainCA(t, td)
	creds := newCreds(t, ca)
	// setup returns an agent whose state and key files are valid.
	setup := func(t *testing.T) *Spire {
		dir := t.TempDir()
		s, err := build(t, fmt.Sprintf(spireConf, dir, writeBundle(t, dir, ca.Cert)))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.MkdirAll(filepath.Dir(s.identity.store.statePath), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := s.identity.store.save(nil, creds, []*x509.Certificate{ca.Cert}); err != nil {
			t.Fatal(err)
		}
		if c, _, why, err := s.identity.store.load(); err != nil || c == nil {
			t.Fatalf("the valid files do not load: %v (%s)", err, why)
		}
		return s
	}
	// start must fail on the refused file at once, not attest the node
	// (there is no server to attest with: it would retry until ctx ends).
	start := func(t *testing.T, s *Spire) error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		err := s.identity.start(ctx)
		if ctx.Err() != nil {
			t.Fatalf("start tried to attest the node instead of refusing the file: %v", err)
		}
		if c := s.identity.current(); c != nil {
			t.Errorf("start took credentials from the refused file")
		}
		return err
	}

	for _, file := range []struct {
		name string
		path func(*store) string
	}{{"state", func(st *store) string { return st.statePath }}, {"keys", (*store).keysPath}} {
		for _, a := range attacks {
			t.Run(file.name+" "+a.name, func(t *testing.T) {
				s := setup(t)
				path := file.path(s.identity.store)
				words := append(a.plant(t, path), path, "remove it")
				wantRefused(t, file.name+" "+a.name, start(t, s), words...)
			})
		}
	}
	t.Run("state open to others", func(t *testing.T) {
		s := setup(t)
		if err := os.Chmod(s.identity.store.statePath, 0o644); err != nil {
			t.Fatal(err)
		}
		wantRefused(t, "state 0644", start(t, s), s.identity.store.statePath, "0644")
	})
	// Saving replaces a planted link by the agent's own file and writes
	// nothing through it (watchUntouched checks the target).
	t.Run("save over symlinks", func(t *testing.T) {
		s := setup(t)
		plantSymlink(t, s.identity.store.statePath)
		plantSymlink(t, s.identity.store.keysPath())
		if err := s.identity.store.save(nil, creds, []*x509.Certificate{ca.Cert}); err != nil {
			t.Fatal(err)
		}
		if c, _, why, err := s.identity.store.load(); err != nil || c == nil {
			t.Fatalf("after the save: %v (%s)", err, why)
		}
	})
}

// spire-agent's files, taken over on a swap, are read under the same rule
// (a file of the agent's user, never through a link), except that any
// mode without group or other bits is spire-agent's choice to make. A
// refused file stops the start with what to do, as an unreadable
// agent-data.json always did, rather than attest the node again.
func TestSpireAgentTakeoverRefusesUnsafeFiles(t *testing.T) {
	requireRoot(t)
	ca := testkit.NewTrustDomainCA(t, td)
	key := testkit.NewKey(t)
	svid := newSVID(t, ca, key, time.Hour)
	agentData, keysJSON := spireAgentFiles(t, svid, ca.Cert, map[string]*ecdsa.PrivateKey{"agent-svid-A": key})
	// setup returns a store beside spire-agent's files, as spire-agent
	// writes them (mode 0600, the agent's user) and the two paths.
	setup := func(t *testing.T) (st *store, dataPath, keysPath string) {
		dir := t.TempDir()
		st = &store{statePath: filepath.Join(dir, stateFileName), keyDir: filepath.Join(dir, "km"), td: td}
		if err := os.Mkdir(st.keyDir, 0o700); err != nil {
			t.Fatal(err)
		}
		dataPath, keysPath = filepath.Join(dir, spireAgentDataFile), filepath.Join(st.keyDir, spireAgentKeysFile)
		for path, data := range map[string][]byte{dataPath: agentData, keysPath: keysJSON} {
			if err := os.WriteFile(path, data, 0o600); err != nil {
				t.Fatal(err)
			}
		}
		if c, _, err := st.loadSpireAgent(time.Now()); err != nil || c == nil {
			t.Fatalf("spire-agent's valid files do not load: %v", err)
		}
		return st, dataPath, keysPath
	}
	refused := func(t *testing.T, st *store, what string, names ...string) {
		t.Helper()
		c, _, err := st.loadSpireAgent(time.Now())
		if c != nil {
			t.Errorf("%s: took over the SVID", what)
		}
		wantRefused(t, what, err, append(names, "chown", "remove")...)
	}

	for _, file := range []string{"agent-data.json", "keys.json"} {
		for _, a := range attacks {
			t.Run(file+" "+a.name, func(t *testing.T) {
				st, dataPath, keysPath := setup(t)
				path := dataPath
				if file == "keys.json" {
					path = keysPath
				}
				refused(t, st, file+" "+a.name, append(a.plant(t, path), path)...)
			})
		}
	}
	t.Run("keys.json readable by the group", func(t *testing.T) {
		st, _, keysPath := setup(t)
		if err := os.Chmod(keysPath, 0o640); err != nil {
			t.Fatal(err)
		}
		refused(t, st, "keys.json 0640", keysPath, "0640")
	})
	t.Run("mode 0400 is taken over", func(t *testing.T) {
		st, dataPath, keysPath := setup(t)
		for _, p := range []string{dataPath, keysPath} {
			if err := os.Chmod(p, 0o400); err != nil {
				t.Fatal(err)
			}
		}
		if c, _, err := st.loadSpireAgent(time.Now()); err != nil || c == nil {
			t.Fatalf("files of mode 0400 were not taken over: %v", err)
		}
	})
	t.Run("an expired SVID needs no key", func(t *testing.T) {
		st, _, keysPath := setup(t)
		chownToAttacker(t, keysPath)
		if c, _, err := st.loadSpireAgent(svid.NotAfter); c != nil || err != nil {
			t.Fatalf("an expired SVID: %v, %v; want nothing to take over and no error", c, err)
		}
	})
}

func TestStoreRoundTrip(t *testing.T) {
	dir := t.TempDir()
	ca := testkit.NewTrustDomainCA(t, td)
	creds := newCreds(t, ca)
	creds.reattestable = true
	st := &store{statePath: filepath.Join(dir, stateFileName), keyDir: filepath.Join(dir, "keys"), td: td}
	if err := st.save(nil, creds, []*x509.Certificate{ca.Cert}); err != nil {
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
	if !got.svid[0].Equal(creds.svid[0]) || !got.key.Public().(*ecdsa.PublicKey).Equal(creds.key.Public()) || !got.reattestable {
		t.Fatal("loaded other credentials than stored")
	}
	if len(bundle) != 1 || !bundle[0].Equal(ca.Cert) {
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
	ca := testkit.NewTrustDomainCA(t, td)
	oldKey := testkit.NewKey(t)
	newKey := testkit.NewKey(t)
	prev := &credentials{svid: []*x509.Certificate{newSVID(t, ca, oldKey, time.Hour)}, key: oldKey}
	next := &credentials{svid: []*x509.Certificate{newSVID(t, ca, newKey, time.Hour)}, key: newKey}
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
	ca := testkit.NewTrustDomainCA(t, td)
	creds := newCreds(t, ca)

	mem := &store{statePath: filepath.Join(dir, "mem.json"), td: td}
	if err := mem.save(nil, creds, []*x509.Certificate{ca.Cert}); err != nil {
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

// spireAgentFiles are agent-data.json and keys.json as spire-agent writes
// them (pkg/agent/storage, keymanager/disk).
func spireAgentFiles(t *testing.T, svid, ca *x509.Certificate, keys map[string]*ecdsa.PrivateKey) (agentData, keysJSON []byte) {
	t.Helper()
	pemOf := func(c *x509.Certificate) [][]byte { return [][]byte{testkit.PEM("CERTIFICATE", c.Raw)} }
	agentData, _ = json.Marshal(map[string]any{"svid": pemOf(svid), "bundle": pemOf(ca), "reattestable": false})
	ders := map[string][]byte{}
	for name, k := range keys {
		ders[name] = testkit.PKCS8(t, k)
	}
	keysJSON, _ = json.Marshal(map[string]any{"keys": ders})
	return agentData, keysJSON
}

// spire-agent's stored SVID and disk key are taken over, so swapping the
// binaries needs no new attestation.
func TestLoadsSpireAgentState(t *testing.T) {
	dir := t.TempDir()
	ca := testkit.NewTrustDomainCA(t, td)
	key := testkit.NewKey(t)
	other := testkit.NewKey(t)
	svid := newSVID(t, ca, key, time.Hour)
	data, keys := spireAgentFiles(t, svid, ca.Cert, map[string]*ecdsa.PrivateKey{"agent-svid-A": other, "agent-svid-B": key})
	if err := os.WriteFile(filepath.Join(dir, "agent-data.json"), data, 0o600); err != nil {
		t.Fatal(err)
	}
	keysDir := filepath.Join(dir, "km")
	if err := os.Mkdir(keysDir, 0o700); err != nil {
		t.Fatal(err)
	}
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
