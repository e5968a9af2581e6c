package k8stest

import (
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"testing"
)

func TestReadCRILogJoinsSplitLines(t *testing.T) {
	path := filepath.Join(t.TempDir(), "0.log")
	data := "2026-11-30T18:03:05.1Z stdout F svid spiffe://example.org/a\n" +
		"2026-11-30T18:03:05.2Z stdout P first half, \n" +
		"2026-11-30T18:03:05.2Z stdout F second half\n" +
		"2026-11-30T18:03:05.3Z stderr F\n" +
		"2026-11-30T18:03:05.4Z stdout P cut off by a restart"
	if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
	got := readCRILog(path)
	want := []string{"svid spiffe://example.org/a", "first half, second half", ""}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("readCRILog = %q, want %q", got, want)
	}
}

func TestUnescapeMountPath(t *testing.T) {
	for in, want := range map[string]string{
		`/tmp/plain`:           "/tmp/plain",
		`/tmp/with\040space`:   "/tmp/with space",
		`/tmp/tab\011and\134b`: "/tmp/tab\tand\\b",
		`/tmp/trailing\04`:     `/tmp/trailing\04`,
	} {
		if got := unescapeMountPath(in); got != want {
			t.Errorf("unescapeMountPath(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestManifestQoSAndSocket(t *testing.T) {
	m := PodSpec{Name: "p", QoS: Guaranteed, Socket: "/run/agent/api.sock", Args: []string{"sleep"}}.Manifest()
	data, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	var pod struct {
		Metadata struct{ Name, Namespace string }
		Spec     struct {
			HostNetwork bool
			Containers  []struct {
				Image, ImagePullPolicy string
				Args                   []string
				Env                    []struct{ Name, Value string }
				Resources              struct{ Requests, Limits map[string]string }
				VolumeMounts           []struct{ MountPath string }
			}
			Volumes []struct {
				HostPath struct{ Path string }
			}
		}
	}
	if err := json.Unmarshal(data, &pod); err != nil {
		t.Fatal(err)
	}
	c := pod.Spec.Containers[0]
	switch {
	case pod.Metadata.Namespace != "default" || !pod.Spec.HostNetwork:
		t.Errorf("namespace %q, hostNetwork %v", pod.Metadata.Namespace, pod.Spec.HostNetwork)
	case c.Image != WorkloadImage || c.ImagePullPolicy != "Never" || !reflect.DeepEqual(c.Args, []string{"sleep"}):
		t.Errorf("container %+v", c)
	case !reflect.DeepEqual(c.Resources.Requests, c.Resources.Limits) || c.Resources.Limits["memory"] == "":
		t.Errorf("Guaranteed resources %+v", c.Resources)
	case len(c.Env) != 1 || c.Env[0].Value != "unix:///run/agent/api.sock":
		t.Errorf("env %+v", c.Env)
	case c.VolumeMounts[0].MountPath != "/run/agent" || pod.Spec.Volumes[0].HostPath.Path != "/run/agent":
		t.Errorf("socket mount %+v, volumes %+v", c.VolumeMounts, pod.Spec.Volumes)
	}
}
