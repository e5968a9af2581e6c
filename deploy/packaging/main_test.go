package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// inputs writes stand-ins for the package's files into a temp dir.
func inputs(t *testing.T) options {
	t.Helper()
	dir := t.TempDir()
	write := func(name, data string, mode os.FileMode) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(data), mode); err != nil {
			t.Fatal(err)
		}
		return p
	}
	out := filepath.Join(dir, "out")
	if err := os.Mkdir(out, 0o755); err != nil {
		t.Fatal(err)
	}
	return options{
		binary:   write("lanyard", "#!/bin/sh\n", 0o755),
		unit:     write("lanyard.service", "[Service]\n", 0o644),
		config:   write("agent.conf", "agent {}\n", 0o600),
		sysusers: write("sysusers.conf", "u lanyard -\n", 0o644),
		tmpfiles: write("tmpfiles.conf", "d /run/lanyard 0755\n", 0o644),
		scripts:  "scripts",
		version:  "0.3.0+git5.gabc1234",
		arch:     "amd64",
		out:      out,
		mtime:    1764000000,
	}
}

func buildBytes(t *testing.T, o options) []byte {
	t.Helper()
	path, err := build(o)
	if err != nil {
		t.Fatal(err)
	}
	if want := filepath.Join(o.out, "lanyard_0.3.0+git5.gabc1234_amd64.deb"); path != want {
		t.Fatalf("path %s, want %s", path, want)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func TestSameInputsSameBytes(t *testing.T) {
	o := inputs(t)
	first := buildBytes(t, o)
	// Other file times on disk do not matter: every file gets -mtime.
	for _, p := range []string{o.binary, o.unit, o.config} {
		if err := os.Chtimes(p, o.mtimeTime().AddDate(1, 0, 0), o.mtimeTime().AddDate(1, 0, 0)); err != nil {
			t.Fatal(err)
		}
	}
	if second := buildBytes(t, o); !bytes.Equal(first, second) {
		t.Fatal("two builds of the same inputs differ")
	}
	o.mtime++
	if third := buildBytes(t, o); bytes.Equal(first, third) {
		t.Fatal("another -mtime gave the same bytes")
	}
	if entries, _ := os.ReadDir(o.out); len(entries) != 1 {
		t.Fatalf("out dir holds %d entries, want only the .deb", len(entries))
	}
}

func TestRefusals(t *testing.T) {
	for name, change := range map[string]func(*options){
		"a version with a hyphen":      func(o *options) { o.version = "0.3.0-5-gabc" },
		"a version starting with v":    func(o *options) { o.version = "v0.3.0" },
		"no mtime":                     func(o *options) { o.mtime = 0 },
		"no config":                    func(o *options) { o.config = "" },
		"a missing unit file":          func(o *options) { o.unit += ".missing" },
		"a missing maintainer scripts": func(o *options) { o.scripts = "nowhere" },
	} {
		t.Run(name, func(t *testing.T) {
			o := inputs(t)
			change(&o)
			if path, err := build(o); err == nil {
				t.Fatalf("built %s", path)
			}
			if entries, _ := os.ReadDir(o.out); len(entries) != 0 {
				t.Fatalf("a failed build left %d entries in the out dir", len(entries))
			}
		})
	}
}

// The maintainer scripts parse as POSIX sh (dash runs them on Debian).
func TestScriptsParse(t *testing.T) {
	for _, name := range []string{"postinst", "prerm", "postrm"} {
		path := filepath.Join("scripts", name)
		if out, err := exec.Command("sh", "-n", path).CombinedOutput(); err != nil {
			t.Errorf("sh -n %s: %v\n%s", path, err, out)
		}
		info, err := os.Stat(path)
		if err != nil || info.Mode()&0o111 == 0 {
			t.Errorf("%s: want an executable file (%v)", path, err)
		}
	}
}
