// Package local is the embedded upstream CA: the agent keeps its own CA and
// JWT signing keys in its data directory and takes its registration entries
// from the config file. One host, no server.
package local

import (
	"context"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/conf"
	"github.com/lanyard-dev/lanyard/telemetry"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/time/rate"
)

func init() {
	agent.RegisterUpstream(agent.EmbeddedUpstream, New)
}

const (
	defaultX509SVIDTTL = time.Hour
	defaultJWTSVIDTTL  = 5 * time.Minute
	defaultCATTL       = 30 * 24 * time.Hour
	stateFileName      = "local_ca.json"
	// backdate allows for clocks a little behind ours.
	backdate = 10 * time.Second
	// warnEvery spaces the warnings that repeat while a state file
	// cannot be saved or is refused: often enough to be seen, not so often
	// that they bury the rest of the log.
	warnEvery = time.Minute
	// minRotateWait keeps Run from spinning when work that is due must
	// wait (an activation waiting for a save).
	minRotateWait = 100 * time.Millisecond
)

type pluginConfig struct {
	X509SVIDTTL      string                  `hcl:"x509_svid_ttl"`
	JWTSVIDTTL       string                  `hcl:"jwt_svid_ttl"`
	CATTL            string                  `hcl:"ca_ttl"`
	CACertPath       string                  `hcl:"ca_cert_path"`
	CAKeyPath        string                  `hcl:"ca_key_path"`
	Entries          []entryConfig           `hcl:"entry"`
	FederatedBundles []federatedBundleConfig `hcl:"federated_bundle"`
}

// settings is the parsed, validated plugin_data.
type settings struct {
	x509TTL, jwtTTL, caTTL time.Duration
	caCertPath, caKeyPath  string
	entries                []*agent.Entry
	federated              []*spiffebundle.Bundle
}

// Local is the embedded CA.
type Local struct {
	log       hclog.Logger
	metrics   *telemetry.Metrics // rotations; nil records nothing
	td        spiffeid.TrustDomain
	statePath string
	now       func() time.Time

	mu          sync.Mutex
	opened      bool // the state was loaded or created
	settings    *settings
	fileCA      *authority   // from ca_cert_path, or nil
	authorities []*authority // oldest first; empty while the CA is unavailable
	active      int
	seq         uint64
	stamp       fileStamp     // the state file as last read or written
	caErr       error         // why the CA is unavailable, or nil
	changed     chan struct{} // wakes Run after a reconfigure

	// The publication invariant: an authority signs only once the bundle
	// that holds it was handed to sink (which serves it to every stream
	// before SetBundles returns) and once it was saved (so that a restart
	// cannot lose a CA that workloads hold SVIDs from).
	sink      agent.Sink // set by Run
	published bool       // sink holds the bundle of authorities and settings.federated
	dirty     bool       // authorities, active or seq are not saved yet
	saveErr   error      // why the last save failed, or nil
	saveAt    time.Time  // when to try a failed save again
	saveRetry *agent.Backoff

	saveWarn, reloadWarn rate.Sometimes

	self     selfSVID
	lastSync atomic.Int64 // Unix ns of the last good publication
}

// unavailableError marks a CA state that exists but cannot be used now: the
// agent keeps serving what it has saved and retries, rather than exiting.
type unavailableError struct{ err error }

func (e *unavailableError) Error() string { return e.err.Error() }
func (e *unavailableError) Unwrap() error { return e.err }

// New builds the local CA from its plugin_data. It reads the files
// plugin_data names but no state: the authorities in the data directory
// are loaded, or created, on first use (see open).
func New(cfg agent.UpstreamConfig) (agent.Upstream, error) {
	s, err := parseSettings(cfg.Data, cfg.TrustDomain)
	if err != nil {
		return nil, err
	}
	l := &Local{
		log:       cfg.Log,
		metrics:   cfg.Metrics,
		td:        cfg.TrustDomain,
		statePath: filepath.Join(cfg.DataDir, stateFileName),
		now:       time.Now,
		settings:  s,
		changed:   make(chan struct{}, 1),
		saveRetry: agent.NewBackoff(min(time.Second, saveRetryMax(s.caTTL)), saveRetryMax(s.caTTL)),

		saveWarn:   rate.Sometimes{First: 1, Interval: warnEvery},
		reloadWarn: rate.Sometimes{First: 1, Interval: warnEvery},
	}
	if s.caCertPath != "" {
		fileCA, err := loadFileCA(s.caCertPath, s.caKeyPath)
		if err != nil {
			return nil, cfg.Data.Errorf("ca_cert_path", "%v", err)
		}
		if len(fileCA.root.URIs) == 1 && fileCA.root.URIs[0].String() != l.td.IDString() {
			return nil, cfg.Data.Errorf("ca_cert_path", "the CA has SPIFFE ID %s, not the trust domain's %s", fileCA.root.URIs[0], l.td.IDString())
		}
		l.fileCA = fileCA
	}
	return l, nil
}

func parseSettings(data *conf.Section, td spiffeid.TrustDomain) (*settings, error) {
	var pc pluginConfig
	if err := data.Decode(&pc); err != nil {
		return nil, err
	}
	s := &settings{x509TTL: defaultX509SVIDTTL, jwtTTL: defaultJWTSVIDTTL, caTTL: defaultCATTL,
		caCertPath: pc.CACertPath, caKeyPath: pc.CAKeyPath}
	var err error
	for _, d := range []struct {
		key, value string
		dst        *time.Duration
	}{{"x509_svid_ttl", pc.X509SVIDTTL, &s.x509TTL}, {"jwt_svid_ttl", pc.JWTSVIDTTL, &s.jwtTTL}, {"ca_ttl", pc.CATTL, &s.caTTL}} {
		if d.value == "" {
			continue
		}
		if *d.dst, err = data.Duration(d.key, d.value); err != nil {
			return nil, err
		}
	}
	if (s.caCertPath == "") != (s.caKeyPath == "") {
		set, missing := "ca_cert_path", "ca_key_path"
		if s.caCertPath == "" {
			set, missing = missing, set
		}
		return nil, data.Errorf(set, "%s is set without %s: set both to use your own CA, or neither to let the agent generate one", set, missing)
	}
	if s.x509TTL >= s.caTTL && s.caCertPath == "" {
		return nil, data.Errorf("x509_svid_ttl", "x509_svid_ttl (%s) must be shorter than ca_ttl (%s)", s.x509TTL, s.caTTL)
	}
	if s.entries, err = parseEntries(data, td, pc.Entries); err != nil {
		return nil, err
	}
	if s.federated, err = loadFederatedBundles(data, td, pc.FederatedBundles); err != nil {
		return nil, err
	}
	return s, nil
}

// Run publishes entries and bundles and rotates the CA until ctx ends. While
// the CA is unavailable it retries with capped backoff; entries are
// published regardless, as they come from the config.
func (l *Local) Run(ctx context.Context, sink agent.Sink) error {
	l.mu.Lock()
	err := l.openLocked()
	l.sink, l.published = sink, false
	l.mu.Unlock()
	if err != nil {
		sink.ReportUpstream(err)
		return err
	}
	l.publishEntries(sink)
	retry := agent.NewBackoff(time.Second, 30*time.Second)
	for {
		next := l.rotateOrRetry(sink, retry)
		if !l.sleepUntil(ctx, next, sink) {
			return nil
		}
	}
}

// rotateOrRetry rotates the CA when due and says when to look again: at
// its next rotation, or after a backoff while the CA is unavailable.
func (l *Local) rotateOrRetry(sink agent.Sink, retry *agent.Backoff) time.Time {
	next, _, err := l.rotate()
	sink.ReportUpstream(err)
	if err != nil {
		wait := retry.Next()
		l.log.Error("The local CA is unavailable; retrying", "retry_in", wait.Round(time.Millisecond), "error", err)
		return l.now().Add(wait)
	}
	retry.Reset()
	l.lastSync.Store(l.now().UnixNano())
	return next
}

// sleepUntil waits until t or a new config (published at once, and the CA
// looked at again, as its settings may have changed); it reports false
// when ctx ends first.
func (l *Local) sleepUntil(ctx context.Context, t time.Time, sink agent.Sink) bool {
	timer := time.NewTimer(max(t.Sub(l.now()), 0))
	defer timer.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-l.changed:
		l.publishEntries(sink)
	case <-timer.C:
	}
	return true
}

func (l *Local) publishEntries(sink agent.Sink) {
	l.mu.Lock()
	entries := l.settings.entries
	l.mu.Unlock()
	sink.SetEntries(entries)
}

// Resync reports false: the local CA's entries come from its config, so
// none can have been created since they were delivered.
func (l *Local) Resync(context.Context) (bool, error) { return false, nil }

// Reconfigure applies new plugin_data (on SIGHUP): entries and federated
// bundles. It changes nothing when the data is invalid.
func (l *Local) Reconfigure(data *conf.Section) error {
	s, err := parseSettings(data, l.td)
	if err != nil {
		return err
	}
	l.mu.Lock()
	if s.caCertPath != l.settings.caCertPath || s.caKeyPath != l.settings.caKeyPath || s.caTTL != l.settings.caTTL {
		l.log.Warn("ca_cert_path, ca_key_path and ca_ttl take effect at the next start, not on reload")
		s.caCertPath, s.caKeyPath, s.caTTL = l.settings.caCertPath, l.settings.caKeyPath, l.settings.caTTL
	}
	l.settings = s
	l.published = false // the federated bundles may have changed
	l.mu.Unlock()
	select {
	case l.changed <- struct{}{}:
	default:
	}
	return nil
}

// fileStamp identifies a version of a file without reading it.
type fileStamp struct {
	ino   uint64
	size  int64
	mtime time.Time
}

func statStamp(path string) (fileStamp, error) {
	info, err := os.Lstat(path)
	if err != nil {
		return fileStamp{}, err
	}
	st := fileStamp{size: info.Size(), mtime: info.ModTime()}
	if sys, ok := info.Sys().(*syscall.Stat_t); ok {
		st.ino = sys.Ino
	}
	return st, nil
}
