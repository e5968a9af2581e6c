package main

import (
	"context"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// notifyRetry spaces the notifier's attempts to watch its own socket's
// health, which fail only while the Workload API is not yet accepting.
const notifyRetry = 100 * time.Millisecond

// maxNotifyStatus bounds the STATUS= text sent to systemd (a reload error
// can quote the config).
const maxNotifyStatus = 400

// systemdNotifier tells systemd, for a Type=notify unit, when the agent
// serves (READY=1), reloads (RELOADING=1, then READY=1) and stops
// (STOPPING=1). It is built only when systemd gave a NOTIFY_SOCKET.
type systemdNotifier struct {
	socket string // the Workload API socket
	log    hclog.Logger

	mu    sync.Mutex
	ready bool // READY=1 was sent: reloads are reported from then on
}

// newSystemdNotifier returns nil when the agent was not started by systemd
// as a Type=notify service: a nil notifier does nothing.
func newSystemdNotifier(socket string, log hclog.Logger) *systemdNotifier {
	if os.Getenv("NOTIFY_SOCKET") == "" {
		return nil
	}
	return &systemdNotifier{socket: socket, log: log}
}

func (n *systemdNotifier) Name() string { return "systemd-notify" }

// Run sends READY=1 once a client of the Workload API socket sees it
// SERVING, and STOPPING=1 when the agent stops: a unit ordered after
// lanyard.service starts only once it can fetch.
func (n *systemdNotifier) Run(ctx context.Context) error {
	// An error is the agent stopping before it ever served.
	if err := n.awaitServing(ctx); err == nil {
		n.mu.Lock()
		n.ready = true
		n.send(daemon.SdNotifyReady, "serving the Workload API on "+n.socket)
		n.mu.Unlock()
		<-ctx.Done()
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	n.send(daemon.SdNotifyStopping, "stopping")
	return nil
}

// awaitServing watches the socket's gRPC health, as a workload would see
// it, until it is SERVING: the socket is bound before the services start,
// and the health status turns SERVING once the cache is loaded.
func (n *systemdNotifier) awaitServing(ctx context.Context) error {
	conn, err := grpc.NewClient("unix://"+n.socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	health := healthpb.NewHealthClient(conn)
	for {
		if serving, err := watchServing(ctx, health); serving {
			return nil
		} else if ctx.Err() == nil {
			n.log.Debug("Watching the Workload API's health for systemd's readiness", "error", err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(notifyRetry):
		}
	}
}

// watchServing reports whether one health watch saw SERVING.
func watchServing(ctx context.Context, health healthpb.HealthClient) (bool, error) {
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := health.Watch(wctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		return false, err
	}
	for {
		resp, err := stream.Recv()
		if err != nil {
			return false, err
		}
		if resp.Status == healthpb.HealthCheckResponse_SERVING {
			return true, nil
		}
	}
}

// reloading reports a reload starting (SIGHUP). MONOTONIC_USEC is what
// systemd 253 and later ask of RELOADING=1.
func (n *systemdNotifier) reloading() {
	n.whenReady(func() {
		state := daemon.SdNotifyReloading
		var now unix.Timespec
		if unix.ClockGettime(unix.CLOCK_MONOTONIC, &now) == nil {
			state += fmt.Sprintf("\nMONOTONIC_USEC=%d", now.Nano()/1000)
		}
		n.send(state, "reloading the config")
	})
}

// reloaded reports a reload done, whether the new config was applied or
// the previous one stays: the agent serves either way.
func (n *systemdNotifier) reloaded(err error) {
	n.whenReady(func() {
		status := "serving the Workload API on " + n.socket
		if err != nil {
			status += "; the last reload failed: " + err.Error()
		}
		n.send(daemon.SdNotifyReady, status)
	})
}

// whenReady runs report once READY=1 was sent: a reload during the start
// is not systemd's business, and a nil notifier reports nothing.
func (n *systemdNotifier) whenReady(report func()) {
	if n == nil {
		return
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.ready {
		report()
	}
}

// send sends state and a STATUS= line for systemctl status. A failure is
// logged: systemd then times the start or reload out, which says more.
func (n *systemdNotifier) send(state, status string) {
	status = strings.ReplaceAll(status, "\n", " ")
	if len(status) > maxNotifyStatus {
		status = status[:maxNotifyStatus] + "..."
	}
	if _, err := daemon.SdNotify(false, state+"\nSTATUS="+status); err != nil {
		n.log.Error("Could not notify systemd", "state", strings.SplitN(state, "\n", 2)[0], "error", err)
	}
}
