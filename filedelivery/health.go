package filedelivery

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"
)

// outputX509 names the X.509 files (and credential folder) in writeState;
// JWT outputs are named by their file.
const outputX509 = "x509"

// writeState is the outcome of the last write of every output, for the
// health listener and for knowing when the first complete set is on disk.
type writeState struct {
	mu  sync.Mutex
	out map[string]string // output -> "unwritten", "written" or "failed"
}

func newWriteState(c *Config) *writeState {
	s := &writeState{out: map[string]string{}}
	if c.X509Enabled() {
		s.out[outputX509] = "unwritten"
	}
	if c.JWTBundleFile != "" {
		s.out[c.JWTBundleFile] = "unwritten"
	}
	for _, j := range c.JWTSVIDs {
		s.out[j.FileName] = "unwritten"
	}
	return s
}

func (s *writeState) set(output string, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil {
		s.out[output] = "failed"
	} else {
		s.out[output] = "written"
	}
}

func (s *writeState) allWritten() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, v := range s.out {
		if v != "written" {
			return false
		}
	}
	return true
}

// live is spiffe-helper's liveness: no output's last write failed.
func (s *writeState) live() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, v := range s.out {
		if v == "failed" {
			return false
		}
	}
	return true
}

func (s *writeState) snapshot() map[string]string {
	s.mu.Lock()
	defer s.mu.Unlock()
	m := make(map[string]string, len(s.out))
	for k, v := range s.out {
		m[k] = v
	}
	return m
}

type healthServer struct {
	ln  net.Listener
	srv *http.Server
}

// newHealthServer binds the port now, so that a busy port fails the
// start plainly.
func newHealthServer(c HealthChecks, state *writeState) (*healthServer, error) {
	ln, err := net.Listen("tcp", ":"+strconv.Itoa(c.BindPort))
	if err != nil {
		return nil, err
	}
	mux := http.NewServeMux()
	reply := func(w http.ResponseWriter, ok bool) {
		code := http.StatusOK
		if !ok {
			code = http.StatusServiceUnavailable
		}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(code)
		_ = json.NewEncoder(w).Encode(map[string]any{"status": http.StatusText(code), "files": state.snapshot()})
	}
	mux.HandleFunc(c.LivenessPath, func(w http.ResponseWriter, _ *http.Request) { reply(w, state.live()) })
	mux.HandleFunc(c.ReadinessPath, func(w http.ResponseWriter, _ *http.Request) { reply(w, state.allWritten()) })
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second, WriteTimeout: 5 * time.Second, MaxHeaderBytes: 8 << 10}
	return &healthServer{ln: ln, srv: srv}, nil
}

// Addr is where it listens.
func (s *healthServer) Addr() net.Addr { return s.ln.Addr() }

func (s *healthServer) serve(ctx context.Context) error {
	go func() {
		<-ctx.Done()
		_ = s.srv.Close()
	}()
	if err := s.srv.Serve(s.ln); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}
