package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

const (
	// apiDefaultSocketPath is spire-agent's default, so scripts written for
	// it keep working.
	apiDefaultSocketPath = "/tmp/spire-agent/public/api.sock"
	apiDefaultTimeout    = 5 * time.Second
	apiSocketHint        = "(set -socketPath or SPIFFE_ENDPOINT_SOCKET)"
	apiSocketHelp        = "Workload API socket: a path or unix:///path; SPIFFE_ENDPOINT_SOCKET sets the default"
)

const apiUsage = `Usage: lanyard api <command> [flags]

Commands:
  fetch x509     Fetch X.509-SVIDs and bundles ("api fetch" is the same)
  fetch jwt      Fetch JWT-SVIDs for one or more audiences, and the JWT bundles
  validate jwt   Ask the agent to validate a JWT-SVID
  watch          Print X.509-SVID updates as they arrive

Run 'lanyard api <command> -h' for the flags of a command.
`

// runAPI handles `lanyard api <fetch x509|fetch jwt|validate jwt|watch> [flags]`;
// args excludes "api". Returns the process exit code.
func runAPI(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, apiUsage)
		return 2
	}
	switch args[0] {
	case "-h", "-help", "--help", "help":
		fmt.Fprint(stdout, apiUsage)
		return 0
	case "fetch":
		// spire-agent treats a bare "api fetch" as "api fetch x509".
		if len(args) == 1 || strings.HasPrefix(args[1], "-") {
			return runFetchX509(args[1:], stdout, stderr)
		}
		switch args[1] {
		case "x509":
			return runFetchX509(args[2:], stdout, stderr)
		case "jwt":
			return runFetchJWT(args[2:], stdout, stderr)
		}
		fmt.Fprintf(stderr, "unknown command \"api fetch %s\": want \"fetch x509\" or \"fetch jwt\"\n\n", args[1])
	case "validate":
		if len(args) > 1 && args[1] == "jwt" {
			return runValidateJWT(args[2:], stdout, stderr)
		}
		fmt.Fprintln(stderr, "unknown command: want \"api validate jwt\"")
		fmt.Fprintln(stderr)
	case "watch":
		return runWatch(args[1:], stdout, stderr)
	default:
		fmt.Fprintf(stderr, "unknown command \"api %s\"\n\n", args[0])
	}
	fmt.Fprint(stderr, apiUsage)
	return 2
}

// apiFlags are the flags every api subcommand shares.
type apiFlags struct {
	socketPath string
	timeout    time.Duration
	silent     bool
}

func newAPIFlagSet(name, synopsis string, stderr io.Writer, f *apiFlags, timeoutHelp string, defaultTimeout time.Duration) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: lanyard %s [flags]\n\n%s\n\nFlags:\n", name, synopsis)
		fs.PrintDefaults()
	}
	fs.StringVar(&f.socketPath, "socketPath", apiDefaultSocket(),
		apiSocketHelp)
	fs.DurationVar(&f.timeout, "timeout", defaultTimeout, timeoutHelp)
	fs.BoolVar(&f.silent, "silent", false, "Suppress stdout")
	return fs
}

// apiDefaultSocket prefers SPIFFE_ENDPOINT_SOCKET, the variable every
// SPIFFE client library reads, over spire-agent's fixed default.
func apiDefaultSocket() string {
	if v := os.Getenv(workloadapi.SocketEnv); v != "" {
		return v
	}
	return apiDefaultSocketPath
}

// apiParseFlags parses args. It returns ok=false with the exit code to use:
// 0 when help was asked for, 2 for a usage error.
func apiParseFlags(fs *flag.FlagSet, args []string) (int, bool) {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0, false
		}
		return 2, false
	}
	if fs.NArg() > 0 {
		return apiUsageError(fs, "unexpected argument %q", fs.Arg(0)), false
	}
	if t := fs.Lookup("timeout"); t != nil {
		if d, _ := t.Value.(flag.Getter).Get().(time.Duration); d < 0 {
			return apiUsageError(fs, "-timeout must not be negative"), false
		}
	}
	return 0, true
}

func apiUsageError(fs *flag.FlagSet, format string, a ...any) int {
	fmt.Fprintf(fs.Output(), format+"\n\n", a...)
	fs.Usage()
	return 2
}

// workloadAddress turns a -socketPath value (a plain path, unix:///path or
// tcp://ip:port) into a Workload API address for go-spiffe.
func workloadAddress(v string) (string, error) {
	if v == "" {
		return "", errors.New("-socketPath is empty; give a socket path or unix:///path")
	}
	if strings.HasPrefix(v, "unix:") || strings.HasPrefix(v, "tcp:") {
		u, err := url.Parse(v)
		if err != nil {
			return "", fmt.Errorf("invalid Workload API address %q: %v", v, err)
		}
		// go-spiffe accepts unix://host/path, but gRPC refuses an authority.
		if u.Scheme == "unix" && u.Host != "" {
			return "", fmt.Errorf("invalid Workload API address %q: a unix URI needs three slashes, as in unix:///path/to/api.sock", v)
		}
		if err := workloadapi.ValidateAddress(v); err != nil {
			return "", fmt.Errorf("invalid Workload API address %q: %v", v, err)
		}
		return v, nil
	}
	if strings.Contains(v, "://") {
		return "", fmt.Errorf("invalid Workload API address %q: use a path, unix:///path or tcp://ip:port", v)
	}
	abs, err := filepath.Abs(v)
	if err != nil {
		return "", fmt.Errorf("cannot resolve socket path %q: %v", v, err)
	}
	return (&url.URL{Scheme: "unix", Path: abs}).String(), nil
}

// describeRPCError turns a Workload API failure into one line that says what
// went wrong and what to try.
func describeRPCError(what, addr string, timeout time.Duration, err error) string {
	st, isStatus := status.FromError(err)
	if !isStatus {
		return fmt.Sprintf("%s: %v", what, err)
	}
	msg := st.Message()
	switch st.Code() {
	case codes.Unavailable:
		return fmt.Sprintf("cannot reach the Workload API at %s: %s; is the agent running? %s", addr, msg, apiSocketHint)
	case codes.DeadlineExceeded:
		return fmt.Sprintf("%s: no answer from the Workload API at %s within %s; the agent may be starting or overloaded (raise -timeout)", what, addr, timeout)
	case codes.PermissionDenied:
		return fmt.Sprintf("%s: the agent at %s has no identity for this process: %s; check that a registration entry matches this workload", what, addr, msg)
	case codes.Unauthenticated:
		return fmt.Sprintf("%s: the agent at %s could not identify this process: %s", what, addr, msg)
	case codes.InvalidArgument:
		return fmt.Sprintf("%s: the Workload API at %s rejected the request: %s", what, addr, msg)
	case codes.Unimplemented:
		return fmt.Sprintf("%s: the endpoint at %s does not offer this call (%s); is it a SPIFFE Workload API?", what, addr, msg)
	case codes.Canceled:
		return fmt.Sprintf("%s: canceled", what)
	}
	return fmt.Sprintf("%s: %s: %s", what, st.Code(), msg)
}

// apiClient opens a go-spiffe client on -socketPath. The connection is lazy,
// so reachability shows in the first call.
func apiClient(ctx context.Context, socketPath string) (*workloadapi.Client, string, error) {
	addr, err := workloadAddress(socketPath)
	if err != nil {
		return nil, "", err
	}
	c, err := workloadapi.New(ctx, workloadapi.WithAddr(addr))
	if err != nil {
		return nil, "", fmt.Errorf("cannot set up a Workload API client for %s: %v", addr, err)
	}
	return c, addr, nil
}

func apiContext(timeout time.Duration) (context.Context, context.CancelFunc) {
	if timeout > 0 {
		return context.WithTimeout(context.Background(), timeout)
	}
	return context.WithCancel(context.Background())
}

// withAPIClient runs call with a client on socketPath; it returns call's
// exit code, or 1 when no client could be set up.
func withAPIClient(ctx context.Context, socketPath string, stderr io.Writer, call func(client *workloadapi.Client, addr string) int) int {
	client, addr, err := apiClient(ctx, socketPath)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	defer client.Close()
	return call(client, addr)
}
