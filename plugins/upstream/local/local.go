// Package local is the embedded upstream CA: the agent keeps its own CA and
// JWT signing keys in its data directory and takes its registration entries
// from the config file. One host, no server.
package local

import (
	"context"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/conf"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

func init() {
	agent.RegisterUpstream("local", New)
}

const (
	defaultX509SVIDTTL = time.Hour
	defaultJWTSVIDTTL  = 5 * time.Minute
	defaultCATTL       = 30 * 24 * time.Hour
	stateFileName      = "local_ca.json"
	// backdate allows for clocks a little behind ours.
	backdate = 10 * time.Second
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
	td        spiffeid.TrustDomain
	statePath string
	now       func() time.Time

	mu          sync.Mutex
	settings    *settings
	fileCA      *authority   // from ca_cert_path, or nil
	authorities []*authority // oldest first; empty while the CA is unavailable
	active      int
	seq         uint64
	stamp       fileStamp     // the state file as last read or written
	caErr       error         // why the CA is unavailable, or nil
	changed     chan struct{} // wakes Run after a reconfigure
}

// unavailableError marks a CA state that exists but cannot be used now: the
// agent keeps serving what it has saved and retries, rather than exiting.
type unavailableError struct{ err error }

func (e *unavailableError) Error() string { return e.err.Error() }
func (e *unavailableError) Unwrap() error { return e.err }

// New builds the local CA from its plugin_data and loads or creates its
// authorities in the data directory.
func New(cfg agent.UpstreamConfig) (agent.Upstream, error) {
	s, err := parseSettings(cfg.Data, cfg.TrustDomain)
	if err != nil {
		return nil, err
	}
	l := &Local{
		log:       cfg.Log,
		td:        cfg.TrustDomain,
		statePath: filepath.Join(cfg.DataDir, stateFileName),
		now:       time.Now,
		settings:  s,
		changed:   make(chan struct{}, 1),
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
	if err := l.loadAuthorities(); err != nil {
		var unavailable *unavailableError
		if !errors.As(err, &unavailable) {
			return nil, err
		}
		l.caErr = err
		l.log.Error("The local CA cannot be loaded; saved SVIDs are served until it can", "error", err)
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

// loadAuthorities loads the CA state from the data directory, or creates it
// on the first start.
func (l *Local) loadAuthorities() error {
	fileCA := l.fileCA
	auths, active, seq, err := loadState(l.statePath, fileCA)
	if err != nil {
		return &unavailableError{err}
	}
	l.seq = seq
	now := l.now()
	if len(auths) > 0 && !now.Before(auths[active].notAfter) && active < len(auths)-1 && now.Before(auths[len(auths)-1].notAfter) {
		// The agent was down past the activation point: take the prepared one.
		active = len(auths) - 1
	}
	if len(auths) == 0 || !now.Before(auths[active].notAfter) {
		a, err := l.newAuthority(fileCA, now)
		if err != nil {
			return err
		}
		auths, active = append(auths, a), len(auths)
		l.log.Info("Created a new local CA", "trust_domain", l.td, "not_after", a.notAfter, "state", l.statePath)
	} else {
		l.log.Info("Loaded the local CA", "trust_domain", l.td, "not_after", auths[active].notAfter, "state", l.statePath)
	}
	auths, active = pruneExpired(auths, active, now)
	if err := l.save(auths, active); err != nil {
		return &unavailableError{err}
	}
	l.authorities, l.active = auths, active
	return nil
}

// save writes the CA state and remembers its stamp, so that ensureCA can
// tell our own writes from someone else's.
func (l *Local) save(auths []*authority, active int) error {
	if err := saveState(l.statePath, auths, active, l.seq, l.fileCA != nil); err != nil {
		return err
	}
	st, err := statStamp(l.statePath)
	if err != nil {
		return err
	}
	l.stamp = st
	return nil
}

// ensureCALocked makes sure the CA in memory is the one on disk: the state
// file is the source of truth. A file that changed is reloaded; one that is
// gone or unreadable makes the CA unavailable (signing fails, and the agent
// serves what it has) until it is back. It is never silently replaced.
func (l *Local) ensureCALocked() (reloaded bool, err error) {
	st, err := statStamp(l.statePath)
	if err == nil && l.caErr == nil && st == l.stamp {
		return false, nil
	}
	if err != nil {
		l.caErr = fmt.Errorf("the CA state %s: %w", l.statePath, err)
		return false, l.caErr
	}
	auths, active, seq, err := loadState(l.statePath, l.fileCA)
	if err == nil && len(auths) == 0 {
		err = fmt.Errorf("the CA state %s holds no CA", l.statePath)
	}
	if err != nil {
		l.caErr = err
		return false, err
	}
	if l.caErr != nil {
		l.log.Info("The local CA is available again", "state", l.statePath)
	}
	l.authorities, l.active, l.stamp, l.caErr = auths, active, st, nil
	l.seq = max(l.seq, seq) + 1
	return true, nil
}

func (l *Local) newAuthority(fileCA *authority, now time.Time) (*authority, error) {
	if fileCA == nil {
		return newAuthority(l.td, l.settings.caTTL, now)
	}
	a := *fileCA
	if err := a.newJWTKey(); err != nil {
		return nil, err
	}
	// A CA from a file is not ours to renew: only its JWT keys rotate, each
	// generation living from now for ca_ttl, within the CA's own life.
	a.notBefore = now
	a.notAfter = minTime(fileCA.notAfter, now.Add(l.settings.caTTL))
	return &a, nil
}

func pruneExpired(auths []*authority, active int, now time.Time) ([]*authority, int) {
	out := auths[:0]
	newActive := 0
	for i, a := range auths {
		if i != active && !now.Before(a.notAfter) {
			continue
		}
		if i == active {
			newActive = len(out)
		}
		out = append(out, a)
	}
	return out, newActive
}

// Run publishes entries and bundles and rotates the CA until ctx ends. While
// the CA is unavailable it retries with capped backoff; entries are
// published regardless, as they come from the config.
func (l *Local) Run(ctx context.Context, sink agent.Sink) error {
	l.publishEntries(sink)
	published := false
	retry := agent.NewBackoff(time.Second, 30*time.Second)
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-l.changed:
			l.publishEntries(sink)
			published = false
		case <-timer.C:
		}
		next, changed, err := l.rotate()
		if r, ok := sink.(agent.UpstreamReporter); ok {
			r.ReportUpstream(err)
		}
		if err != nil {
			wait := retry.Next()
			l.log.Error("The local CA is unavailable; retrying", "retry_in", wait.Round(time.Millisecond), "error", err)
			next = l.now().Add(wait)
		} else {
			retry.Reset()
			if changed || !published {
				local, federated, ok := l.bundles()
				if ok {
					sink.SetBundles(local, federated)
					published = true
				}
			}
		}
		if !timer.Stop() {
			select {
			case <-timer.C:
			default:
			}
		}
		timer.Reset(max(next.Sub(l.now()), 0))
	}
}

func (l *Local) publishEntries(sink agent.Sink) {
	l.mu.Lock()
	entries := l.settings.entries
	l.mu.Unlock()
	sink.SetEntries(entries)
}

// rotate prepares, activates and retires authorities as they age, and
// returns when it next has work.
func (l *Local) rotate() (next time.Time, changed bool, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now()
	if changed, err = l.ensureCALocked(); err != nil {
		return now, false, err
	}
	active := l.authorities[l.active]
	prepared := l.active < len(l.authorities)-1
	fileCA := l.fileCA
	// A successor that would not outlive the active authority (a CA from a
	// file near its end) is pointless: the file's CA must be replaced.
	endOfLine := fileCA != nil && !fileCA.notAfter.After(active.notAfter)
	if !prepared && !endOfLine && !now.Before(active.at(prepareAt)) {
		a, err := l.newAuthority(fileCA, now)
		if err != nil {
			return now, false, err
		}
		l.authorities = append(l.authorities, a)
		prepared, changed = true, true
		l.log.Info("Prepared the next local CA; it is in the bundle from now on", "not_after", a.notAfter)
	}
	if prepared && !now.Before(active.at(activateAt)) {
		l.active = len(l.authorities) - 1
		active, prepared, changed = l.authorities[l.active], false, true
		l.log.Info("Activated the next local CA", "not_after", active.notAfter)
	}
	before := len(l.authorities)
	l.authorities, l.active = pruneExpired(l.authorities, l.active, now)
	changed = changed || len(l.authorities) != before
	if changed {
		l.seq++
		if err := l.save(l.authorities, l.active); err != nil {
			return now, changed, err
		}
	}
	next = active.at(activateAt)
	switch {
	case endOfLine:
		next = active.notAfter
		if !now.Before(active.at(prepareAt)) {
			l.log.Warn("The CA in ca_cert_path expires soon and cannot be renewed by the agent: replace it", "not_after", fileCA.notAfter)
		}
	case !prepared:
		next = active.at(prepareAt)
	}
	for _, a := range l.authorities {
		if a.notAfter.Before(next) {
			next = a.notAfter
		}
	}
	return next, changed, nil
}

// bundles returns the local bundle, with every unexpired authority, and the
// configured federated bundles; ok is false while the CA is unavailable.
func (l *Local) bundles() (local *spiffebundle.Bundle, federated []*spiffebundle.Bundle, ok bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.authorities) == 0 {
		return nil, nil, false
	}
	b := spiffebundle.New(l.td)
	for _, a := range l.authorities {
		if !b.HasX509Authority(a.root) {
			b.AddX509Authority(a.root)
		}
		_ = b.AddJWTAuthority(a.jwtKID, a.jwtKey.Public())
	}
	b.SetSequenceNumber(l.seq)
	return b, l.settings.federated, true
}

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
	l.mu.Unlock()
	select {
	case l.changed <- struct{}{}:
	default:
	}
	return nil
}

// activeCA returns the signing authority, checking first that the state on
// disk has not changed or gone.
func (l *Local) activeCA() (*authority, *settings, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	reloaded, err := l.ensureCALocked()
	if err != nil {
		return nil, nil, fmt.Errorf("the local CA is unavailable: %w", err)
	}
	if reloaded {
		// Wake Run to publish the reloaded bundle: peers must trust what we sign.
		select {
		case l.changed <- struct{}{}:
		default:
		}
	}
	return l.authorities[l.active], l.settings, nil
}

// MintX509SVIDs signs X509-SVIDs with the active CA.
func (l *Local) MintX509SVIDs(_ context.Context, reqs []agent.X509Request) ([]agent.X509Result, error) {
	ca, s, err := l.activeCA()
	if err != nil {
		return nil, err
	}
	defaultTTL := s.x509TTL
	out := make([]agent.X509Result, len(reqs))
	now := l.now()
	for i, req := range reqs {
		out[i].Chain, out[i].Err = signX509SVID(ca, req, defaultTTL, now)
	}
	return out, nil
}

func signX509SVID(ca *authority, req agent.X509Request, defaultTTL time.Duration, now time.Time) ([]*x509.Certificate, error) {
	ttl := req.Entry.X509SVIDTTL
	if ttl == 0 {
		ttl = defaultTTL
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, err
	}
	id, err := url.Parse(req.Entry.SPIFFEID.String())
	if err != nil {
		return nil, err
	}
	subject := pkix.Name{Organization: []string{"Lanyard"}}
	if len(req.Entry.DNSNames) > 0 {
		subject.CommonName = req.Entry.DNSNames[0]
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               subject,
		URIs:                  []*url.URL{id},
		DNSNames:              req.Entry.DNSNames,
		NotBefore:             now.Add(-backdate),
		NotAfter:              minTime(now.Add(ttl), ca.cert.NotAfter),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, req.Key.Public(), ca.key)
	if err != nil {
		return nil, fmt.Errorf("signing the X509-SVID for %s: %w", req.Entry.SPIFFEID, err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return append([]*x509.Certificate{leaf}, ca.chain...), nil
}

// MintJWTSVID signs a JWT-SVID with the active JWT key.
func (l *Local) MintJWTSVID(_ context.Context, entry *agent.Entry, audience []string) (*agent.JWTSVID, error) {
	ca, s, err := l.activeCA()
	if err != nil {
		return nil, err
	}
	ttl := s.jwtTTL
	if entry.JWTSVIDTTL != 0 {
		ttl = entry.JWTSVIDTTL
	}
	now := l.now()
	exp := minTime(now.Add(ttl), ca.notAfter)
	signer, err := jose.NewSigner(
		jose.SigningKey{Algorithm: jose.ES256, Key: jose.JSONWebKey{Key: ca.jwtKey, KeyID: ca.jwtKID}},
		(&jose.SignerOptions{}).WithType("JWT"))
	if err != nil {
		return nil, fmt.Errorf("preparing the JWT signer: %w", err)
	}
	claims := jwt.Claims{
		Subject:  entry.SPIFFEID.String(),
		Audience: jwt.Audience(audience),
		Expiry:   jwt.NewNumericDate(exp),
		IssuedAt: jwt.NewNumericDate(now),
	}
	token, err := jwt.Signed(signer).Claims(claims).Serialize()
	if err != nil {
		return nil, fmt.Errorf("signing the JWT-SVID for %s: %w", entry.SPIFFEID, err)
	}
	return &agent.JWTSVID{
		Token:     token,
		ID:        entry.SPIFFEID,
		Audience:  audience,
		IssuedAt:  now.Truncate(time.Second),
		ExpiresAt: exp.Truncate(time.Second),
	}, nil
}

func minTime(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}

// fileStamp identifies a version of a file without reading it.
type fileStamp struct {
	ino   uint64
	size  int64
	mtime time.Time
}

func statStamp(path string) (fileStamp, error) {
	info, err := os.Stat(path)
	if err != nil {
		return fileStamp{}, err
	}
	st := fileStamp{size: info.Size(), mtime: info.ModTime()}
	if sys, ok := info.Sys().(*syscall.Stat_t); ok {
		st.ino = sys.Ino
	}
	return st, nil
}
