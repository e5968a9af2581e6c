package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/lanyard-dev/lanyard/agent"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// x509View is one SVID with the bundles printed and written beside it.
type x509View struct {
	svid      *x509svid.SVID
	bundle    *x509bundle.Bundle // nil when the agent sent none
	federated []*x509bundle.Bundle
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
				v.bundle = b
				continue
			}
			v.federated = append(v.federated, b)
		}
		views = append(views, v)
	}
	return views
}

func verifyX509Views(views []x509View) error {
	for _, v := range views {
		td := v.svid.ID.TrustDomain()
		if v.bundle == nil || v.bundle.Empty() {
			return fmt.Errorf("the Workload API sent no bundle for %q's trust domain %s; the agent's bundle is missing", v.svid.ID, td)
		}
		if _, _, err := x509svid.Verify(v.svid.Certificates, v.bundle); err != nil {
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
		for i, c := range v.bundle.X509Authorities() {
			fmt.Fprintf(w, "CA #%d Valid After:\t%v\n", i+1, c.NotBefore)
			fmt.Fprintf(w, "CA #%d Valid Until:\t%v\n", i+1, c.NotAfter)
		}
		for _, f := range v.federated {
			td := f.TrustDomain().IDString()
			for i, c := range f.X509Authorities() {
				fmt.Fprintf(w, "[%s] CA #%d Valid After:\t%v\n", td, i+1, c.NotBefore)
				fmt.Fprintf(w, "[%s] CA #%d Valid Until:\t%v\n", td, i+1, c.NotAfter)
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
	return withAPIClient(ctx, f.socketPath, stderr, func(client *workloadapi.Client, addr string) int {
		return fetchX509(ctx, client, addr, f, writeDir, stdout, stderr)
	})
}

func fetchX509(ctx context.Context, client *workloadapi.Client, addr string, f apiFlags, writeDir string, stdout, stderr io.Writer) int {
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
// names and modes, so tooling around it keeps working: certificates 0644,
// keys 0600. Each is written atomically (agent.WriteFileAtomicMode), so a
// reader never sees a half-written file and a key never exists with a
// wider mode.
func writeX509Views(out io.Writer, dir string, views []x509View) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("cannot create -write directory: %v", err)
	}
	for i, v := range views {
		svidPath := filepath.Join(dir, fmt.Sprintf("svid.%d.pem", i))
		keyPath := filepath.Join(dir, fmt.Sprintf("svid.%d.key", i))
		bundlePath := filepath.Join(dir, fmt.Sprintf("bundle.%d.pem", i))

		certsPEM, keyPEM, err := v.svid.Marshal()
		if err != nil {
			return fmt.Errorf("cannot encode %q: %v", v.svid.ID, err)
		}
		fmt.Fprintf(out, "Writing SVID #%d to file %s.\n", i, svidPath)
		if err := agent.WriteFileAtomicMode(svidPath, certsPEM, 0o644); err != nil {
			return err
		}
		fmt.Fprintf(out, "Writing key #%d to file %s.\n", i, keyPath)
		if err := agent.WriteFileAtomicMode(keyPath, keyPEM, 0o600); err != nil {
			return err
		}
		fmt.Fprintf(out, "Writing bundle #%d to file %s.\n", i, bundlePath)
		if err := writeBundle(bundlePath, v.bundle); err != nil {
			return err
		}
		for j, fb := range v.federated {
			p := filepath.Join(dir, fmt.Sprintf("federated_bundle.%d.%d.pem", i, j))
			fmt.Fprintf(out, "Writing federated bundle #%d for trust domain %s to file %s.\n", j, fb.TrustDomain().IDString(), p)
			if err := writeBundle(p, fb); err != nil {
				return err
			}
		}
	}
	return nil
}

func writeBundle(path string, b *x509bundle.Bundle) error {
	data, err := b.Marshal()
	if err != nil {
		return fmt.Errorf("cannot encode the bundle of %s: %v", b.TrustDomain(), err)
	}
	return agent.WriteFileAtomicMode(path, data, 0o644)
}
