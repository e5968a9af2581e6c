// Command pause is the k8s tests' pod sandbox image: it sleeps as the pod's
// first process, reaps the children re-parented to it, and exits on SIGTERM
// or SIGINT. Built static, it needs no registry (REAL-COMPONENTS.md).
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 8)
	// As PID 1 of the pod, a signal without a handler is ignored: handle the
	// ones that stop the pod explicitly.
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for sig := range signals {
		if sig != syscall.SIGCHLD {
			os.Exit(0)
		}
		reap()
	}
}

// reap collects every exited child; SIGCHLD is coalesced, so one signal may
// stand for several.
func reap() {
	for {
		var status syscall.WaitStatus
		pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
		if pid <= 0 || err != nil {
			return
		}
	}
}
