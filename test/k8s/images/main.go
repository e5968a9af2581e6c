// Command ociimage packs static binaries into single-layer images, written as
// one image tarball that `ctr images import` loads: the k8s tests run pods
// without any registry. It lives in its own module so go-containerregistry
// never enters the agent's module.
//
//	ociimage -o images.tar -image lanyard.test/pause:1=/path/to/pause ...
//
// Each image holds its binary at /<base name>, is its entrypoint, and has an
// empty /tmp. Files carry a fixed time, so the same binary gives the same
// image digest.
package main

import (
	"archive/tar"
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

type imageFlags []string

func (f *imageFlags) String() string     { return strings.Join(*f, ",") }
func (f *imageFlags) Set(v string) error { *f = append(*f, v); return nil }

func main() {
	var images imageFlags
	out := flag.String("o", "", "the image tarball to write")
	flag.Var(&images, "image", "REF=BINARY: an image named REF running BINARY (repeatable)")
	flag.Parse()
	if err := run(*out, images); err != nil {
		fmt.Fprintln(os.Stderr, "ociimage:", err)
		os.Exit(1)
	}
}

func run(out string, specs []string) error {
	if out == "" || len(specs) == 0 {
		return errors.New("need -o and at least one -image REF=BINARY")
	}
	refs := make(map[name.Reference]v1.Image, len(specs))
	for _, spec := range specs {
		ref, binary, ok := strings.Cut(spec, "=")
		if !ok {
			return fmt.Errorf("-image %q: want REF=BINARY", spec)
		}
		tag, err := name.NewTag(ref)
		if err != nil {
			return fmt.Errorf("-image %q: %w", spec, err)
		}
		img, err := imageOf(binary)
		if err != nil {
			return fmt.Errorf("-image %q: %w", spec, err)
		}
		refs[tag] = img
	}
	tmp := out + ".tmp"
	if err := tarball.MultiRefWriteToFile(tmp, refs); err != nil {
		os.Remove(tmp)
		return err
	}
	return os.Rename(tmp, out)
}

// fixedTime is every file's and the image's creation time.
var fixedTime = time.Unix(0, 0).UTC()

func imageOf(binary string) (v1.Image, error) {
	data, err := os.ReadFile(binary)
	if err != nil {
		return nil, err
	}
	entry := "/" + filepath.Base(binary)
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	headers := []*tar.Header{
		{Name: "tmp/", Typeflag: tar.TypeDir, Mode: 0o1777, ModTime: fixedTime},
		{Name: entry[1:], Typeflag: tar.TypeReg, Mode: 0o755, Size: int64(len(data)), ModTime: fixedTime},
	}
	for _, h := range headers {
		if err := tw.WriteHeader(h); err != nil {
			return nil, err
		}
	}
	if _, err := tw.Write(data); err != nil {
		return nil, err
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	layerBytes := buf.Bytes()
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerBytes)), nil
	})
	if err != nil {
		return nil, err
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		return nil, err
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cfg = cfg.DeepCopy()
	cfg.Architecture = "amd64"
	cfg.OS = "linux"
	cfg.Created = v1.Time{Time: fixedTime}
	cfg.Config.Entrypoint = []string{entry}
	cfg.Config.Env = []string{"PATH=/"}
	return mutate.ConfigFile(img, cfg)
}
