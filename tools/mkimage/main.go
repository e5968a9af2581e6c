// Command mkimage writes container images without a daemon or a registry:
// single-layer images of local files, packed into one docker-archive
// tarball that `docker load` and `ctr images import` both accept. It is
// reproducible: every file has a fixed time, owner and mode, entries are
// sorted, and the image's creation time is fixed, so the same files give
// the same digests. It lives in its own module so go-containerregistry
// never enters the agent's.
//
// `make image` builds Lanyard's image as the Dockerfile does:
//
//	mkimage -o bin/lanyard-image.tar -tag ghcr.io/lanyard-dev/lanyard:dev \
//	  -file /lanyard=bin/lanyard:0755 \
//	  -file /etc/ssl/certs/ca-certificates.crt=/etc/ssl/certs/ca-certificates.crt:0644 \
//	  -user 0:0 -entrypoint '["/lanyard","run"]' -cmd '["-config","/etc/lanyard/agent.conf"]' \
//	  -label org.opencontainers.image.version=v1.2.3
//
// The k8s tests pack their static programs, one image per binary, which
// runs it from /<base name> and has an empty /tmp:
//
//	mkimage -o images.tar -image lanyard.test/pause:1=/path/to/pause ...
//
// It prints each tag with its image ID (the config's digest, what `docker
// images` and `ctr images ls` show) and its manifest's digest.
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path"
	"runtime"
	"sort"
	"strconv"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

type listFlag []string

func (f *listFlag) String() string     { return strings.Join(*f, ",") }
func (f *listFlag) Set(v string) error { *f = append(*f, v); return nil }

type jsonList []string

func (l *jsonList) String() string { b, _ := json.Marshal(*l); return string(b) }
func (l *jsonList) Set(v string) error {
	var list []string
	if err := json.Unmarshal([]byte(v), &list); err != nil {
		return fmt.Errorf("want a JSON array of strings: %w", err)
	}
	*l = list
	return nil
}

func main() {
	var opts options
	flag.StringVar(&opts.out, "o", "", "the image tarball to write")
	flag.Var(&opts.simple, "image", "REF=BINARY: an image named REF running BINARY (repeatable)")
	flag.StringVar(&opts.tag, "tag", "", "the name of the image made of the -file flags")
	flag.Var(&opts.files, "file", "DEST=SRC[:MODE]: put the file SRC at DEST (repeatable; MODE octal, default 0644)")
	flag.Var(&opts.config.Entrypoint, "entrypoint", "the image's entrypoint, a JSON array")
	flag.Var(&opts.config.Cmd, "cmd", "the image's command, a JSON array")
	flag.StringVar(&opts.config.User, "user", "", "the image's user (uid:gid)")
	flag.Var(&opts.config.Labels, "label", "KEY=VALUE: an image label (repeatable)")
	flag.Var(&opts.config.Env, "env", "KEY=VALUE: an environment variable (repeatable)")
	flag.StringVar(&opts.arch, "arch", runtime.GOARCH, "the image's architecture (its binaries' GOARCH)")
	flag.Parse()
	if flag.NArg() > 0 {
		fail(fmt.Errorf("unexpected arguments %q", flag.Args()))
	}
	if err := run(opts, os.Stdout); err != nil {
		fail(err)
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "mkimage:", err)
	os.Exit(1)
}

type options struct {
	out    string
	simple listFlag
	tag    string
	files  listFlag
	config imageConfig
	arch   string
}

// imageConfig is what the image runs, as a Dockerfile's USER, ENTRYPOINT,
// CMD, LABEL and ENV say.
type imageConfig struct {
	Entrypoint, Cmd jsonList
	User            string
	Labels, Env     listFlag
}

func run(o options, stdout io.Writer) error {
	if o.out == "" || (len(o.simple) == 0 && o.tag == "") {
		return errors.New("need -o, and -tag with -file flags or at least one -image REF=BINARY")
	}
	if o.tag == "" && len(o.files) > 0 {
		return errors.New("-file needs -tag")
	}
	images := make(map[name.Reference]v1.Image)
	add := func(ref string, files []layerFile, cfg imageConfig) error {
		tag, err := name.NewTag(ref, name.StrictValidation)
		if err != nil {
			return err
		}
		if _, dup := images[tag]; dup {
			return fmt.Errorf("image %s named twice", ref)
		}
		img, err := buildImage(files, cfg, o.arch)
		if err != nil {
			return fmt.Errorf("image %s: %w", ref, err)
		}
		images[tag] = img
		return nil
	}
	if o.tag != "" {
		files, err := parseFiles(o.files)
		if err != nil {
			return err
		}
		if err := add(o.tag, files, o.config); err != nil {
			return err
		}
	}
	for _, spec := range o.simple {
		ref, binary, ok := strings.Cut(spec, "=")
		if !ok {
			return fmt.Errorf("-image %q: want REF=BINARY", spec)
		}
		entry := "/" + path.Base(binary)
		files := []layerFile{{dest: entry, src: binary, mode: 0o755}, {dest: "/tmp", dir: true, mode: 0o1777}}
		cfg := imageConfig{Entrypoint: []string{entry}, Env: []string{"PATH=/"}}
		if err := add(ref, files, cfg); err != nil {
			return fmt.Errorf("-image %q: %w", spec, err)
		}
	}
	tmp := o.out + ".tmp"
	if err := tarball.MultiRefWriteToFile(tmp, images); err != nil {
		os.Remove(tmp)
		return err
	}
	if err := os.Rename(tmp, o.out); err != nil {
		return err
	}
	return report(stdout, images)
}

// report prints each image's tag, ID and manifest digest, sorted by tag.
func report(w io.Writer, images map[name.Reference]v1.Image) error {
	refs := make([]name.Reference, 0, len(images))
	for ref := range images {
		refs = append(refs, ref)
	}
	sort.Slice(refs, func(i, j int) bool { return refs[i].Name() < refs[j].Name() })
	for _, ref := range refs {
		id, err := images[ref].ConfigName()
		if err != nil {
			return err
		}
		digest, err := images[ref].Digest()
		if err != nil {
			return err
		}
		fmt.Fprintf(w, "%s id %s manifest %s\n", ref.Name(), id, digest)
	}
	return nil
}

// parseFiles reads -file DEST=SRC[:MODE] flags.
func parseFiles(specs []string) ([]layerFile, error) {
	files := make([]layerFile, 0, len(specs))
	for _, spec := range specs {
		dest, src, ok := strings.Cut(spec, "=")
		if !ok || !path.IsAbs(dest) || src == "" {
			return nil, fmt.Errorf("-file %q: want /DEST=SRC[:MODE]", spec)
		}
		mode := int64(0o644)
		if i := strings.LastIndexByte(src, ':'); i >= 0 {
			m, err := strconv.ParseInt(src[i+1:], 8, 32)
			if err != nil {
				return nil, fmt.Errorf("-file %q: mode: %w", spec, err)
			}
			src, mode = src[:i], m
		}
		files = append(files, layerFile{dest: dest, src: src, mode: mode})
	}
	return files, nil
}
