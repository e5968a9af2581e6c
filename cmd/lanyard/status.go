package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/lanyard-dev/lanyard/conf"
	adminv1 "github.com/lanyard-dev/lanyard/proto/lanyard/admin/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
)

// runStatus handles `lanyard status [-config F | -adminSocketPath P] [-json]`:
// what an operator looks at first when a service's mTLS fails. It asks the
// agent's admin socket, which only the agent's user and group reach.
func runStatus(args []string, stdout, stderr io.Writer) int {
	var configPath, socketPath string
	var asJSON, expandEnv bool
	var timeout time.Duration
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(stderr, "Usage: lanyard status [flags]\n\nShows the agent's identity and upstream, its cache, and the workloads with open streams and the identities they hold.\n\nFlags:\n")
		fs.PrintDefaults()
	}
	fs.StringVar(&configPath, "config", "conf/agent/agent.conf", "the agent's config file: its agent.admin_socket_path is asked")
	fs.BoolVar(&expandEnv, "expandEnv", false, "expand $VAR and ${VAR} in the config file")
	fs.StringVar(&socketPath, "adminSocketPath", "", "the admin socket (overrides -config)")
	fs.BoolVar(&asJSON, "json", false, "print JSON (the lanyard.admin.v1 GetStatusResponse) rather than a table")
	fs.DurationVar(&timeout, "timeout", apiDefaultTimeout, "Time to wait for the agent's answer")
	if code, ok := apiParseFlags(fs, args); !ok {
		return code
	}
	if socketPath == "" {
		cfg, err := conf.Load(configPath, expandEnv)
		if err != nil {
			fmt.Fprintln(stderr, err)
			return 1
		}
		if socketPath = cfg.Agent.AdminSocketPath; socketPath == "" {
			fmt.Fprintf(stderr, "lanyard status: %s sets no agent.admin_socket_path: set one (see docs/admin.md) and restart the agent, or give -adminSocketPath\n", configPath)
			return 1
		}
	}
	resp, err := fetchStatus(socketPath, timeout)
	if err != nil {
		fmt.Fprintf(stderr, "lanyard status: %s\n", describeStatusError(socketPath, err))
		return 1
	}
	if asJSON {
		out, err := protojson.MarshalOptions{Multiline: true, EmitUnpopulated: true}.Marshal(resp)
		if err != nil {
			fmt.Fprintln(stderr, "lanyard status:", err)
			return 1
		}
		fmt.Fprintln(stdout, string(out))
		return 0
	}
	printStatus(stdout, resp, time.Now())
	return 0
}

// describeStatusError says what failed and what to do, in one line.
func describeStatusError(socketPath string, err error) string {
	st := status.Convert(err)
	switch {
	case st.Code() == codes.Unavailable && strings.Contains(st.Message(), "permission denied"):
		return fmt.Sprintf("cannot open the admin socket %s: permission denied; run as the agent's user or a member of its group (the socket is 0770)", socketPath)
	case st.Code() == codes.Unavailable:
		return fmt.Sprintf("cannot reach the admin socket %s: %s; is the agent running with this admin_socket_path?", socketPath, st.Message())
	case st.Code() == codes.DeadlineExceeded:
		return fmt.Sprintf("no answer from the admin socket %s in time; the agent may be starting or overloaded (raise -timeout)", socketPath)
	case st.Code() == codes.Unimplemented:
		return fmt.Sprintf("%s serves no Lanyard status: is it a Lanyard agent's admin socket (spire-agent's has none)?", socketPath)
	}
	return fmt.Sprintf("%s: %s: %s", socketPath, st.Code(), st.Message())
}

func fetchStatus(socketPath string, timeout time.Duration) (*adminv1.GetStatusResponse, error) {
	conn, err := grpc.NewClient("unix://"+socketPath, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	ctx := context.Background()
	if timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, timeout)
		defer cancel()
	}
	return adminv1.NewStatusClient(conn).GetStatus(ctx, &adminv1.GetStatusRequest{})
}

// printStatus prints the status as an operator reads it: the agent first,
// then one line per identity a workload holds, the soonest to expire
// flagged.
func printStatus(w io.Writer, s *adminv1.GetStatusResponse, now time.Time) {
	a := s.GetAgent()
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	id := a.GetSpiffeId()
	if id == "" {
		id = "(no SVID of its own yet)"
	} else {
		id += "  SVID expires " + expires(a.GetSvidExpiresAt(), now)
	}
	fmt.Fprintf(tw, "Agent\t%s\n", id)
	upstream := a.GetUpstream()
	if a.GetServer() != "" {
		upstream += "  server " + a.GetServer()
	}
	if a.GetLastSync() != 0 {
		upstream += "  last sync " + at(a.GetLastSync(), now)
	}
	fmt.Fprintf(tw, "Upstream\t%s\n", upstream)
	state := "ready"
	switch {
	case !a.GetReady():
		state = "NOT READY (no entries and bundles yet)"
	case a.GetDegraded() != "":
		state = "DEGRADED: " + a.GetDegraded()
	}
	fmt.Fprintf(tw, "State\t%s\n", state)
	cache := fmt.Sprintf("%d entries, %d X509-SVIDs, %d JWT-SVIDs", a.GetEntries(), a.GetCachedX509Svids(), a.GetCachedJwtSvids())
	if a.GetFirstExpiry() != 0 {
		cache += "; first expiry " + expires(a.GetFirstExpiry(), now)
	}
	fmt.Fprintf(tw, "Cache\t%s\n", cache)
	fmt.Fprintf(tw, "Version\t%s, trust domain %s, up %s\n", a.GetVersion(), a.GetTrustDomain(), now.Sub(time.Unix(a.GetStartedAt(), 0)).Round(time.Second))
	tw.Flush()

	fmt.Fprintf(w, "\n%d workload stream(s)\n", len(s.GetWorkloads()))
	if len(s.GetWorkloads()) == 0 {
		return
	}
	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "PID\tUID\tAPI\tCONNECTED\tSPIFFE ID\tEXPIRES")
	for _, wl := range s.GetWorkloads() {
		api := wl.GetApi()
		if wl.GetOnBehalfOf() != "" {
			api += " for " + wl.GetOnBehalfOf()
		}
		head := fmt.Sprintf("%d\t%d\t%s\t%s", wl.GetPid(), wl.GetUid(), api, at(wl.GetConnectedAt(), now))
		if len(wl.GetIdentities()) == 0 {
			fmt.Fprintf(tw, "%s\t(nothing sent yet)\t\n", head)
			continue
		}
		for _, id := range wl.GetIdentities() {
			name := id.GetSpiffeId()
			if id.GetHint() != "" {
				name += " (" + id.GetHint() + ")"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\n", head, name, expires(id.GetExpiresAt(), now))
			head = "\t\t\t"
		}
	}
	tw.Flush()
}

// at shows a past Unix time as RFC 3339 and how long ago it was.
func at(unix int64, now time.Time) string {
	t := time.Unix(unix, 0).UTC()
	return fmt.Sprintf("%s (%s ago)", t.Format(time.RFC3339), now.Sub(t).Round(time.Second))
}

// expires shows an expiry and how far off it is; one past is flagged, as
// an expired SVID is what breaks mTLS.
func expires(unix int64, now time.Time) string {
	t := time.Unix(unix, 0).UTC()
	if d := t.Sub(now).Round(time.Second); d > 0 {
		return fmt.Sprintf("%s (in %s)", t.Format(time.RFC3339), d)
	}
	return fmt.Sprintf("%s (EXPIRED %s ago)", t.Format(time.RFC3339), now.Sub(t).Round(time.Second))
}
