// Command workload is the k8s tests' pod workload: it fetches its X509-SVID
// from the Workload API at SPIFFE_ENDPOINT_SOCKET, over and over, and logs one
// line per attempt:
//
//	svid spiffe://example.org/ns/default/sa/default
//	error <the error>
//
// With the single argument "sleep" it only sleeps until told to stop.
// Environment: WORKLOAD_INTERVAL (a Go duration between attempts, default
// 500ms) and WORKLOAD_TIMEOUT (each attempt's deadline, default 5s).
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

func main() {
	// As PID 1 of its container, SIGTERM has no effect unless handled.
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if len(os.Args) == 2 && os.Args[1] == "sleep" {
		<-ctx.Done()
		return
	}
	if len(os.Args) > 1 {
		fmt.Fprintln(os.Stderr, "usage: workload [sleep]")
		os.Exit(2)
	}
	interval := durationEnv("WORKLOAD_INTERVAL", 500*time.Millisecond)
	timeout := durationEnv("WORKLOAD_TIMEOUT", 5*time.Second)
	for {
		fetchOnce(ctx, timeout)
		select {
		case <-ctx.Done():
			return
		case <-time.After(interval):
		}
	}
}

// fetchOnce dials afresh every time, so each attempt is a new attestation.
func fetchOnce(ctx context.Context, timeout time.Duration) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	svid, err := workloadapi.FetchX509SVID(ctx)
	if err != nil {
		fmt.Printf("error %v\n", err)
		return
	}
	fmt.Printf("svid %s\n", svid.ID)
}

func durationEnv(name string, def time.Duration) time.Duration {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	d, err := time.ParseDuration(v)
	if err != nil || d <= 0 {
		fmt.Fprintf(os.Stderr, "workload: %s=%q is not a positive duration\n", name, v)
		os.Exit(2)
	}
	return d
}
