package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// runHealthcheck handles `lanyard healthcheck [-socketPath P] [-shallow] [-verbose]`.
// It asks the gRPC health service that the agent serves beside the Workload
// API on the same socket.
func runHealthcheck(args []string, stdout, stderr io.Writer) int {
	var socketPath string
	var verbose bool
	var timeout time.Duration
	fs := flag.NewFlagSet("healthcheck", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(stderr, "Usage: lanyard healthcheck [flags]\n\nDetermines agent health status.\n\nFlags:\n")
		fs.PrintDefaults()
	}
	fs.StringVar(&socketPath, "socketPath", apiDefaultSocket(),
		apiSocketHelp)
	fs.Bool("shallow", false, "Accepted for spire-agent compatibility; the check is the same")
	fs.BoolVar(&verbose, "verbose", false, "Print verbose information")
	fs.DurationVar(&timeout, "timeout", apiDefaultTimeout, "Time to wait for the agent's answer")
	if code, ok := apiParseFlags(fs, args); !ok {
		return code
	}
	if err := checkHealth(socketPath, timeout, verbose, stdout); err != nil {
		fmt.Fprintf(stderr, "Agent is unhealthy: %v\n", err)
		return 1
	}
	fmt.Fprintln(stdout, "Agent is healthy.")
	return 0
}

func checkHealth(socketPath string, timeout time.Duration, verbose bool, stdout io.Writer) error {
	addr, err := workloadAddress(socketPath)
	if err != nil {
		return err
	}
	if verbose {
		fmt.Fprintf(stdout, "Checking agent health at %s...\n", addr)
	}
	target, err := workloadapi.TargetFromAddress(addr)
	if err != nil {
		return fmt.Errorf("invalid Workload API address %q: %v", addr, err)
	}
	if strings.HasPrefix(addr, "tcp:") {
		// An ip:port needs no resolver; passthrough avoids a DNS lookup.
		target = "passthrough:///" + target
	}
	conn, err := grpc.NewClient(target, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return fmt.Errorf("cannot set up a client for %s: %v", addr, err)
	}
	defer conn.Close()

	ctx := context.Background()
	if timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, timeout)
		defer cancel()
	}
	// The agent's interceptors demand the Workload API header on every call.
	ctx = metadata.AppendToOutgoingContext(ctx, "workload.spiffe.io", "true")
	resp, err := grpc_health_v1.NewHealthClient(conn).Check(ctx, &grpc_health_v1.HealthCheckRequest{})
	if err != nil {
		st, _ := status.FromError(err)
		switch st.Code() {
		case codes.Unavailable:
			return fmt.Errorf("cannot reach the agent at %s: %s; is it running? %s", addr, st.Message(), apiSocketHint)
		case codes.DeadlineExceeded:
			return fmt.Errorf("no answer from the agent at %s within %s", addr, timeout)
		case codes.Unimplemented:
			return fmt.Errorf("the endpoint at %s does not offer the gRPC health service (%s); is it a lanyard agent?", addr, st.Message())
		case codes.NotFound:
			return errors.New("the agent does not report an overall health status")
		}
		return fmt.Errorf("health check at %s failed: %v", addr, err)
	}
	if resp.GetStatus() != grpc_health_v1.HealthCheckResponse_SERVING {
		return fmt.Errorf("agent returned status %q", resp.GetStatus())
	}
	return nil
}
