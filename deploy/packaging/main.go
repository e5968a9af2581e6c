// Command mkdeb builds Lanyard's Debian package with nFPM as a library, so
// `make deb` needs neither dpkg-deb nor debhelper. It lives in its own
// module so nFPM's dependencies never enter the agent's module.
//
//	mkdeb -binary bin/deb/lanyard -version 0.3.0+git5.gabc1234 -arch amd64 \
//	  -unit deploy/systemd/lanyard.service -config deploy/systemd/agent.conf \
//	  [-sysusers F] [-tmpfiles F] -mtime 1767225600 -o bin/
//
// It prints the path of the .deb (lanyard_<version>_<arch>.deb in -o). The
// same inputs and -mtime give the same bytes: every file, directory and
// archive member carries that time.
package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"time"

	"github.com/goreleaser/nfpm/v2"
	"github.com/goreleaser/nfpm/v2/deb"
	"github.com/goreleaser/nfpm/v2/files"
)

type options struct {
	binary, unit, config, sysusers, tmpfiles string
	version, arch, out, scripts              string
	mtime                                    int64
}

func main() {
	var o options
	flag.StringVar(&o.binary, "binary", "", "the static lanyard binary, installed as /usr/bin/lanyard")
	flag.StringVar(&o.unit, "unit", "", "the systemd unit, installed as /usr/lib/systemd/system/lanyard.service")
	flag.StringVar(&o.config, "config", "", "the default agent.conf, installed as the conffile /etc/lanyard/agent.conf")
	flag.StringVar(&o.sysusers, "sysusers", "", "optional sysusers.d file, installed as /usr/lib/sysusers.d/lanyard.conf")
	flag.StringVar(&o.tmpfiles, "tmpfiles", "", "optional tmpfiles.d file, installed as /usr/lib/tmpfiles.d/lanyard.conf")
	flag.StringVar(&o.scripts, "scripts", "scripts", "the dir of the maintainer scripts (postinst, prerm, postrm)")
	flag.StringVar(&o.version, "version", "", "the Debian version (build.sh makes it from git describe)")
	flag.StringVar(&o.arch, "arch", "", "GOARCH of the binary (amd64, arm64, ...)")
	flag.StringVar(&o.out, "o", ".", "the dir to write the .deb into")
	flag.Int64Var(&o.mtime, "mtime", 0, "Unix time of every file in the package (SOURCE_DATE_EPOCH)")
	flag.Parse()
	path, err := build(o)
	if err != nil {
		fmt.Fprintln(os.Stderr, "mkdeb:", err)
		os.Exit(1)
	}
	fmt.Println(path)
}

// Package paths. The unit goes under /usr/lib (merged /usr, Debian 12 on),
// the admin's overrides under /etc/systemd/system stay theirs.
const (
	binaryPath   = "/usr/bin/lanyard"
	unitPath     = "/usr/lib/systemd/system/lanyard.service"
	configPath   = "/etc/lanyard/agent.conf"
	sysusersPath = "/usr/lib/sysusers.d/lanyard.conf"
	tmpfilesPath = "/usr/lib/tmpfiles.d/lanyard.conf"
)

// A Debian version: an upstream part that starts with a digit, of
// alphanumerics and . + ~ (no hyphen: no Debian revision, no epoch).
var debVersion = regexp.MustCompile(`^[0-9][A-Za-z0-9.+~]*$`)

func (o options) mtimeTime() time.Time { return time.Unix(o.mtime, 0).UTC() }

func build(o options) (string, error) {
	for name, v := range map[string]string{"-binary": o.binary, "-unit": o.unit, "-config": o.config, "-version": o.version, "-arch": o.arch} {
		if v == "" {
			return "", fmt.Errorf("%s is required", name)
		}
	}
	if !debVersion.MatchString(o.version) {
		return "", fmt.Errorf("-version %q is not a Debian upstream version (digits first; letters, digits, . + ~)", o.version)
	}
	if o.mtime <= 0 {
		return "", errors.New("-mtime must be a positive Unix time (SOURCE_DATE_EPOCH)")
	}
	mtime := o.mtimeTime()
	file := func(src, dst, typ string, mode os.FileMode) *files.Content {
		return &files.Content{Source: src, Destination: dst, Type: typ,
			FileInfo: &files.ContentFileInfo{Owner: "root", Group: "root", Mode: mode, MTime: mtime}}
	}
	contents := files.Contents{
		file(o.binary, binaryPath, files.TypeFile, 0o755),
		file(o.unit, unitPath, files.TypeFile, 0o644),
		// A conffile: dpkg keeps the admin's edits on upgrade and asks
		// before replacing them.
		file(o.config, configPath, files.TypeConfig, 0o644),
	}
	if o.sysusers != "" {
		contents = append(contents, file(o.sysusers, sysusersPath, files.TypeFile, 0o644))
	}
	if o.tmpfiles != "" {
		contents = append(contents, file(o.tmpfiles, tmpfilesPath, files.TypeFile, 0o644))
	}
	for _, c := range contents {
		if _, err := os.Stat(c.Source); err != nil {
			return "", err
		}
	}
	script := func(name string) string { return filepath.Join(o.scripts, name) }
	info := &nfpm.Info{
		Name:          "lanyard",
		Arch:          o.arch,
		Platform:      "linux",
		Version:       o.version,
		VersionSchema: "none", // build.sh made it a Debian version already
		Section:       "net",
		Priority:      "optional",
		Maintainer:    "Lanyard developers <lanyard@lanyard.dev>",
		Description: "SPIFFE Workload API node agent\n" +
			"Lanyard serves the SPIFFE Workload API on a Unix socket: it identifies each\n" +
			"calling process (Unix user, systemd unit, container) and hands it its\n" +
			"X.509 and JWT SVIDs. A drop-in for spire-agent.",
		Homepage: "https://github.com/lanyard-dev/lanyard",
		License:  "Apache-2.0",
		MTime:    mtime,
		Overridables: nfpm.Overridables{
			// The unit's ExecReload runs /bin/kill, which is procps' on
			// Debian; the binary itself is static.
			Depends:  []string{"procps"},
			Contents: contents,
			Scripts: nfpm.Scripts{
				PostInstall: script("postinst"),
				PreRemove:   script("prerm"),
				PostRemove:  script("postrm"),
			},
		},
	}
	info = nfpm.WithDefaults(info)
	if err := nfpm.PrepareForPackager(info, "deb"); err != nil {
		return "", err
	}
	packager := deb.Default
	path := filepath.Join(o.out, packager.ConventionalFileName(info))
	tmp, err := os.CreateTemp(o.out, ".lanyard-deb-*")
	if err != nil {
		return "", err
	}
	defer os.Remove(tmp.Name()) // after the rename, a no-op
	if err := packager.Package(info, tmp); err != nil {
		tmp.Close()
		return "", err
	}
	if err := tmp.Chmod(0o644); err != nil {
		tmp.Close()
		return "", err
	}
	if err := tmp.Close(); err != nil {
		return "", err
	}
	return path, os.Rename(tmp.Name(), path)
}
