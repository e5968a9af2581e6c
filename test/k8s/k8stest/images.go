package k8stest

import (
	"fmt"
	"path/filepath"
	"time"
)

// buildTimeout bounds building the two small static programs (seconds when
// the build cache is warm).
const buildTimeout = 5 * time.Minute

// buildImages builds the pause and workload programs static and packs them
// into one image tarball (images/images.tar): no registry is reachable.
func (c *Cluster) buildImages() error {
	out := filepath.Join(c.Dir, "images")
	src, err := findK8sDir()
	if err != nil {
		return err
	}
	static := []string{"CGO_ENABLED=0"}
	if _, err := runTool(buildTimeout, src, static, "go", "build", "-trimpath", "-o", out+"/",
		"./pause", "./workload"); err != nil {
		return err
	}
	_, err = runTool(time.Minute, out, nil, filepath.Join(c.bin, "mkimage"),
		"-o", filepath.Join(out, "images.tar"),
		"-image", PauseImage+"="+filepath.Join(out, "pause"),
		"-image", WorkloadImage+"="+filepath.Join(out, "workload"),
		"-image", WorkloadImageAlias+"="+filepath.Join(out, "workload"))
	return err
}

// importImages loads the image tarball into containerd's k8s.io namespace,
// where the kubelet's CRI finds them.
func (c *Cluster) importImages() error {
	tar := filepath.Join(c.Dir, "images", "images.tar")
	if _, err := c.ctr(time.Minute, "images", "import", tar); err != nil {
		return fmt.Errorf("importing the images: %w", err)
	}
	return nil
}

// ctr runs containerd's CLI against this cluster's containerd.
func (c *Cluster) ctr(bound time.Duration, args ...string) (string, error) {
	return runTool(bound, c.Dir, nil, "ctr", append([]string{"--address", c.ctrAddr, "--namespace", "k8s.io"}, args...)...)
}
