// Command workload is the k8s tests' pod workload: it fetches its X509-SVID
// from the Workload API at SPIFFE_ENDPOINT_SOCKET, over and over, and logs one
// line per attempt: the default SVID's ID, then the others' sorted, or the
// error:
//
//	svid spiffe://example.org/ns/default/sa/default spiffe://example.org/web
//	error <the error>
//
// With the single argument "sleep" it only sleeps until told to stop; with
// "exit" it exits at once (an init container). With "mtls-peer DIR ID" it
// holds an X509Source and talks mTLS to its peers (see mtls.go).
// Environment: WORKLOAD_INTERVAL (a Go duration between attempts, default
// 500ms) and WORKLOAD_TIMEOUT (each attempt's deadline, default 5s).
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"sort"
	"strings"
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
	if len(os.Args) == 2 && os.Args[1] == "exit" {
		return
	}
	if len(os.Args) == 4 && os.Args[1] == "mtls-peer" {
		if err := mtlsPeer(ctx, os.Args[2], os.Args[3]); err != nil {
			fmt.Fprintln(os.Stderr, "workload:", err)
			os.Exit(1)
		}
		return
	}
	if len(os.Args) > 1 {
		fmt.Fprintln(os.Stderr, "usage: workload [sleep|exit|mtls-peer DIR SPIFFE-ID]")
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
	svids, err := workloadapi.FetchX509SVIDs(ctx)
	if err != nil {
		fmt.Printf("error %v\n", err)
		return
	}
	others := make([]string, 0, len(svids)-1)
	for _, s := range svids[1:] {
		others = append(others, s.ID.String())
	}
	sort.Strings(others)
	fmt.Println(strings.Join(append([]string{"svid", svids[0].ID.String()}, others...), " "))
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
