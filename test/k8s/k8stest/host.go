package k8stest

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// ContainerPIDs are the host PIDs of the pod's containers' first processes,
// by container name, as containerd reports its tasks.
func (c *Cluster) ContainerPIDs(pod *Pod) map[string]int {
	c.t.Helper()
	out, err := c.ctr(30*time.Second, "tasks", "ls")
	if err != nil {
		c.t.Fatalf("k8stest: listing containerd tasks: %v", err)
	}
	// TASK  PID  STATUS
	tasks := map[string]int{}
	for _, line := range strings.Split(out, "\n")[1:] {
		f := strings.Fields(line)
		if len(f) == 3 && f[2] == "RUNNING" {
			if pid, err := strconv.Atoi(f[1]); err == nil {
				tasks[f[0]] = pid
			}
		}
	}
	pids := map[string]int{}
	for _, ctr := range pod.Containers {
		pid, ok := tasks[ctr.ID]
		if !ok {
			c.t.Fatalf("k8stest: container %s (%s) of pod %s/%s has no running task", ctr.Name, ctr.ID, pod.Namespace, pod.Name)
		}
		pids[ctr.Name] = pid
	}
	return pids
}

// Logs are the lines a container of the pod wrote so far (stdout and
// stderr), from the kubelet's log files.
func (c *Cluster) Logs(pod *Pod, container string) []string {
	c.t.Helper()
	dir := filepath.Join(c.podLogs, pod.Namespace+"_"+pod.Name+"_"+pod.UID, container)
	files, _ := filepath.Glob(filepath.Join(dir, "*.log"))
	var lines []string
	for _, f := range files { // 0.log, 1.log, ...: one per restart, in order for < 10
		lines = append(lines, readCRILog(f)...)
	}
	return lines
}

// readCRILog reads a CRI log file: "<time> <stream> <P|F> <text>" lines,
// P marking a line the runtime split.
func readCRILog(path string) []string {
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	var lines []string
	var partial strings.Builder
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		parts := strings.SplitN(sc.Text(), " ", 4)
		if len(parts) < 3 {
			continue
		}
		text := ""
		if len(parts) == 4 {
			text = parts[3]
		}
		partial.WriteString(text)
		if parts[2] == "F" {
			lines = append(lines, partial.String())
			partial.Reset()
		}
	}
	return lines
}

// WaitLog waits until a container of the pod writes a line for which match
// holds, and returns that line.
func (c *Cluster) WaitLog(pod *Pod, container string, match func(line string) bool) string {
	c.t.Helper()
	var found string
	err := c.poll(podTimeout, func(context.Context) error {
		lines := c.Logs(pod, container)
		for _, l := range lines {
			if match(l) {
				found = l
				return nil
			}
		}
		if len(lines) == 0 {
			return fmt.Errorf("no output yet")
		}
		return fmt.Errorf("no matching line; last: %q", lines[len(lines)-1])
	})
	if err != nil {
		c.t.Fatalf("k8stest: waiting for a log line of %s/%s %s: %v", pod.Namespace, pod.Name, container, err)
	}
	return found
}
