package bench

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"sync"
	"syscall"

	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
)

// The floor is the least a Workload API server on a Unix socket can do: a
// bare gRPC server that reads the caller's peer credentials when it
// accepts, reads /proc/<pid>/status on every call (as any attestation
// must), and answers a canned response. Every agent figure is read
// against it.

// Floor serves canned Workload API answers.
type Floor struct {
	workload.UnimplementedSpiffeWorkloadAPIServer
	X509 *workload.X509SVIDResponse
	JWT  *workload.JWTSVIDResponse
}

// NewFloorServer returns the floor's gRPC server.
func NewFloorServer(f *Floor) *grpc.Server {
	s := grpc.NewServer(grpc.Creds(floorCreds{}))
	workload.RegisterSpiffeWorkloadAPIServer(s, f)
	return s
}

// ServeFloor serves the floor on a new socket at path until ctx ends.
func ServeFloor(ctx context.Context, path string, f *Floor) error {
	_ = os.Remove(path)
	l, err := net.Listen("unix", path)
	if err != nil {
		return err
	}
	s := NewFloorServer(f)
	go func() {
		<-ctx.Done()
		s.Stop()
	}()
	if err := s.Serve(l); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		return err
	}
	return nil
}

// FetchX509SVID answers the canned response, then holds the stream open
// as an agent does, until the client ends it.
func (f *Floor) FetchX509SVID(_ *workload.X509SVIDRequest, stream grpc.ServerStreamingServer[workload.X509SVIDResponse]) error {
	if err := readCaller(stream.Context()); err != nil {
		return err
	}
	if err := stream.Send(f.X509); err != nil {
		return err
	}
	<-stream.Context().Done()
	return nil
}

// FetchJWTSVID answers the canned response.
func (f *Floor) FetchJWTSVID(ctx context.Context, _ *workload.JWTSVIDRequest) (*workload.JWTSVIDResponse, error) {
	if err := readCaller(ctx); err != nil {
		return nil, err
	}
	return f.JWT, nil
}

var statusBufs = sync.Pool{New: func() any { return new([2048]byte) }}

// readCaller reads the caller's /proc/<pid>/status, the file a unix
// attestor reads.
func readCaller(ctx context.Context) error {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return status.Error(codes.Unauthenticated, "no peer")
	}
	info, ok := p.AuthInfo.(floorInfo)
	if !ok {
		return status.Error(codes.Unauthenticated, "no peer credentials")
	}
	buf := statusBufs.Get().(*[2048]byte)
	defer statusBufs.Put(buf)
	fd, err := unix.Open("/proc/"+strconv.Itoa(int(info.pid))+"/status", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return status.Errorf(codes.Unauthenticated, "reading the caller's status: %v", err)
	}
	n, err := unix.Read(fd, buf[:])
	unix.Close(fd)
	if err != nil || !bytes.Contains(buf[:max(n, 0)], []byte("\nUid:")) {
		return status.Errorf(codes.Unauthenticated, "reading the caller's status: %v", err)
	}
	return nil
}

type floorInfo struct {
	credentials.CommonAuthInfo
	pid int32
}

func (floorInfo) AuthType() string { return "floor-peercred" }

// floorCreds reads SO_PEERCRED at accept.
type floorCreds struct{}

func (floorCreds) ServerHandshake(conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	sc, ok := conn.(syscall.Conn)
	if !ok {
		return nil, nil, fmt.Errorf("the floor serves Unix sockets only, not %T", conn)
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return nil, nil, err
	}
	var cred *unix.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return nil, nil, err
	}
	if credErr != nil {
		return nil, nil, credErr
	}
	return conn, floorInfo{CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.NoSecurity}, pid: cred.Pid}, nil
}

func (floorCreds) ClientHandshake(_ context.Context, _ string, conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return conn, floorInfo{CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.NoSecurity}}, nil
}

func (floorCreds) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: "insecure"}
}

func (floorCreds) Clone() credentials.TransportCredentials { return floorCreds{} }

func (floorCreds) OverrideServerName(string) error { return nil }
