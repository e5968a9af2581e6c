package main

import (
	"context"
	"crypto"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
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

// x509View is one SVID with the bundles printed and written beside it.
type x509View struct {
	svid      *x509svid.SVID
	bundle    []*x509.Certificate
	federated []tdCerts
}

type tdCerts struct {
	trustDomain string
	certs       []*x509.Certificate
}

// x509Views splits an X.509 context per SVID, as spire-agent does: the SVID's
// own trust domain bundle, and every other bundle as federated.
func x509Views(xc *workloadapi.X509Context) []x509View {
	bundles := xc.Bundles.Bundles() // sorted by trust domain
	views := make([]x509View, 0, len(xc.SVIDs))
	for _, s := range xc.SVIDs {
		v := x509View{svid: s}
		for _, b := range bundles {
			if b.TrustDomain() == s.ID.TrustDomain() {
				v.bundle = b.X509Authorities()
				continue
			}
			v.federated = append(v.federated, tdCerts{trustDomain: b.TrustDomain().IDString(), certs: b.X509Authorities()})
		}
		views = append(views, v)
	}
	return views
}

func verifyX509Views(views []x509View) error {
	for _, v := range views {
		td := v.svid.ID.TrustDomain()
		if len(v.bundle) == 0 {
			return fmt.Errorf("the Workload API sent no bundle for %q's trust domain %s; the agent's bundle is missing", v.svid.ID, td)
		}
		if _, _, err := x509svid.Verify(v.svid.Certificates, x509bundle.FromX509Authorities(td, v.bundle)); err != nil {
			return fmt.Errorf("SVID %q does not verify against its trust domain bundle: %v", v.svid.ID, err)
		}
	}
	return nil
}

func printX509Views(w io.Writer, views []x509View, elapsed time.Duration) {
	plural := "s"
	if len(views) == 1 {
		plural = ""
	}
	fmt.Fprintf(w, "Received %d svid%s after %s\n", len(views), plural, elapsed)
	for _, v := range views {
		fmt.Fprintln(w)
		fmt.Fprintf(w, "SPIFFE ID:\t\t%s\n", v.svid.ID)
		if v.svid.Hint != "" {
			fmt.Fprintf(w, "Hint:\t\t\t%s\n", v.svid.Hint)
		}
		leaf := v.svid.Certificates[0]
		fmt.Fprintf(w, "SVID Valid After:\t%v\n", leaf.NotBefore)
		fmt.Fprintf(w, "SVID Valid Until:\t%v\n", leaf.NotAfter)
		for i, c := range v.svid.Certificates[1:] {
			fmt.Fprintf(w, "Intermediate #%d Valid After:\t%v\n", i+1, c.NotBefore)
			fmt.Fprintf(w, "Intermediate #%d Valid Until:\t%v\n", i+1, c.NotAfter)
		}
		for i, c := range v.bundle {
			fmt.Fprintf(w, "CA #%d Valid After:\t%v\n", i+1, c.NotBefore)
			fmt.Fprintf(w, "CA #%d Valid Until:\t%v\n", i+1, c.NotAfter)
		}
		for _, f := range v.federated {
			for i, c := range f.certs {
				fmt.Fprintf(w, "[%s] CA #%d Valid After:\t%v\n", f.trustDomain, i+1, c.NotBefore)
				fmt.Fprintf(w, "[%s] CA #%d Valid Until:\t%v\n", f.trustDomain, i+1, c.NotAfter)
			}
		}
	}
	fmt.Fprintln(w)
}

func runFetchX509(args []string, stdout, stderr io.Writer) int {
	var f apiFlags
	var writeDir string
	fs := newAPIFlagSet("api fetch x509", "Fetches X.509-SVIDs and bundles from the Workload API.", stderr, &f,
		"Time to wait for a response", apiDefaultTimeout)
	fs.StringVar(&writeDir, "write", "", "Write each SVID, its key and bundles as PEM files into this directory")
	if code, ok := apiParseFlags(fs, args); !ok {
		return code
	}

	ctx, cancel := apiContext(f.timeout)
	defer cancel()
	client, addr, err := apiClient(ctx, f.socketPath)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	defer client.Close()

	start := time.Now()
	xc, err := client.FetchX509Context(ctx)
	elapsed := time.Since(start)
	if err != nil {
		fmt.Fprintln(stderr, describeRPCError("fetching X.509-SVIDs", addr, f.timeout, err))
		return 1
	}
	views := x509Views(xc)
	if err := verifyX509Views(views); err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	if !f.silent {
		printX509Views(stdout, views, elapsed)
	}
	if writeDir != "" {
		out := stdout
		if f.silent {
			out = io.Discard
		}
		if err := writeX509Views(out, writeDir, views); err != nil {
			fmt.Fprintln(stderr, err)
			return 1
		}
	}
	return 0
}

// writeX509Views writes the files spire-agent's -write does, with the same
// names, so tooling around it keeps working.
func writeX509Views(out io.Writer, dir string, views []x509View) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("cannot create -write directory: %v", err)
	}
	for i, v := range views {
		svidPath := filepath.Join(dir, fmt.Sprintf("svid.%d.pem", i))
		keyPath := filepath.Join(dir, fmt.Sprintf("svid.%d.key", i))
		bundlePath := filepath.Join(dir, fmt.Sprintf("bundle.%d.pem", i))

		fmt.Fprintf(out, "Writing SVID #%d to file %s.\n", i, svidPath)
		if err := writeFileAtomic(svidPath, certsPEM(v.svid.Certificates), 0o644); err != nil {
			return err
		}
		fmt.Fprintf(out, "Writing key #%d to file %s.\n", i, keyPath)
		keyPEM, err := privateKeyPEM(v.svid.PrivateKey)
		if err != nil {
			return fmt.Errorf("cannot encode the key of %q: %v", v.svid.ID, err)
		}
		if err := writeFileAtomic(keyPath, keyPEM, 0o600); err != nil {
			return err
		}
		fmt.Fprintf(out, "Writing bundle #%d to file %s.\n", i, bundlePath)
		if err := writeFileAtomic(bundlePath, certsPEM(v.bundle), 0o644); err != nil {
			return err
		}
		for j, fb := range v.federated {
			p := filepath.Join(dir, fmt.Sprintf("federated_bundle.%d.%d.pem", i, j))
			fmt.Fprintf(out, "Writing federated bundle #%d for trust domain %s to file %s.\n", j, fb.trustDomain, p)
			if err := writeFileAtomic(p, certsPEM(fb.certs), 0o644); err != nil {
				return err
			}
		}
	}
	return nil
}

func certsPEM(certs []*x509.Certificate) []byte {
	var out []byte
	for _, c := range certs {
		out = append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	return out
}

func privateKeyPEM(key crypto.Signer) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// writeFileAtomic writes through a temporary file and a rename, so readers
// never see a half-written file and a key never exists with a wider mode.
func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("cannot write %s: %v", path, err)
	}
	name := tmp.Name()
	fail := func(err error) error {
		tmp.Close()
		os.Remove(name)
		return fmt.Errorf("cannot write %s: %v", path, err)
	}
	if err := tmp.Chmod(mode); err != nil {
		return fail(err)
	}
	if _, err := tmp.Write(data); err != nil {
		return fail(err)
	}
	if err := tmp.Sync(); err != nil {
		return fail(err)
	}
	if err := tmp.Close(); err != nil {
		os.Remove(name)
		return fmt.Errorf("cannot write %s: %v", path, err)
	}
	if err := os.Rename(name, path); err != nil {
		os.Remove(name)
		return fmt.Errorf("cannot write %s: %v", path, err)
	}
	return nil
}

// stringsFlag collects a repeatable flag; each value may also hold a
// comma-separated list, as spire-agent's -audience does.
type stringsFlag []string

func (s *stringsFlag) String() string { return strings.Join(*s, ",") }

func (s *stringsFlag) Set(v string) error {
	for _, p := range strings.Split(v, ",") {
		if p = strings.TrimSpace(p); p != "" {
			*s = append(*s, p)
		}
	}
	return nil
}

func runFetchJWT(args []string, stdout, stderr io.Writer) int {
	var f apiFlags
	var audience stringsFlag
	var spiffeID string
	fs := newAPIFlagSet("api fetch jwt", "Fetches JWT-SVIDs and the JWT bundles from the Workload API.", stderr, &f,
		"Time to wait for a response", apiDefaultTimeout)
	fs.Var(&audience, "audience", "Audience of the token (repeat, or separate with commas; required)")
	fs.StringVar(&spiffeID, "spiffeID", "", "Only fetch the SVID with this SPIFFE ID (optional)")
	if code, ok := apiParseFlags(fs, args); !ok {
		return code
	}
	if len(audience) == 0 {
		return apiUsageError(fs, "-audience is required")
	}
	var subject spiffeid.ID
	if spiffeID != "" {
		id, err := spiffeid.FromString(spiffeID)
		if err != nil {
			return apiUsageError(fs, "invalid -spiffeID %q: %v", spiffeID, err)
		}
		subject = id
	}

	ctx, cancel := apiContext(f.timeout)
	defer cancel()
	client, addr, err := apiClient(ctx, f.socketPath)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	defer client.Close()

	bundles, err := client.FetchJWTBundles(ctx)
	if err != nil {
		fmt.Fprintln(stderr, describeRPCError("fetching JWT bundles", addr, f.timeout, err))
		return 1
	}
	svids, err := client.FetchJWTSVIDs(ctx, jwtsvid.Params{
		Audience:       audience[0],
		ExtraAudiences: audience[1:],
		Subject:        subject,
	})
	if err != nil {
		fmt.Fprintln(stderr, describeRPCError("fetching JWT-SVIDs", addr, f.timeout, err))
		return 1
	}
	if f.silent {
		return 0
	}
	for _, s := range svids {
		fmt.Fprintf(stdout, "token(%s):\n\t%s\n", s.ID, s.Marshal())
	}
	for _, b := range bundles.Bundles() {
		jwks, err := b.Marshal()
		if err != nil {
			fmt.Fprintf(stderr, "cannot encode the JWT bundle of %s: %v\n", b.TrustDomain(), err)
			return 1
		}
		fmt.Fprintf(stdout, "bundle(%s):\n\t%s\n", b.TrustDomain().IDString(), jwks)
	}
	return 0
}

func runValidateJWT(args []string, stdout, stderr io.Writer) int {
	var f apiFlags
	var audience, token string
	fs := newAPIFlagSet("api validate jwt", "Asks the agent to validate a JWT-SVID.", stderr, &f,
		"Time to wait for a response", apiDefaultTimeout)
	fs.StringVar(&audience, "audience", "", "Audience the token must carry (required)")
	fs.StringVar(&token, "svid", "", "The JWT-SVID to validate (required)")
	if code, ok := apiParseFlags(fs, args); !ok {
		return code
	}
	if audience == "" {
		return apiUsageError(fs, "-audience is required")
	}
	if token == "" {
		return apiUsageError(fs, "-svid is required")
	}

	ctx, cancel := apiContext(f.timeout)
	defer cancel()
	client, addr, err := apiClient(ctx, f.socketPath)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	defer client.Close()

	svid, err := client.ValidateJWTSVID(ctx, token, audience)
	if err != nil {
		if st, ok := status.FromError(err); ok && st.Code() == codes.InvalidArgument {
			fmt.Fprintf(stderr, "SVID is not valid: %s\n", st.Message())
			return 1
		}
		fmt.Fprintln(stderr, describeRPCError("validating the JWT-SVID", addr, f.timeout, err))
		return 1
	}
	claims, err := json.Marshal(svid.Claims)
	if err != nil {
		fmt.Fprintf(stderr, "the agent accepted the SVID, but its claims cannot be encoded: %v\n", err)
		return 1
	}
	if !f.silent {
		fmt.Fprintln(stdout, "SVID is valid.")
		fmt.Fprintln(stdout, "SPIFFE ID :", svid.ID)
		fmt.Fprintln(stdout, "Claims    :", string(claims))
	}
	return 0
}

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

	client, addr, err := apiClient(ctx, f.socketPath)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	defer client.Close()

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

	err = client.WatchX509Context(ctx, w)
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
