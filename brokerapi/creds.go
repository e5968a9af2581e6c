package brokerapi

import (
	"context"
	"fmt"
	"net"

	"github.com/lanyard-dev/lanyard/agent"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
)

// brokerCreds is gRPC's TLS with what the handlers need of a connection:
// the broker's SPIFFE ID, read once from the certificate the handshake
// verified, and the connection, to close it under a broker that stops
// reading its stream.
type brokerCreds struct {
	credentials.TransportCredentials
}

// brokerInfo is the AuthInfo of a broker's connection.
type brokerInfo struct {
	credentials.TLSInfo
	id   spiffeid.ID
	conn net.Conn
}

func (c brokerCreds) ServerHandshake(raw net.Conn) (net.Conn, credentials.AuthInfo, error) {
	conn, info, err := c.TransportCredentials.ServerHandshake(raw)
	if err != nil {
		return nil, nil, err
	}
	tlsInfo, ok := info.(credentials.TLSInfo)
	if !ok || len(tlsInfo.State.PeerCertificates) == 0 {
		conn.Close()
		return nil, nil, fmt.Errorf("the broker's handshake left no certificate (%T)", info)
	}
	// The authorizer accepted this ID already; it cannot fail here.
	id, err := x509svid.IDFromCert(tlsInfo.State.PeerCertificates[0])
	if err != nil {
		conn.Close()
		return nil, nil, fmt.Errorf("the broker's certificate has no SPIFFE ID: %w", err)
	}
	return conn, &brokerInfo{TLSInfo: tlsInfo, id: id, conn: conn}, nil
}

func (c brokerCreds) Clone() credentials.TransportCredentials {
	return brokerCreds{c.TransportCredentials.Clone()}
}

// brokerOf returns the broker of a call.
func brokerOf(ctx context.Context) (*brokerInfo, error) {
	if p, ok := peer.FromContext(ctx); ok {
		if info, ok := p.AuthInfo.(*brokerInfo); ok {
			return info, nil
		}
	}
	return nil, status.Error(codes.Unauthenticated, "the caller presented no X509-SVID")
}

// overUnixSocket reports whether a call came over the Unix socket; any
// other transport counts as TCP.
func overUnixSocket(ctx context.Context) bool {
	p, ok := peer.FromContext(ctx)
	return ok && p.Addr != nil && p.Addr.Network() == "unix"
}

// cacheBundles verifies brokers with the agent's bundles, its own and
// every federated one (brokers of another trust domain are allowed, as in
// SPIRE), read at each handshake, so that a CA rotation or a new
// federation applies to the next connection.
type cacheBundles struct{ ids Identities }

func (c cacheBundles) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	snap, err := c.ids.AllBundles(context.Background())
	if err != nil {
		return nil, err
	}
	for _, b := range append([]*agent.Bundle{snap.Local}, snap.Federated...) {
		if b != nil && b.TrustDomain() == td {
			return b.X509Bundle(), nil
		}
	}
	return nil, fmt.Errorf("the agent has no bundle for trust domain %q: federate with it to serve its brokers", td.Name())
}
