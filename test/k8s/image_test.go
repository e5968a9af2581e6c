package k8s_test

import (
	"archive/tar"
	"compress/gzip"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/testkit"
)

// lanyardImage is the tag `make image` gives (what the overlays deploy).
const lanyardImage = "ghcr.io/lanyard-dev/lanyard:dev"

// makeImage runs `make image` into dir, and returns the tarball's path and
// the line mkimage printed (tag, image ID, manifest digest).
func makeImage(t testing.TB, dir string) (tarPath, digests string) {
	t.Helper()
	makefile, err := testkit.RepoFile("Makefile")
	if err != nil {
		t.Fatal(err)
	}
	tarPath = filepath.Join(dir, "lanyard-image.tar")
	begin := time.Now()
	t.Logf("make image into %s (a build of lanyard: up to a minute on a cold cache)...", dir)
	cmd := exec.Command("make", "-s", "-C", filepath.Dir(makefile), "image",
		"BIN="+filepath.Join(dir, "lanyard"), "IMAGE_TAR="+tarPath)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("make image: %v\n%s", err, out)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	t.Logf("make image: %s in %s", lines[len(lines)-1], time.Since(begin).Round(100*time.Millisecond))
	return tarPath, lines[len(lines)-1]
}

// TestImageReproducible builds the image twice from the same commit, into
// different directories, and gets the same digests and the same bytes; and
// the image is the Dockerfile's: the binary and the CA certificates only,
// run as the Dockerfile says.
func TestImageReproducible(t *testing.T) {
	first, firstDigests := makeImage(t, t.TempDir())
	second, secondDigests := makeImage(t, t.TempDir())
	if firstDigests != secondDigests {
		t.Errorf("two builds of one commit differ:\n%s\n%s", firstDigests, secondDigests)
	}
	a, err := os.ReadFile(first)
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(second)
	if err != nil {
		t.Fatal(err)
	}
	if string(a) != string(b) {
		t.Errorf("the two tarballs differ (%d and %d bytes)", len(a), len(b))
	}
	if !strings.HasPrefix(firstDigests, lanyardImage+" id sha256:") {
		t.Errorf("mkimage printed %q, want the tag %s and its ID", firstDigests, lanyardImage)
	}

	files, config := readDockerArchive(t, first)
	wantFiles := []string{"etc/", "etc/ssl/", "etc/ssl/certs/", "etc/ssl/certs/ca-certificates.crt", "lanyard"}
	if !reflect.DeepEqual(files, wantFiles) {
		t.Errorf("layer holds %q, want %q", files, wantFiles)
	}
	c := config.Config
	if c.User != "0:0" || !reflect.DeepEqual(c.Entrypoint, []string{"/lanyard", "run"}) ||
		!reflect.DeepEqual(c.Cmd, []string{"-config", "/etc/lanyard/agent.conf"}) {
		t.Errorf("config: user %q, entrypoint %q, cmd %q; want the Dockerfile's", c.User, c.Entrypoint, c.Cmd)
	}
	for _, label := range []string{"title", "description", "source", "version"} {
		if c.Labels["org.opencontainers.image."+label] == "" {
			t.Errorf("label org.opencontainers.image.%s missing: %v", label, c.Labels)
		}
	}
	if config.OS != "linux" || config.Created != "1970-01-01T00:00:00Z" {
		t.Errorf("os %q, created %q", config.OS, config.Created)
	}
}

type imageConfig struct {
	OS      string `json:"os"`
	Created string `json:"created"`
	Config  struct {
		User       string
		Entrypoint []string
		Cmd        []string
		Labels     map[string]string
	} `json:"config"`
}

// readDockerArchive returns the names in the image's one layer, each
// checked to be root's with a fixed time, and its config.
func readDockerArchive(t *testing.T, path string) ([]string, imageConfig) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	blobs := map[string][]byte{}
	eachTarEntry(t, f, func(h *tar.Header, data []byte) { blobs[h.Name] = data })
	var manifest []struct {
		Config   string
		RepoTags []string
		Layers   []string
	}
	if err := json.Unmarshal(blobs["manifest.json"], &manifest); err != nil {
		t.Fatalf("manifest.json: %v", err)
	}
	if len(manifest) != 1 || len(manifest[0].Layers) != 1 || !reflect.DeepEqual(manifest[0].RepoTags, []string{lanyardImage}) {
		t.Fatalf("manifest.json: %+v; want one image of one layer tagged %s", manifest, lanyardImage)
	}
	var config imageConfig
	if err := json.Unmarshal(blobs[manifest[0].Config], &config); err != nil {
		t.Fatalf("config: %v", err)
	}
	zr, err := gzip.NewReader(strings.NewReader(string(blobs[manifest[0].Layers[0]])))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	eachTarEntry(t, zr, func(h *tar.Header, _ []byte) {
		if h.Uid != 0 || h.Gid != 0 || h.ModTime.Unix() != 0 {
			t.Errorf("%s: owner %d:%d, time %s; want 0:0 at the epoch", h.Name, h.Uid, h.Gid, h.ModTime)
		}
		// The binary and directories 0755, the certificates 0644, as COPY
		// gives them.
		want := int64(0o755)
		if h.Name == "etc/ssl/certs/ca-certificates.crt" {
			want = 0o644
		}
		if h.Mode != want {
			t.Errorf("%s: mode %o, want %o", h.Name, h.Mode, want)
		}
		names = append(names, h.Name)
	})
	if !sort.StringsAreSorted(names) {
		t.Errorf("layer entries not sorted: %q", names)
	}
	return names, config
}

// eachTarEntry calls f with each entry of the tar stream r and its content.
func eachTarEntry(t *testing.T, r io.Reader, f func(h *tar.Header, data []byte)) {
	t.Helper()
	tr := tar.NewReader(r)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return
		}
		if err != nil {
			t.Fatal(err)
		}
		data, err := io.ReadAll(io.LimitReader(tr, 64<<20))
		if err != nil {
			t.Fatal(err)
		}
		f(h, data)
	}
}
