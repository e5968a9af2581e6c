package main

import (
	"bufio"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// mtlsPeer is a workload that lives through its agent's restarts: it holds
// one X509Source (a Workload API stream that go-spiffe reconnects), serves
// mTLS on a loopback port it writes to DIR/$POD_NAME, and every interval
// dials each other peer listed in DIR, authorizing only peerID. Each line
// it prints starts with the Unix time in milliseconds:
//
//	<ms> source <id> bundle <fingerprint>   the stream delivered (again)
//	<ms> watch-error <err>                  the stream broke; go-spiffe retries
//	<ms> svid <id> / <ms> error <err>       a fresh fetch on a new connection
//	<ms> mtls <peer> ok <peer's answer> / <ms> mtls <peer> error <err>
//
// The fresh fetches count what a restarting agent costs a new caller; the
// source lines show that the stream came back with the same identity and
// trust bundle.
func mtlsPeer(ctx context.Context, dir, peerID string) error {
	self := os.Getenv("POD_NAME")
	if self == "" {
		return fmt.Errorf("mtls-peer needs POD_NAME")
	}
	authorized, err := spiffeid.FromString(peerID)
	if err != nil {
		return err
	}
	interval := durationEnv("WORKLOAD_INTERVAL", 500*time.Millisecond)
	timeout := durationEnv("WORKLOAD_TIMEOUT", 5*time.Second)

	source, err := workloadapi.NewX509Source(ctx, workloadapi.WithClientOptions(workloadapi.WithLogger(watchLog{})))
	if err != nil {
		return err
	}
	defer source.Close()
	logSource(source, authorized.TrustDomain())
	go func() {
		for {
			select {
			case <-ctx.Done():
				return
			case <-source.Updated():
				logSource(source, authorized.TrustDomain())
			}
		}
	}()

	serverConf := tlsconfig.MTLSServerConfig(source, source, tlsconfig.AuthorizeID(authorized))
	ln, err := tls.Listen("tcp", "127.0.0.1:0", serverConf)
	if err != nil {
		return err
	}
	defer ln.Close()
	go serve(ln, self)
	if err := publish(dir, self, ln.Addr().String()); err != nil {
		return err
	}
	defer os.Remove(filepath.Join(dir, self))

	clientConf := tlsconfig.MTLSClientConfig(source, source, tlsconfig.AuthorizeID(authorized))
	for {
		fetch(ctx, timeout)
		callPeers(ctx, dir, self, clientConf, timeout)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(interval):
		}
	}
}

var printMu sync.Mutex

// logf prints one line, stamped with the Unix time in milliseconds.
func logf(format string, args ...any) {
	printMu.Lock()
	defer printMu.Unlock()
	fmt.Printf("%d %s\n", time.Now().UnixMilli(), fmt.Sprintf(format, args...))
}

// watchLog takes go-spiffe's log: its errors are the stream's breaks.
type watchLog struct{}

func (watchLog) Debugf(string, ...any) {}
func (watchLog) Infof(string, ...any)  {}
func (watchLog) Warnf(format string, args ...any) {
	logf("watch-warning %s", oneLine(fmt.Sprintf(format, args...)))
}
func (watchLog) Errorf(format string, args ...any) {
	logf("watch-error %s", oneLine(fmt.Sprintf(format, args...)))
}

func oneLine(s string) string { return strings.ReplaceAll(s, "\n", " ") }

// logSource prints the source's SVID and a fingerprint of its trust bundle.
func logSource(source *workloadapi.X509Source, td spiffeid.TrustDomain) {
	svid, err := source.GetX509SVID()
	if err != nil {
		logf("source-error %v", err)
		return
	}
	bundle, err := source.GetX509BundleForTrustDomain(td)
	if err != nil {
		logf("source-error %v", err)
		return
	}
	h := sha256.New()
	for _, cert := range bundle.X509Authorities() {
		h.Write(cert.Raw)
	}
	logf("source %s bundle %x", svid.ID, h.Sum(nil)[:8])
}

// fetch asks for the SVID on a new connection: a new attestation.
func fetch(ctx context.Context, timeout time.Duration) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	svid, err := workloadapi.FetchX509SVID(ctx)
	if err != nil {
		logf("error %s", oneLine(err.Error()))
		return
	}
	logf("svid %s", svid.ID)
}

// publish writes addr to dir/name, whole or not at all.
func publish(dir, name, addr string) error {
	tmp := filepath.Join(dir, "."+name)
	if err := os.WriteFile(tmp, []byte(addr), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(dir, name))
}

// serve answers each line a peer sends with this pod's name.
func serve(ln net.Listener, self string) {
	for {
		conn, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer conn.Close()
			_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
			if _, err := bufio.NewReader(io.LimitReader(conn, 1<<10)).ReadString('\n'); err != nil {
				return
			}
			fmt.Fprintf(conn, "hello-from-%s\n", self)
		}()
	}
}

// callPeers dials every other peer in dir over mTLS and logs the outcome.
func callPeers(ctx context.Context, dir, self string, conf *tls.Config, timeout time.Duration) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		logf("mtls - error %v", err)
		return
	}
	for _, e := range entries {
		peer := e.Name()
		if peer == self || strings.HasPrefix(peer, ".") {
			continue
		}
		addr, err := os.ReadFile(filepath.Join(dir, peer))
		if err != nil {
			continue // it went away
		}
		answer, err := call(ctx, string(addr), conf, self, timeout)
		if err != nil {
			logf("mtls %s error %s", peer, oneLine(err.Error()))
			continue
		}
		logf("mtls %s ok %s", peer, answer)
	}
}

func call(ctx context.Context, addr string, conf *tls.Config, self string, timeout time.Duration) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	dialer := tls.Dialer{Config: conf}
	conn, err := dialer.DialContext(ctx, "tcp", addr)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	deadline, _ := ctx.Deadline()
	_ = conn.SetDeadline(deadline)
	if _, err := fmt.Fprintf(conn, "hello-from-%s\n", self); err != nil {
		return "", err
	}
	line, err := bufio.NewReader(io.LimitReader(conn, 1<<10)).ReadString('\n')
	return strings.TrimSpace(line), err
}
