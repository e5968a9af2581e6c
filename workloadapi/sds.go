package workloadapi

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/attestor/selector"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/structpb"
)

// SPIRE's defaults for the names of the SDS resources, so that Envoy
// configurations written for spire-agent work unchanged.
const (
	DefaultSDSSVIDName       = "default"
	DefaultSDSBundleName     = "ROOTCA"
	DefaultSDSAllBundlesName = "ALL"
)

// SDSConfig is spire-agent's sds block. Empty names take SPIRE's defaults.
type SDSConfig struct {
	// DefaultSVIDName names the caller's default X509-SVID.
	DefaultSVIDName string
	// DefaultBundleName names the validation context with the bundle of
	// the agent's trust domain.
	DefaultBundleName string
	// DefaultAllBundlesName names the validation context with every bundle
	// the caller may see; it needs Envoy's SPIFFE certificate validator.
	DefaultAllBundlesName string
	// DisableSPIFFECertValidation sends plain trusted CAs even to Envoys
	// that support the SPIFFE validator. Envoy may override it per node
	// with the node metadata key disable_spiffe_cert_validation.
	DisableSPIFFECertValidation bool
}

const (
	// secretTypeURL is the only resource type SDS serves.
	secretTypeURL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
	// spiffeValidatorName is Envoy's SPIFFE certificate validator extension.
	spiffeValidatorName = "envoy.tls.cert_validator.spiffe"
	// disableSPIFFEValidationKey lets Envoy turn the validator off for
	// itself, as spire-agent honours.
	disableSPIFFEValidationKey = "disable_spiffe_cert_validation"
	// maxNamesInError keeps an error about unknown names readable.
	maxNamesInError = 10
)

// registerSDS serves Envoy's SDS v3 beside the Workload API. Envoy sends no
// security header; the caller is attested the same way.
func registerSDS(s *grpc.Server, h *handler, cfg SDSConfig) {
	if cfg.DefaultSVIDName == "" {
		cfg.DefaultSVIDName = DefaultSDSSVIDName
	}
	if cfg.DefaultBundleName == "" {
		cfg.DefaultBundleName = DefaultSDSBundleName
	}
	if cfg.DefaultAllBundlesName == "" {
		cfg.DefaultAllBundlesName = DefaultSDSAllBundlesName
	}
	secretv3.RegisterSecretDiscoveryServiceServer(s, &sdsHandler{h: h, cfg: cfg})
}

type sdsHandler struct {
	secretv3.UnimplementedSecretDiscoveryServiceServer
	h   *handler
	cfg SDSConfig
}

// sdsView is what the cache holds for one caller.
type sdsView struct {
	svids     []*agent.X509SVID // nil: the caller has no identity
	local     *agent.Bundle
	federated []*agent.Bundle // sorted by trust domain
}

func (v *sdsView) same(o *sdsView) bool {
	return v != nil && o != nil && v.local == o.local &&
		slices.Equal(v.svids, o.svids) && slices.Equal(v.federated, o.federated)
}

// view reads the caller's SVIDs and bundles. A caller with no identity still
// gets the bundle of the agent's trust domain, as from spire-agent: it is
// public, and Envoy may only verify peers.
func (s *sdsHandler) view(ctx context.Context, sels []selector.Selector) (*sdsView, error) {
	snap, err := s.h.cfg.Identities.X509Identities(ctx, sels)
	if err == nil {
		return &sdsView{svids: snap.SVIDs, local: snap.Local, federated: snap.Federated}, nil
	}
	if !errors.Is(err, agent.ErrNoIdentity) {
		return nil, err
	}
	bundles, err := s.h.cfg.Identities.Bundles(ctx, sels, true)
	if err != nil {
		return nil, err
	}
	return &sdsView{local: bundles.Local}, nil
}

func checkTypeURL(typeURL string) error {
	if typeURL != "" && typeURL != secretTypeURL {
		return status.Errorf(codes.InvalidArgument, "SDS serves only %s, not %q: fix the type_url of the request", secretTypeURL, typeURL)
	}
	return nil
}

// StreamSecrets answers each new set of resource names, and pushes a new
// version whenever the caller's SVIDs or bundles change. ACKs and NACKs
// are logged and answered with nothing: resending what Envoy rejected
// would not help.
func (s *sdsHandler) StreamSecrets(stream grpc.BidiStreamingServer[discoveryv3.DiscoveryRequest, discoveryv3.DiscoveryResponse]) error {
	ctx := stream.Context()
	sels, caller, err := s.h.attest(ctx)
	if err != nil {
		return err
	}
	log := s.h.cfg.Log.With("pid", caller.PID)
	sub := s.h.cfg.Identities.Subscribe()
	defer sub.Close()
	tracked := s.h.cfg.Streams.Add(caller, "sds", "")
	defer s.h.cfg.Streams.Remove(tracked)

	reqs := make(chan *discoveryv3.DiscoveryRequest)
	recvErr := make(chan error, 1)
	done := make(chan struct{})
	defer close(done)
	go func() {
		for {
			req, err := stream.Recv()
			if err != nil {
				recvErr <- err
				return
			}
			select {
			case reqs <- req:
			case <-done:
				return
			}
		}
	}()

	var (
		view      *sdsView
		dirty     = true // view may be out of date
		version   int
		lastReq   *discoveryv3.DiscoveryRequest
		lastNonce string
	)
	for {
		namesChanged := false
		select {
		case req := <-reqs:
			if err := checkTypeURL(req.TypeUrl); err != nil {
				return err
			}
			log.Debug("Received an SDS request", "resource_names", req.ResourceNames, "version_info", req.VersionInfo, "nonce", req.ResponseNonce)
			if req.ErrorDetail != nil {
				log.Error("Envoy could not apply the secrets it was sent", "resource_names", req.ResourceNames, "error", req.ErrorDetail.Message)
			}
			if lastNonce != "" {
				// A reply to an older response is stale: a newer one is on
				// its way to Envoy.
				if req.ResponseNonce != lastNonce {
					log.Debug("Ignoring an SDS request with a stale nonce", "nonce", req.ResponseNonce, "expected", lastNonce)
					continue
				}
				if req.VersionInfo != strconv.Itoa(version) {
					log.Error("Envoy rejected SDS version and kept an older one", "rejected", version, "kept", req.VersionInfo)
				}
			}
			namesChanged = lastReq == nil || !sameNames(lastReq.ResourceNames, req.ResourceNames)
			lastReq = req
			if !namesChanged {
				continue
			}
		case <-sub.C:
			dirty = true
			if lastReq == nil {
				continue
			}
		case err := <-recvErr:
			if errors.Is(err, io.EOF) || status.Code(err) == codes.Canceled {
				return nil
			}
			return err
		case <-ctx.Done():
			return nil
		case <-s.h.stopping:
			return errShuttingDown
		}

		changed := false
		if dirty {
			next, err := s.view(ctx, sels)
			switch {
			case err != nil && view == nil:
				return statusOf(err)
			case err != nil:
				// Keep what Envoy has; the next change tries again.
				log.Warn("Could not update an SDS stream", "error", err)
			case !next.same(view):
				view, changed = next, true
				version++
			}
			dirty = err != nil
		}
		if !namesChanged && !changed {
			continue
		}
		resp, err := s.response(lastReq, view)
		if err != nil {
			return s.h.denied(ctx, caller, sels, err)
		}
		resp.VersionInfo = strconv.Itoa(version)
		resp.Nonce = rand.Text()
		log.Debug("Sending SDS response", "version_info", resp.VersionInfo, "nonce", resp.Nonce, "count", len(resp.Resources))
		if err := s.h.send(caller, func() error { return stream.Send(resp) }); err != nil {
			return err
		}
		lastNonce = resp.Nonce
		s.h.cfg.Streams.Sent(tracked, view.svids, nil)
	}
}

// sameNames compares resource name lists as sets; empty names mean nothing.
func sameNames(a, b []string) bool {
	set := func(names []string) []string {
		out := slices.DeleteFunc(slices.Clone(names), func(n string) bool { return n == "" })
		slices.Sort(out)
		return slices.Compact(out)
	}
	return slices.Equal(set(a), set(b))
}

// FetchSecrets answers one request; like spire-agent's, the response has no
// version or nonce.
func (s *sdsHandler) FetchSecrets(ctx context.Context, req *discoveryv3.DiscoveryRequest) (*discoveryv3.DiscoveryResponse, error) {
	if err := checkTypeURL(req.TypeUrl); err != nil {
		return nil, err
	}
	sels, caller, err := s.h.attest(ctx)
	if err != nil {
		return nil, err
	}
	view, err := s.view(ctx, sels)
	if err != nil {
		return nil, statusOf(err)
	}
	resp, err := s.response(req, view)
	return resp, s.h.denied(ctx, caller, sels, err)
}

func (s *sdsHandler) DeltaSecrets(grpc.BidiStreamingServer[discoveryv3.DeltaDiscoveryRequest, discoveryv3.DeltaDiscoveryResponse]) error {
	return status.Error(codes.Unimplemented, "incremental SDS (DeltaSecrets) is not implemented: configure Envoy's SDS api_type as GRPC, not DELTA_GRPC")
}

// response builds the secrets req names; no names means every secret the
// caller may have, each under its SPIFFE ID or trust domain ID.
func (s *sdsHandler) response(req *discoveryv3.DiscoveryRequest, view *sdsView) (*discoveryv3.DiscoveryResponse, error) {
	names := make(map[string]bool, len(req.ResourceNames))
	for _, n := range req.ResourceNames {
		if n != "" {
			names[n] = true
		}
	}
	all := len(names) == 0
	spiffeValidator := !s.spiffeValidationDisabled(req) && supportsSPIFFEValidator(req)
	resp := &discoveryv3.DiscoveryResponse{TypeUrl: secretTypeURL}
	add := func(secret *tlsv3.Secret, err error) error {
		if err != nil {
			return err
		}
		a, err := anypb.New(secret)
		if err != nil {
			return status.Errorf(codes.Internal, "encoding secret %q: %v", secret.Name, err)
		}
		resp.Resources = append(resp.Resources, a)
		delete(names, secret.Name)
		return nil
	}
	validation := func(name string, bundles ...*agent.Bundle) (*tlsv3.Secret, error) {
		if spiffeValidator {
			return spiffeValidationSecret(name, bundles)
		}
		return trustedCASecret(name, bundles[0])
	}

	if local := view.local; local != nil {
		td := local.TrustDomain().IDString()
		if all || names[td] {
			if err := add(validation(td, local)); err != nil {
				return nil, err
			}
		}
		if names[s.cfg.DefaultBundleName] {
			if err := add(validation(s.cfg.DefaultBundleName, local)); err != nil {
				return nil, err
			}
		}
		if names[s.cfg.DefaultAllBundlesName] {
			if !spiffeValidator {
				return nil, status.Errorf(codes.FailedPrecondition,
					"resource %q needs Envoy's SPIFFE certificate validator (Envoy 1.18 or later, with SPIFFE validation not disabled): request %q or trust domain IDs instead",
					s.cfg.DefaultAllBundlesName, s.cfg.DefaultBundleName)
			}
			if err := add(spiffeValidationSecret(s.cfg.DefaultAllBundlesName, append([]*agent.Bundle{local}, view.federated...))); err != nil {
				return nil, err
			}
		}
	}
	for _, b := range view.federated {
		if td := b.TrustDomain().IDString(); all || names[td] {
			if err := add(validation(td, b)); err != nil {
				return nil, err
			}
		}
	}
	served := make(map[string]bool, len(view.svids))
	for i, svid := range view.svids {
		// Entries may share a SPIFFE ID: the oldest is served.
		if id := svid.ID.String(); (all || names[id]) && !served[id] {
			served[id] = true
			if err := add(tlsCertificateSecret(id, svid)); err != nil {
				return nil, err
			}
		}
		if i == 0 && names[s.cfg.DefaultSVIDName] {
			if err := add(tlsCertificateSecret(s.cfg.DefaultSVIDName, svid)); err != nil {
				return nil, err
			}
		}
	}

	if len(names) > 0 {
		missing := make([]string, 0, len(names))
		for n := range names {
			missing = append(missing, n)
		}
		slices.Sort(missing)
		list := fmt.Sprintf("%q", missing)
		if len(missing) > maxNamesInError {
			list = fmt.Sprintf("%q and %d more", missing[:maxNamesInError], len(missing)-maxNamesInError)
		}
		if view.svids == nil {
			return nil, status.Errorf(codes.PermissionDenied, "no identity issued to this workload, so it cannot have the requested resources %s: register an entry whose selectors match it", list)
		}
		return nil, status.Errorf(codes.InvalidArgument, "workload is not authorized for the requested identities %s: request %q, %q, %q, one of its SPIFFE IDs or a trust domain ID it federates with",
			list, s.cfg.DefaultSVIDName, s.cfg.DefaultBundleName, s.cfg.DefaultAllBundlesName)
	}
	return resp, nil
}

// supportsSPIFFEValidator reports whether the Envoy has the SPIFFE
// certificate validator, which arrived in Envoy 1.18.
func supportsSPIFFEValidator(req *discoveryv3.DiscoveryRequest) bool {
	bv := req.GetNode().GetUserAgentBuildVersion()
	if bv == nil {
		return false
	}
	v := bv.GetVersion()
	return v.GetMajorNumber() > 1 || (v.GetMajorNumber() == 1 && v.GetMinorNumber() >= 18)
}

// spiffeValidationDisabled is the config's choice unless the Envoy's node
// metadata overrides it with a boolean or a string that parses as one.
func (s *sdsHandler) spiffeValidationDisabled(req *discoveryv3.DiscoveryRequest) bool {
	v, ok := req.GetNode().GetMetadata().GetFields()[disableSPIFFEValidationKey]
	if !ok {
		return s.cfg.DisableSPIFFECertValidation
	}
	switch k := v.GetKind().(type) {
	case *structpb.Value_BoolValue:
		return k.BoolValue
	case *structpb.Value_StringValue:
		if b, err := strconv.ParseBool(k.StringValue); err == nil {
			return b
		}
	}
	return s.cfg.DisableSPIFFECertValidation
}

func inlineBytes(b []byte) *corev3.DataSource {
	return &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: b}}
}

// trustedCASecret is a validation context for Envoys without the SPIFFE
// validator: the bundle's CAs, with no check of the peer's trust domain.
func trustedCASecret(name string, b *agent.Bundle) (*tlsv3.Secret, error) {
	cas, err := bundlePEM(b)
	if err != nil {
		return nil, err
	}
	return &tlsv3.Secret{
		Name: name,
		Type: &tlsv3.Secret_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
			TrustedCa: inlineBytes(cas),
		}},
	}, nil
}

// bundlePEM is the X.509 authorities of b as PEM.
func bundlePEM(b *agent.Bundle) ([]byte, error) {
	cas, err := b.X509Bundle().Marshal()
	if err != nil {
		return nil, status.Errorf(codes.Internal, "encoding the bundle of %s: %v", b.TrustDomain(), err)
	}
	return cas, nil
}

// spiffeValidationSecret has Envoy check each peer against the bundle of the
// peer's own trust domain.
func spiffeValidationSecret(name string, bundles []*agent.Bundle) (*tlsv3.Secret, error) {
	cfg := &tlsv3.SPIFFECertValidatorConfig{}
	for _, b := range bundles {
		cas, err := bundlePEM(b)
		if err != nil {
			return nil, err
		}
		cfg.TrustDomains = append(cfg.TrustDomains, &tlsv3.SPIFFECertValidatorConfig_TrustDomain{
			Name:        b.TrustDomain().Name(),
			TrustBundle: inlineBytes(cas),
		})
	}
	slices.SortFunc(cfg.TrustDomains, func(a, b *tlsv3.SPIFFECertValidatorConfig_TrustDomain) int {
		return strings.Compare(a.Name, b.Name)
	})
	typed, err := anypb.New(cfg)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "encoding the SPIFFE validator config of %q: %v", name, err)
	}
	return &tlsv3.Secret{
		Name: name,
		Type: &tlsv3.Secret_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
			CustomValidatorConfig: &corev3.TypedExtensionConfig{Name: spiffeValidatorName, TypedConfig: typed},
		}},
	}, nil
}

func tlsCertificateSecret(name string, svid *agent.X509SVID) (*tlsv3.Secret, error) {
	chain, key, err := (&x509svid.SVID{ID: svid.ID, Certificates: svid.Chain, PrivateKey: svid.Key}).Marshal()
	if err != nil {
		return nil, status.Errorf(codes.Internal, "encoding the SVID %s: %v", svid.ID, err)
	}
	return &tlsv3.Secret{
		Name: name,
		Type: &tlsv3.Secret_TlsCertificate{TlsCertificate: &tlsv3.TlsCertificate{
			CertificateChain: inlineBytes(chain),
			PrivateKey:       inlineBytes(key),
		}},
	}, nil
}
