package docker

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const (
	dockerHereID = "5f38ff5a692590d33c5b6bf887ec48487ffd17b91c6a38c90da26d2ad8cc5868"
	podmanHereID = "53e8168b67a9531fb329d0041f276d438d65c45fb680183c9f47d2b82c83bf27"
	constructed  = "1f1d6e2d4940ddac13abd421a2617992bf89f0e0f9a902ed58278c5f843e9ae7"
)

// TestLocateFiles runs the new locator over every file in testdata/cgroup
// (SOURCES.md says where each comes from).
func TestLocateFiles(t *testing.T) {
	want := map[string]struct {
		id, prefix string // id "" means no container
		err        string
	}{
		"here-docker-cgroupfs-hybrid.txt":    {id: dockerHereID, prefix: "/docker/" + dockerHereID},
		"here-podman-cgroupfs-hybrid.txt":    {id: podmanHereID, prefix: "/libpod_parent/libpod-" + podmanHereID},
		"here-host-process.txt":              {},
		"here-podman-conmon.txt":             {},
		"k8s-neuvector-docker-no-pod-v1.txt": {id: "4f797c539e6c745de61a93ca3ff892358ecbcaccd8414d5db545c38428142970", prefix: "/4f797c539e6c745de61a93ca3ff892358ecbcaccd8414d5db545c38428142970"},
		"k8s-neuvector-docker-no-pod-systemd-v1.txt": {
			id: "9ec39b91f3d70e1beff50a308f77067065ea6be0d91a3378375056cd4422cf3d", prefix: "/system.slice/docker-9ec39b91f3d70e1beff50a308f77067065ea6be0d91a3378375056cd4422cf3d.scope",
		},
		"k8s-neuvector-docker-sibling-no-pod-v2.txt": {
			id: "1f1d6e2d4940ddac13abd421a2617992bf89f0e0f9a902ed58278c5f843e9ae7", prefix: "/../docker-1f1d6e2d4940ddac13abd421a2617992bf89f0e0f9a902ed58278c5f843e9ae7.scope",
		},
		// The outer container: the one the host's engine runs.
		"k8s-neuvector-docker-in-docker-no-pod-v1.txt": {
			id: "a9a5ad238e59234193ee7ec3fcff5e735b3708ea1068826952255b69e3cfa413", prefix: "/docker/a9a5ad238e59234193ee7ec3fcff5e735b3708ea1068826952255b69e3cfa413",
		},
		"k8s-spire-kind-docker-prefix-v1.txt": {
			id: "93529524695bb00d91c1f6dba692ea8d3550c3b94fb2463af7bc9ec82f992d26", prefix: "/docker/93529524695bb00d91c1f6dba692ea8d3550c3b94fb2463af7bc9ec82f992d26",
		},
		"k8s-neuvector-docker-k8s-relative-v2.txt": {
			id:     "2cc65c162ca1388b6b8d5ccfb701d22fc96675ccf8b2f1590c490c2c4039547f",
			prefix: "/../../kubepods-besteffort-podfd698699_eabf_4c23_92ef_cf0bbdb78261.slice/docker-2cc65c162ca1388b6b8d5ccfb701d22fc96675ccf8b2f1590c490c2c4039547f.scope",
		},
		// A containerd container: found, and the engine will not know it.
		"k8s-kubelet-containerd-besteffort-api.txt": {id: "*"},
		// CRI-O's and Podman's monitors run beside their container.
		"k8s-issue4088-crio-conmon-system-slice-v1.txt": {},
		"constructed-podman-conmon-systemd-v2.txt":      {},
		"constructed-podman-systemd-crun-v2.txt":        {id: constructed, prefix: "/machine.slice/libpod-" + constructed + ".scope"},
		// Found here; checkSameContainer refuses them (TestCheckSameContainer).
		"k8s-here-forged-user-delegation.txt":      {id: "176135ed433463aedb1e12c9251619033c8da1736090880c36426853b43089e3", prefix: "*"},
		"constructed-user-delegated-docker-v2.txt": {id: constructed, prefix: "/user.slice/user-1000.slice/user@1000.service/app.slice/docker-" + constructed + ".scope"},
		"constructed-nested-privileged.txt":        {id: constructed, prefix: "/docker/" + constructed},
		"constructed-two-containers.txt":           {err: "two containers"},
		"constructed-uppercase-id.txt":             {},
		"constructed-id-with-suffix.txt":           {},
		"constructed-id-glued-prefix.txt":          {},
		"constructed-malformed.txt":                {err: "malformed cgroup line"},
	}
	files, err := filepath.Glob("testdata/cgroup/*.txt")
	if err != nil {
		t.Fatal(err)
	}
	sources, err := os.ReadFile("testdata/cgroup/SOURCES.md")
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		name := filepath.Base(f)
		t.Run(name, func(t *testing.T) {
			w, ok := want[name]
			if !ok {
				t.Fatalf("%s has no expectation in this test", name)
			}
			if !strings.Contains(string(sources), "`"+name+"`") {
				t.Errorf("%s is not described in testdata/cgroup/SOURCES.md", name)
			}
			data, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			m, found, err := locate(data, findContainer)
			switch {
			case w.err != "":
				if err == nil || !strings.Contains(err.Error(), w.err) {
					t.Fatalf("err = %v, want one containing %q", err, w.err)
				}
				return
			case err != nil:
				t.Fatal(err)
			case found != (w.id != ""):
				t.Fatalf("found = %v (%q), want %v", found, m.id, w.id != "")
			case w.id != "" && w.id != "*" && m.id != w.id:
				t.Errorf("id = %s, want %s", m.id, w.id)
			}
			for _, cg := range m.cgroups {
				if w.prefix != "*" && w.prefix != "" && cg.path != w.prefix {
					t.Errorf("container cgroup in %s = %s, want %s", cg.hierarchy, cg.path, w.prefix)
				}
			}
		})
	}
	if len(files) != len(want) {
		t.Errorf("%d files in testdata/cgroup, %d expectations", len(files), len(want))
	}
}

func TestLocateLimit(t *testing.T) {
	line := "0::/docker/" + dockerHereID + "\n"
	data := []byte(strings.Repeat(line, maxCgroupFileSize/len(line)))
	if _, found, err := locate(data, findContainer); err != nil || !found {
		t.Fatalf("%d bytes: found %v, err %v", len(data), found, err)
	}
	data = append(data, line...)
	if _, _, err := locate(data, findContainer); err == nil {
		t.Fatalf("%d bytes accepted, want refused", len(data))
	}
}

func TestCheckSameContainer(t *testing.T) {
	hybrid := func(path string) string {
		return "4:memory:" + path + "\n1:name=systemd:" + path + "\n0::" + path + "\n"
	}
	caller := hybrid("/docker/" + constructed)
	for _, tc := range []struct {
		name, caller, init string
		ok                 bool
	}{
		{"same cgroup", caller, caller, true},
		{"first process below it (systemd inside)", caller, hybrid("/docker/" + constructed + "/init.scope"), true},
		{"forged under a user's delegated tree", "0::/user.slice/user-1000.slice/user@1000.service/app.slice/docker-" + constructed + ".scope\n",
			"0::/system.slice/docker-" + constructed + ".scope\n", false},
		{"a sibling whose name starts the same", caller, hybrid("/docker/" + constructed + "x"), false},
		{"hierarchy missing in the first process", caller, "0::/docker/" + constructed + "\n", false},
		{"first process elsewhere", caller, hybrid("/"), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, found, err := locate([]byte(tc.caller), findContainer)
			if err != nil || !found {
				t.Fatalf("locate: found %v, err %v", found, err)
			}
			err = checkSameContainer([]byte(tc.init), m)
			if (err == nil) != tc.ok {
				t.Fatalf("err = %v, want ok %v", err, tc.ok)
			}
		})
	}
}

func TestMatchers(t *testing.T) {
	m, err := newMatcherSet([]string{"/docker/<id>", "/my.slice/*/<id>/*"})
	if err != nil {
		t.Fatal(err)
	}
	for path, want := range map[string]string{
		"/docker/abc":        "abc",
		"/my.slice/x/abc/y":  "abc",
		"/my.slice/x/abc":    "",
		"/docker/abc/nested": "",
		"/system.slice/abc":  "",
	} {
		id, _, found := m.find(path)
		if found != (want != "") || id != want {
			t.Errorf("find(%q) = %q, %v; want %q", path, id, found, want)
		}
	}
	for _, path := range []string{"/docker/..", "/docker/a%2fb", "/docker/-x", "/docker/"} {
		_, _, err := locate([]byte("0::"+path+"\n"), m.find)
		if err == nil || !strings.Contains(err.Error(), "no container ID") {
			t.Errorf("%s: err %v, want the captured ID refused", path, err)
		}
	}
	for _, bad := range [][]string{
		{"/a/b/<id>", "/*/b/<id>"},
		{"/a/<id>/<id>"},
		{"/a/b"},
	} {
		if _, err := newMatcherSet(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}
