package main

import (
	"archive/tar"
	"bytes"
	"fmt"
	"io"
	"os"
	"path"
	"sort"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// fixedTime is every file's and every image's creation time: the epoch, as
// SOURCE_DATE_EPOCH=0 builds do.
var fixedTime = time.Unix(0, 0).UTC()

// layerFile is one entry of a layer: a file read from src, or a directory.
type layerFile struct {
	dest string // absolute path in the image
	src  string
	mode int64
	dir  bool
}

// buildImage makes a single-layer image of files for linux/arch.
func buildImage(files []layerFile, cfg imageConfig, arch string) (v1.Image, error) {
	data, err := layerTar(files)
	if err != nil {
		return nil, err
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(data)), nil
	})
	if err != nil {
		return nil, err
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		return nil, err
	}
	file, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	file = file.DeepCopy()
	file.Architecture = arch
	file.OS = "linux"
	file.Created = v1.Time{Time: fixedTime}
	file.Config.Entrypoint = cfg.Entrypoint
	file.Config.Cmd = cfg.Cmd
	file.Config.User = cfg.User
	file.Config.Env = cfg.Env
	if len(cfg.Labels) > 0 {
		file.Config.Labels = make(map[string]string, len(cfg.Labels))
		for _, kv := range cfg.Labels {
			k, v, ok := strings.Cut(kv, "=")
			if !ok || k == "" {
				return nil, fmt.Errorf("-label %q: want KEY=VALUE", kv)
			}
			file.Config.Labels[k] = v
		}
	}
	return mutate.ConfigFile(img, file)
}

// layerTar is the layer's uncompressed tar: the files and their parent
// directories (0755), sorted by path, owned by 0:0, all at fixedTime.
func layerTar(files []layerFile) ([]byte, error) {
	entries := map[string]layerFile{}
	for _, f := range files {
		p := strings.TrimPrefix(path.Clean(f.dest), "/")
		if p == "" || p == "." {
			return nil, fmt.Errorf("%q: not a file path", f.dest)
		}
		if _, dup := entries[p]; dup {
			return nil, fmt.Errorf("%s given twice", f.dest)
		}
		entries[p] = f
		for d := path.Dir(p); d != "."; d = path.Dir(d) {
			if e, ok := entries[d]; ok && !e.dir {
				return nil, fmt.Errorf("%s is a file and a directory", d)
			}
			if _, ok := entries[d]; !ok {
				entries[d] = layerFile{dest: "/" + d, dir: true, mode: 0o755}
			}
		}
	}
	names := make([]string, 0, len(entries))
	for p := range entries {
		names = append(names, p)
	}
	sort.Strings(names)
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, p := range names {
		f := entries[p]
		h := &tar.Header{Name: p, Mode: f.mode, ModTime: fixedTime, Format: tar.FormatPAX}
		var data []byte
		if f.dir {
			h.Typeflag, h.Name = tar.TypeDir, p+"/"
		} else {
			var err error
			if data, err = os.ReadFile(f.src); err != nil {
				return nil, err
			}
			h.Typeflag, h.Size = tar.TypeReg, int64(len(data))
		}
		if err := tw.WriteHeader(h); err != nil {
			return nil, err
		}
		if _, err := tw.Write(data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}
