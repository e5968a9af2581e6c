package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// x509Watcher prints each X.509 context. go-spiffe calls it from the watch
// loop's goroutine; only updates is also read by the first-update timer.
type x509Watcher struct {
	out      io.Writer
	errOut   io.Writer
	addr     string
	limit    int
	stop     context.CancelFunc
	ctx      context.Context
	last     time.Time
	updates  atomic.Int64
	reported string
}

func (w *x509Watcher) OnX509ContextUpdate(xc *workloadapi.X509Context) {
	views := x509Views(xc)
	if err := verifyX509Views(views); err != nil {
		fmt.Fprintf(w.errOut, "ignoring update: %v\n", err)
		return
	}
	n := w.updates.Add(1)
	printX509Views(w.out, views, time.Since(w.last))
	w.last = time.Now()
	if w.limit > 0 && n >= int64(w.limit) {
		w.stop()
	}
}

func (w *x509Watcher) OnX509ContextWatchError(err error) {
	if w.ctx.Err() != nil {
		return // stopping; the cancellation is not news
	}
	msg := describeRPCError("watching X.509-SVIDs", w.addr, 0, err)
	// go-spiffe retries with backoff; say each distinct failure once.
	if msg != w.reported {
		fmt.Fprintln(w.errOut, msg+"; retrying")
		w.reported = msg
	}
}

func runWatch(args []string, stdout, stderr io.Writer) int {
	var f apiFlags
	var count int
	fs := newAPIFlagSet("api watch", "Attaches to the Workload API and prints X.509-SVID updates as they arrive, until interrupted.", stderr, &f,
		"Give up if the first update takes longer than this (0 waits forever)", 0)
	fs.IntVar(&count, "count", 0, "Exit after this many updates (0 runs until SIGINT or SIGTERM)")
	if code, ok := apiParseFlags(fs, args); !ok {
		return code
	}
	if count < 0 {
		return apiUsageError(fs, "-count must not be negative")
	}

	ctx, stopSignals := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stopSignals()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	return withAPIClient(ctx, f.socketPath, stderr, func(client *workloadapi.Client, addr string) int {
		return watchX509(ctx, cancel, client, addr, f, count, stdout, stderr)
	})
}

// watchX509 prints updates until ctx ends, count updates arrived (cancel
// ends the watch), or -timeout passed without a first one.
func watchX509(ctx context.Context, cancel context.CancelFunc, client *workloadapi.Client, addr string, f apiFlags, count int, stdout, stderr io.Writer) int {
	out := stdout
	if f.silent {
		out = io.Discard
	}
	w := &x509Watcher{out: out, errOut: stderr, addr: addr, limit: count, stop: cancel, ctx: ctx, last: time.Now()}

	var timedOut atomic.Bool
	if f.timeout > 0 {
		timer := time.AfterFunc(f.timeout, func() {
			if w.updates.Load() == 0 {
				timedOut.Store(true)
				cancel()
			}
		})
		defer timer.Stop()
	}

	err := client.WatchX509Context(ctx, w)
	if timedOut.Load() {
		// The failures, if any, were printed as they happened.
		fmt.Fprintf(stderr, "no X.509-SVID from the Workload API at %s within %s; giving up (raise -timeout, or 0 to wait forever)\n", addr, f.timeout)
		return 1
	}
	// The loop only ends on its own for errors go-spiffe does not retry.
	if ctx.Err() == nil {
		fmt.Fprintln(stderr, describeRPCError("watching X.509-SVIDs", addr, 0, err))
		return 1
	}
	return 0
}
