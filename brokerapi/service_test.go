package brokerapi

import (
	"bytes"
	"crypto/x509"
	"strings"
	"testing"

	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/attestor/selector"
	"github.com/lanyard-dev/lanyard/internal/testkit"
	"github.com/lanyard-dev/lanyard/internal/testkit/attestkit"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/exp/proto/spiffe/broker"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/anypb"
)

func TestSubscribeToX509SVIDByPID(t *testing.T) {
	env := newEnv(t, []*agent.Entry{attestkit.Entry(workloadID, 1, attestkit.MySelector(), tdOther)})
	pid, stop := testkit.StartSleeper(t)
	ctx := testkit.Context(t, waitLimit)
	stream, err := env.client(t, localBroker, clientOpts{}).SubscribeToX509SVID(ctx, &broker.SubscribeToX509SVIDRequest{Reference: pidRef(t, pid)})
	if err != nil {
		t.Fatal(err)
	}
	resp, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Svids) != 1 || resp.Svids[0].SpiffeId != workloadID.String() {
		t.Fatalf("SVIDs %v, want one for %s", resp.Svids, workloadID)
	}
	got := resp.Svids[0]
	svid, err := x509svid.ParseRaw(got.X509Svid, got.X509SvidKey)
	if err != nil {
		t.Fatalf("the SVID and key do not parse: %v", err)
	}
	if _, _, err := x509svid.Verify(svid.Certificates, env.up.LocalBundle(t, td)); err != nil {
		t.Errorf("the SVID does not verify against the bundle: %v", err)
	}
	if roots, err := x509.ParseCertificates(got.Bundle); err != nil || len(roots) != 1 || !roots[0].Equal(env.up.CA().Cert) {
		t.Errorf("bundle: %d roots, %v", len(roots), err)
	}
	if !bytes.Equal(resp.FederatedBundles[tdOther.IDString()], env.caOther.Cert.Raw) || len(resp.FederatedBundles) != 1 {
		t.Errorf("federated bundles for %v, want other.org's", keys(resp.FederatedBundles))
	}

	// A CA rotation re-signs the workload's SVID; the new one reaches the
	// stream, chained to the new CA.
	ca2 := testkit.NewTrustDomainCA(t, td, testkit.WithCommonName("ca 2"))
	env.up.SetCA(ca2)
	env.cache.SetBundles(env.up.LocalBundle(t, td), []*spiffebundle.Bundle{env.caOther.Bundle(tdOther)})
	for {
		resp, err = stream.Recv()
		if err != nil {
			t.Fatalf("after the rotation: %v", err)
		}
		rotated, err := x509svid.ParseRaw(resp.Svids[0].X509Svid, resp.Svids[0].X509SvidKey)
		if err != nil {
			t.Fatal(err)
		}
		if _, _, err := x509svid.Verify(rotated.Certificates, env.up.LocalBundle(t, td)); err == nil {
			if rotated.Certificates[0].SerialNumber.Cmp(svid.Certificates[0].SerialNumber) == 0 {
				t.Fatal("the rotated SVID is the old one")
			}
			break
		}
	}

	// The process's end ends the stream: NotFound, WORKLOAD_NOT_FOUND.
	stop()
	wantStatus(t, recvUntilErr(stream), codes.NotFound, reasonNotFound, "the stream of a process that exited")
}

func keys[V any](m map[string]V) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

func TestEveryRPCByPID(t *testing.T) {
	env := newEnv(t, []*agent.Entry{attestkit.Entry(workloadID, 1, attestkit.MySelector())})
	pid, _ := testkit.StartSleeper(t)
	c := env.client(t, localBroker, clientOpts{})
	ctx := testkit.Context(t, waitLimit)

	jwt, err := c.FetchJWTSVID(ctx, &broker.FetchJWTSVIDRequest{Reference: pidRef(t, pid), Audience: []string{"db"}})
	if err != nil || len(jwt.Svids) != 1 || jwt.Svids[0].SpiffeId != workloadID.String() {
		t.Fatalf("FetchJWTSVID: %v, %v", jwt, err)
	}
	jwtBundles := spiffebundle.NewSet(env.up.LocalBundle(t, td))
	token, err := jwtsvid.ParseAndValidate(jwt.Svids[0].Svid, jwtBundles, []string{"db"})
	if err != nil || token.ID != workloadID {
		t.Fatalf("the JWT-SVID does not validate: %v", err)
	}
	// Asked for by SPIFFE ID: that one, or PermissionDenied.
	if resp, err := c.FetchJWTSVID(ctx, &broker.FetchJWTSVIDRequest{Reference: pidRef(t, pid), Audience: []string{"db"}, SpiffeId: workloadID.String()}); err != nil || len(resp.Svids) != 1 {
		t.Fatalf("FetchJWTSVID for its SPIFFE ID: %v, %v", resp, err)
	}
	_, err = c.FetchJWTSVID(ctx, &broker.FetchJWTSVIDRequest{Reference: pidRef(t, pid), Audience: []string{"db"}, SpiffeId: podID.String()})
	wantStatus(t, err, codes.PermissionDenied, reasonNotEntitled, "FetchJWTSVID for an ID the workload has not")

	xs, err := c.SubscribeToX509Bundles(ctx, &broker.SubscribeToX509BundlesRequest{Reference: pidRef(t, pid)})
	if err != nil {
		t.Fatal(err)
	}
	xr, err := xs.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if len(xr.Bundles) != 2 || !bytes.Equal(xr.Bundles[td.IDString()], env.up.CA().Cert.Raw) || !bytes.Equal(xr.Bundles[tdOther.IDString()], env.caOther.Cert.Raw) {
		t.Fatalf("X.509 bundles for %v, want example.org's and other.org's", keys(xr.Bundles))
	}
	js, err := c.SubscribeToJWTBundles(ctx, &broker.SubscribeToJWTBundlesRequest{Reference: pidRef(t, pid)})
	if err != nil {
		t.Fatal(err)
	}
	jr, err := js.Recv()
	if err != nil {
		t.Fatal(err)
	}
	local, err := spiffebundle.Parse(td, jr.Bundles[td.IDString()])
	if err != nil || len(jr.Bundles) != 2 || len(local.JWTAuthorities()) != 1 {
		t.Fatalf("JWT bundles for %v: %v", keys(jr.Bundles), err)
	}

	// A bundle change reaches the bundle streams.
	ca2 := testkit.NewTrustDomainCA(t, td, testkit.WithCommonName("ca 2"))
	env.cache.SetBundles(env.up.LocalBundle(t, td, env.up.CA().Cert, ca2.Cert), []*spiffebundle.Bundle{env.caOther.Bundle(tdOther)})
	if xr, err = xs.Recv(); err != nil {
		t.Fatal(err)
	}
	if roots, _ := x509.ParseCertificates(xr.Bundles[td.IDString()]); len(roots) != 2 {
		t.Errorf("after a CA was added: %d roots, want 2", len(roots))
	}
}

func TestWorkloadNotEntitled(t *testing.T) {
	env := newEnv(t, []*agent.Entry{attestkit.Entry(podID, 1, podSelector)})
	pid, _ := testkit.StartSleeper(t)
	c := env.client(t, localBroker, clientOpts{})
	ctx := testkit.Context(t, waitLimit)
	s, err := c.SubscribeToX509SVID(ctx, &broker.SubscribeToX509SVIDRequest{Reference: pidRef(t, pid)})
	wantStatus(t, testkit.FirstRecv(s, err), codes.PermissionDenied, reasonNotEntitled, "SubscribeToX509SVID for a process with no entry")
	_, err = c.FetchJWTSVID(ctx, &broker.FetchJWTSVIDRequest{Reference: pidRef(t, pid), Audience: []string{"a"}})
	wantStatus(t, err, codes.PermissionDenied, reasonNotEntitled, "FetchJWTSVID for a process with no entry")
}

func TestEntryRemovedEndsStream(t *testing.T) {
	env := newEnv(t, []*agent.Entry{attestkit.Entry(workloadID, 1, attestkit.MySelector())})
	pid, _ := testkit.StartSleeper(t)
	s, err := env.client(t, localBroker, clientOpts{}).SubscribeToX509SVID(testkit.Context(t, waitLimit), &broker.SubscribeToX509SVIDRequest{Reference: pidRef(t, pid)})
	if err := testkit.FirstRecv(s, err); err != nil {
		t.Fatal(err)
	}
	env.cache.SetEntries([]*agent.Entry{attestkit.Entry(podID, 2, podSelector)})
	wantStatus(t, recvUntilErr(s), codes.PermissionDenied, reasonNotEntitled, "the stream after its workload's entry went")
}

// Every RPC answers NotFound for a process that is gone, with the spec's
// reason (spire-agent answers Internal).
func TestPIDGoneIsNotFound(t *testing.T) {
	env := newEnv(t, []*agent.Entry{attestkit.Entry(workloadID, 1, attestkit.MySelector())})
	c := env.client(t, localBroker, clientOpts{})
	ctx := testkit.Context(t, waitLimit)
	gone := pidRef(t, goneProcess(t))
	_, err := c.FetchJWTSVID(ctx, &broker.FetchJWTSVIDRequest{Reference: gone, Audience: []string{"a"}})
	wantStatus(t, err, codes.NotFound, reasonNotFound, "FetchJWTSVID")
	s1, err := c.SubscribeToX509SVID(ctx, &broker.SubscribeToX509SVIDRequest{Reference: gone})
	wantStatus(t, testkit.FirstRecv(s1, err), codes.NotFound, reasonNotFound, "SubscribeToX509SVID")
	s2, err := c.SubscribeToX509Bundles(ctx, &broker.SubscribeToX509BundlesRequest{Reference: gone})
	wantStatus(t, testkit.FirstRecv(s2, err), codes.NotFound, reasonNotFound, "SubscribeToX509Bundles")
	s3, err := c.SubscribeToJWTBundles(ctx, &broker.SubscribeToJWTBundlesRequest{Reference: gone})
	wantStatus(t, testkit.FirstRecv(s3, err), codes.NotFound, reasonNotFound, "SubscribeToJWTBundles")
}

func TestPIDExitEndsBundleStream(t *testing.T) {
	env := newEnv(t, []*agent.Entry{attestkit.Entry(workloadID, 1, attestkit.MySelector())})
	pid, stop := testkit.StartSleeper(t)
	s, err := env.client(t, localBroker, clientOpts{}).SubscribeToJWTBundles(testkit.Context(t, waitLimit), &broker.SubscribeToJWTBundlesRequest{Reference: pidRef(t, pid)})
	if err := testkit.FirstRecv(s, err); err != nil {
		t.Fatal(err)
	}
	stop()
	wantStatus(t, recvUntilErr(s), codes.NotFound, reasonNotFound, "the bundle stream of a process that exited")
}

func TestMalformedRequests(t *testing.T) {
	env := newEnv(t, []*agent.Entry{attestkit.Entry(workloadID, 1, attestkit.MySelector())})
	pid, _ := testkit.StartSleeper(t)
	c := env.client(t, remoteBroker, clientOpts{}) // "*": every type passes the policy
	ctx := testkit.Context(t, waitLimit)
	refs := map[string]*broker.WorkloadReference{
		"no reference":     nil,
		"empty reference":  {},
		"zero pid":         pidRef(t, 0),
		"negative pid":     pidRef(t, -5),
		"unknown type":     ref(t, &broker.KubernetesObjectKey{Name: "x"}),
		"undecodable pid":  {Reference: &anypb.Any{TypeUrl: "type.googleapis.com/spiffe.broker.WorkloadPIDReference", Value: []byte{0xff}}},
		"k8s without type": ref(t, &broker.KubernetesObjectReference{Uid: "u"}),
		"k8s deployment":   ref(t, &broker.KubernetesObjectReference{Type: &broker.KubernetesObjectType{Plural: "deployments", Group: "apps"}, Uid: "u"}),
		"k8s neither":      ref(t, &broker.KubernetesObjectReference{Type: podType}),
		"k8s no namespace": ref(t, &broker.KubernetesObjectReference{Type: podType, Key: &broker.KubernetesObjectKey{Name: "p"}}),
		"k8s long name":    ref(t, &broker.KubernetesObjectReference{Type: podType, Key: &broker.KubernetesObjectKey{Namespace: "ns", Name: strings.Repeat("p", 254)}}),
		"long type URL":    {Reference: &anypb.Any{TypeUrl: "type.googleapis.com/" + strings.Repeat("x", 300)}},
	}
	for name, r := range refs {
		s, err := c.SubscribeToX509SVID(ctx, &broker.SubscribeToX509SVIDRequest{Reference: r})
		wantStatus(t, testkit.FirstRecv(s, err), codes.InvalidArgument, reasonInvalid, "SubscribeToX509SVID "+name)
		_, err = c.FetchJWTSVID(ctx, &broker.FetchJWTSVIDRequest{Reference: r, Audience: []string{"a"}})
		wantStatus(t, err, codes.InvalidArgument, reasonInvalid, "FetchJWTSVID "+name)
	}
	jwt := map[string]*broker.FetchJWTSVIDRequest{
		"no audience":       {Reference: pidRef(t, pid)},
		"empty audience":    {Reference: pidRef(t, pid), Audience: []string{""}},
		"too many":          {Reference: pidRef(t, pid), Audience: strings.Split(strings.Repeat("a,", 40), ",")[:40]},
		"bad SPIFFE ID":     {Reference: pidRef(t, pid), Audience: []string{"a"}, SpiffeId: "example.org/w"},
		"too long audience": {Reference: pidRef(t, pid), Audience: []string{strings.Repeat("a", 5000)}},
	}
	for name, req := range jwt {
		_, err := c.FetchJWTSVID(ctx, req)
		wantStatus(t, err, codes.InvalidArgument, "", "FetchJWTSVID "+name)
	}
}

var podType = &broker.KubernetesObjectType{Plural: "pods", Group: "core"}

func TestPodReference(t *testing.T) {
	env := newEnv(t, []*agent.Entry{attestkit.Entry(podID, 1, podSelector)})
	pod := podRef{namespace: "shop", name: "checkout-7c9f", uid: "0c3f5a5e-6f0e-4f5b-9a0a-1b2c3d4e5f60"}
	env.pods.set(pod, []selector.Selector{podSelector})
	// Over TCP: localBroker may use pod references there.
	c := env.client(t, localBroker, clientOpts{tcp: true})
	ctx := testkit.Context(t, waitLimit)
	byUID := ref(t, &broker.KubernetesObjectReference{Type: podType, Uid: pod.uid})
	byName := ref(t, &broker.KubernetesObjectReference{Type: podType, Key: &broker.KubernetesObjectKey{Namespace: pod.namespace, Name: pod.name}, Uid: pod.uid})
	jwt, err := c.FetchJWTSVID(ctx, &broker.FetchJWTSVIDRequest{Reference: byName, Audience: []string{"a"}})
	if err != nil || jwt.Svids[0].SpiffeId != podID.String() {
		t.Fatalf("FetchJWTSVID by name and uid: %v, %v", jwt, err)
	}
	stream, err := c.SubscribeToX509SVID(ctx, &broker.SubscribeToX509SVIDRequest{Reference: byUID})
	if err != nil {
		t.Fatal(err)
	}
	if resp, err := stream.Recv(); err != nil || resp.Svids[0].SpiffeId != podID.String() {
		t.Fatalf("SubscribeToX509SVID by uid: %v, %v", resp, err)
	}
	wrongUID := ref(t, &broker.KubernetesObjectReference{Type: podType, Key: &broker.KubernetesObjectKey{Namespace: pod.namespace, Name: pod.name}, Uid: "9f3f5a5e-6f0e-4f5b-9a0a-1b2c3d4e5f60"})
	_, err = c.FetchJWTSVID(ctx, &broker.FetchJWTSVIDRequest{Reference: wrongUID, Audience: []string{"a"}})
	wantStatus(t, err, codes.NotFound, reasonNotFound, "a pod of that name with another uid")

	// The pod's deletion ends its stream.
	env.pods.set(pod, nil)
	wantStatus(t, recvUntilErr(stream), codes.NotFound, reasonNotFound, "the stream of a pod deleted")
}

// A pod named without its uid is pinned to the pod found: one made again
// under that name ends the stream.
func TestPodMadeAgainUnderItsNameEndsStream(t *testing.T) {
	env := newEnv(t, []*agent.Entry{attestkit.Entry(podID, 1, podSelector)})
	first := podRef{namespace: "db", name: "db-0", uid: "0c3f5a5e-6f0e-4f5b-9a0a-1b2c3d4e5f60"}
	env.pods.set(first, []selector.Selector{podSelector})
	byName := ref(t, &broker.KubernetesObjectReference{Type: podType, Key: &broker.KubernetesObjectKey{Namespace: "db", Name: "db-0"}})
	stream, err := env.client(t, podBroker, clientOpts{}).SubscribeToX509SVID(testkit.Context(t, waitLimit), &broker.SubscribeToX509SVIDRequest{Reference: byName})
	if err := testkit.FirstRecv(stream, err); err != nil {
		t.Fatal(err)
	}
	second := podRef{namespace: "db", name: "db-0", uid: "1d4f5a5e-6f0e-4f5b-9a0a-1b2c3d4e5f60"}
	env.pods.set(first, nil)
	env.pods.set(second, []selector.Selector{{Type: "k8s", Value: "pod-uid:" + second.uid}})
	wantStatus(t, recvUntilErr(stream), codes.NotFound, reasonNotFound, "the stream of a pod made again under its name")
}

// The k8s attestor's broker policy (its experimental.broker block, a
// SubjectAccessReview) refusing a broker is PermissionDenied, and a grant
// revoked ends an open pod stream.
func TestPodReferenceRefusedByTheAttestorPolicy(t *testing.T) {
	env := newEnv(t, []*agent.Entry{attestkit.Entry(podID, 1, podSelector)})
	pod := podRef{namespace: "shop", name: "cart-0", uid: "2e5f5a5e-6f0e-4f5b-9a0a-1b2c3d4e5f60"}
	env.pods.set(pod, []selector.Selector{podSelector})
	byUID := ref(t, &broker.KubernetesObjectReference{Type: podType, Uid: pod.uid})
	ctx := testkit.Context(t, waitLimit)
	stream, err := env.client(t, podBroker, clientOpts{}).SubscribeToX509SVID(ctx, &broker.SubscribeToX509SVIDRequest{Reference: byUID})
	if err := testkit.FirstRecv(stream, err); err != nil {
		t.Fatal(err)
	}
	env.pods.deny(podBroker)
	wantStatus(t, recvUntilErr(stream), codes.PermissionDenied, "", "the stream of a broker whose grant was revoked")
	_, err = env.client(t, podBroker, clientOpts{}).FetchJWTSVID(ctx, &broker.FetchJWTSVIDRequest{Reference: byUID, Audience: []string{"a"}})
	wantStatus(t, err, codes.PermissionDenied, "", "a pod reference the attestor's policy refuses")
}

func TestPodReferenceWithoutPodAttestor(t *testing.T) {
	env := newEnv(t, []*agent.Entry{attestkit.Entry(podID, 1, podSelector)}, withoutPods)
	_, err := env.client(t, podBroker, clientOpts{}).FetchJWTSVID(testkit.Context(t, waitLimit), &broker.FetchJWTSVIDRequest{
		Reference: ref(t, &broker.KubernetesObjectReference{Type: podType, Uid: "u"}), Audience: []string{"a"}})
	wantStatus(t, err, codes.InvalidArgument, reasonInvalid, "a pod reference with no k8s attestor")
}

// The policy: reference types per broker, and over TCP only when allowed.
func TestReferenceTypePolicy(t *testing.T) {
	env := newEnv(t, []*agent.Entry{attestkit.Entry(workloadID, 1, attestkit.MySelector())})
	pid, _ := testkit.StartSleeper(t)
	ctx := testkit.Context(t, waitLimit)
	req := &broker.FetchJWTSVIDRequest{Reference: pidRef(t, pid), Audience: []string{"a"}}

	_, err := env.client(t, podBroker, clientOpts{}).FetchJWTSVID(ctx, req)
	wantStatus(t, err, codes.PermissionDenied, "", "a PID reference from a broker allowed pods only")
	s, err := env.client(t, podBroker, clientOpts{}).SubscribeToX509Bundles(ctx, &broker.SubscribeToX509BundlesRequest{Reference: pidRef(t, pid)})
	wantStatus(t, testkit.FirstRecv(s, err), codes.PermissionDenied, "", "bundles by a PID reference from a broker allowed pods only")
	_, err = env.client(t, localBroker, clientOpts{tcp: true}).FetchJWTSVID(ctx, req)
	wantStatus(t, err, codes.PermissionDenied, "", "a PID reference over TCP not allowed there")
	if _, err := env.client(t, localBroker, clientOpts{}).FetchJWTSVID(ctx, req); err != nil {
		t.Fatalf("the same over the Unix socket: %v", err)
	}
	// A broker of another trust domain, allowed "*" over TCP.
	if _, err := env.client(t, remoteBroker, clientOpts{tcp: true}).FetchJWTSVID(ctx, req); err != nil {
		t.Fatalf("the remote broker over TCP: %v", err)
	}
}
