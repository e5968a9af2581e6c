package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

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
	return withAPIClient(ctx, f.socketPath, stderr, func(client *workloadapi.Client, addr string) int {
		return fetchJWT(ctx, client, addr, f, audience, subject, stdout, stderr)
	})
}

func fetchJWT(ctx context.Context, client *workloadapi.Client, addr string, f apiFlags, audience []string, subject spiffeid.ID, stdout, stderr io.Writer) int {
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
	return withAPIClient(ctx, f.socketPath, stderr, func(client *workloadapi.Client, addr string) int {
		return validateJWT(ctx, client, addr, f, token, audience, stdout, stderr)
	})
}

func validateJWT(ctx context.Context, client *workloadapi.Client, addr string, f apiFlags, token, audience string, stdout, stderr io.Writer) int {
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
