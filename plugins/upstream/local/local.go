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
	"golang.org/x/time/rate"
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
	for _, a := range auths {
		a.saved = true // read from the state file
	}
	now := l.now()
	if len(auths) > 0 && !now.Before(auths[active].notAfter) && active < len(auths)-1 && now.Before(auths[len(auths)-1].notAfter) {
		// The agent was down past the activation point: take the prepared one.
		active = len(auths) - 1
	}
	switch {
	case len(auths) == 0:
		a, err := l.newAuthority(fileCA, now)
		if err != nil {
			return err
		}
		auths, active = append(auths, a), len(auths)
		l.logCreated(a)
	case !now.Before(auths[active].notAfter):
		a, err := l.newAuthority(fileCA, now)
		if err != nil {
			return err
		}
		auths, active = append(auths, a), len(auths)
		l.log.Info("Created a new local CA: the saved one expired", "trust_domain", l.td, "not_after", a.notAfter, "state", l.statePath, "fingerprint", agent.Fingerprint(a.root))
	default:
		l.log.Info("Loaded the local CA", "trust_domain", l.td, "not_after", auths[active].notAfter, "state", l.statePath, "fingerprint", agent.Fingerprint(auths[active].root))
	}
	l.authorities, l.active = pruneExpired(auths, active, now)
	l.dirty = true
	// A CA that cannot be saved yet does not sign (see signerLocked); Run
	// retries the save.
	l.saveLocked(now)
	return nil
}

// logCreated logs a new CA made where there was no state file. When the
// saved cache holds a bundle, the state file was there before and is gone
// (deleted, or lost with a disk): workloads hold SVIDs and bundles of the
// old CA, which the new bundle no longer has, so say so loudly.
func (l *Local) logCreated(a *authority) {
	saved, err := agent.SavedBundle(filepath.Dir(l.statePath), l.td)
	if err != nil || saved == nil || len(saved.X509Authorities()) == 0 || saved.HasX509Authority(a.root) {
		l.log.Info("Created a new local CA", "trust_domain", l.td, "not_after", a.notAfter, "state", l.statePath, "fingerprint", agent.Fingerprint(a.root))
		return
	}
	var old []string
	for _, c := range saved.X509Authorities() {
		old = append(old, agent.Fingerprint(c))
	}
	l.log.Warn("The local CA state is missing but the saved cache is not: created a new CA that replaces the old one, without overlap. "+
		"The old CA leaves the bundle as soon as the new one is published: SVIDs signed by it (and JWT-SVIDs signed by its key) stop verifying, "+
		"and the agent re-signs every cached SVID with the new CA. Restore the state file from a backup instead if you have one, and give the new bundle to anyone who federates with this trust domain",
		"trust_domain", l.td, "state", l.statePath, "old_fingerprints", old, "new_fingerprint", agent.Fingerprint(a.root), "not_after", a.notAfter)
}

// saveRetryMax caps the backoff between failed saves of the state: 30 s,
// or a thirtieth of ca_ttl when that is shorter, so that a short-lived CA
// still gets many tries in the third of its life it has left once its
// successor should have taken over.
func saveRetryMax(caTTL time.Duration) time.Duration {
	return min(30*time.Second, max(caTTL/30, 100*time.Millisecond))
}

// saveLocked writes the CA state when it has unsaved changes and a retry is
// due, and remembers the file's stamp, so that ensureCA can tell our own
// writes from someone else's. A failure is retried with capped backoff,
// warned about once a minute and reported to the sink (degraded readiness);
// meanwhile no unsaved authority signs.
func (l *Local) saveLocked(now time.Time) {
	if !l.dirty || now.Before(l.saveAt) {
		return
	}
	err := saveState(l.statePath, l.authorities, l.active, l.seq, l.fileCA != nil)
	var st fileStamp
	if err == nil {
		st, err = statStamp(l.statePath)
	}
	var reported error
	if err != nil {
		reported = fmt.Errorf("the local CA state cannot be saved (a prepared CA is not activated until it is): %w", err)
	}
	if l.sink != nil {
		l.sink.ReportSave(l.statePath, reported)
	}
	if err != nil {
		l.saveErr = err
		wait := l.saveRetry.Next()
		l.saveAt = now.Add(wait)
		l.saveWarn.Do(func() {
			l.log.Warn("Could not save the local CA state; retrying (this warning repeats once a minute while it fails). "+
				"A CA that is not saved does not sign: the next CA is activated once it is saved",
				"state", l.statePath, "retry_in", wait.Round(time.Millisecond), "error", err)
		})
		return
	}
	if l.saveErr != nil {
		l.log.Info("Saved the local CA state", "state", l.statePath)
	}
	for _, a := range l.authorities {
		a.saved = true
	}
	l.stamp, l.dirty, l.saveErr, l.saveAt = st, false, nil, time.Time{}
	l.saveRetry.Reset()
	l.saveWarn = rate.Sometimes{First: 1, Interval: warnEvery}
}

// changedLocked records a change of the authorities: the bundle's sequence
// number grows, and the state must be published and saved again.
func (l *Local) changedLocked() {
	l.seq++
	l.published, l.dirty = false, true
}

// publishLocked hands the bundle of the current authorities to the sink,
// unless it holds it already. It calls the sink under l.mu, so that no
// authority can sign between a change and its publication; the sink must
// not call back into l.
func (l *Local) publishLocked() error {
	if l.published {
		return nil
	}
	if l.sink == nil {
		return errors.New("the local CA's bundle is not published yet")
	}
	local, ok := l.bundleLocked()
	if !ok {
		return errors.New("the local CA has no authority")
	}
	l.sink.SetBundles(local, l.settings.federated)
	l.published = true
	return nil
}

// signerLocked returns the authority that signs now, after checking the
// invariant: it is in the published bundle and saved.
func (l *Local) signerLocked() (*authority, error) {
	if err := l.publishLocked(); err != nil {
		return nil, err
	}
	a := l.authorities[l.active]
	if !a.saved {
		return nil, fmt.Errorf("the local CA is not saved yet, and a CA that a restart could lose does not sign: %w", l.saveErr)
	}
	if now := l.now(); !now.Before(a.notAfter) {
		return nil, fmt.Errorf("the local CA expired at %s and its successor could not be saved: %w", a.notAfter.Format(time.RFC3339), l.saveErr)
	}
	return a, nil
}

// ensureCALocked makes sure the CA in memory is the one on disk: the state
// file is the source of truth. A file that changed is reloaded; one that is
// gone or unreadable makes the CA unavailable (signing fails, and the agent
// serves what it has) until it is back. It is never silently replaced.
//
// Only the agent's own file is reloaded: a regular file (not a link) owned
// by its uid with mode 0600. Any other one is refused, with a warning once
// a minute, and the CA in memory stays in use. A reload is a warning too,
// with the fingerprint of the CA that signs from then on: nothing but an
// operator restoring a backup should ever cause one.
func (l *Local) ensureCALocked() (reloaded bool, err error) {
	st, err := statStamp(l.statePath)
	if err == nil && l.caErr == nil && st == l.stamp {
		return false, nil
	}
	if errors.Is(err, os.ErrNotExist) && l.caErr == nil && l.stamp == (fileStamp{}) && len(l.authorities) > 0 {
		// Never saved yet (the first save failed): nothing to follow.
		return false, nil
	}
	if err != nil {
		l.caErr = fmt.Errorf("the CA state %s: %w", l.statePath, err)
		return false, l.caErr
	}
	auths, active, seq, err := loadState(l.statePath, l.fileCA)
	var unsafe *agent.UnsafeFileError
	if errors.As(err, &unsafe) && l.caErr == nil && len(l.authorities) > 0 {
		l.reloadWarn.Do(func() {
			l.log.Warn("Refusing to reload the CA state, which changed on disk: it is not the agent's own private file. The CA in memory stays in use (this warning repeats once a minute)",
				"state", l.statePath, "reason", unsafe.Reason)
		})
		return false, nil
	}
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
	var previous string
	if len(l.authorities) > 0 {
		previous = agent.Fingerprint(l.authorities[l.active].root)
	}
	for _, a := range auths {
		a.saved = true
	}
	l.authorities, l.active, l.stamp, l.caErr = auths, active, st, nil
	l.seq = max(l.seq, seq)
	l.changedLocked()
	// What is in memory is what is on disk, but for the sequence number.
	l.dirty, l.saveErr, l.saveAt = false, nil, time.Time{}
	l.log.Warn("Reloaded the local CA state, which changed on disk: its active CA signs from now on, once its bundle is published",
		"state", l.statePath, "fingerprint", agent.Fingerprint(auths[active].root), "jwt_kid", auths[active].jwtKID, "previous_fingerprint", previous)
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
	l.mu.Lock()
	l.sink, l.published = sink, false
	l.mu.Unlock()
	l.publishEntries(sink)
	retry := agent.NewBackoff(time.Second, 30*time.Second)
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-l.changed:
			l.publishEntries(sink)
		case <-timer.C:
		}
		next, _, err := l.rotate()
		sink.ReportUpstream(err)
		if err != nil {
			wait := retry.Next()
			l.log.Error("The local CA is unavailable; retrying", "retry_in", wait.Round(time.Millisecond), "error", err)
			next = l.now().Add(wait)
		} else {
			retry.Reset()
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

// rotate prepares, activates and retires authorities as they age, publishes
// and saves what changed, and returns when it next has work.
//
// The order keeps the publication invariant (see Local): a prepared CA is
// published at once, saved, and activated at two thirds of the active one's
// life only if both happened; otherwise the active CA, which has a third
// of its life left, keeps signing while the save is retried.
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
		l.changedLocked()
		prepared, changed = true, true
		if l.publishLocked() == nil {
			l.log.Info("Prepared the next local CA; it is in the bundle from now on", "not_after", a.notAfter, "fingerprint", agent.Fingerprint(a.root), "activate_at", active.at(activateAt))
		}
	}
	_ = l.publishLocked()
	l.saveLocked(now)
	if prepared && !now.Before(active.at(activateAt)) && l.published && l.authorities[len(l.authorities)-1].saved {
		l.active = len(l.authorities) - 1
		active, prepared, changed = l.authorities[l.active], false, true
		l.changedLocked()
		l.log.Info("Activated the next local CA", "not_after", active.notAfter, "fingerprint", agent.Fingerprint(active.root))
	}
	before := len(l.authorities)
	l.authorities, l.active = pruneExpired(l.authorities, l.active, now)
	if len(l.authorities) != before {
		l.changedLocked()
		changed = true
	}
	_ = l.publishLocked()
	l.saveLocked(now)
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
	// Work that is due but must wait (an activation waiting for its save)
	// is retried with the save, not in a tight loop.
	if l.dirty && (l.saveAt.Before(next) || !next.After(now)) {
		next = l.saveAt
	}
	if soonest := now.Add(minRotateWait); next.Before(soonest) {
		next = soonest
	}
	return next, changed, nil
}

// bundles returns the local bundle, with every unexpired authority, and the
// configured federated bundles; ok is false while the CA is unavailable.
func (l *Local) bundles() (local *spiffebundle.Bundle, federated []*spiffebundle.Bundle, ok bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	local, ok = l.bundleLocked()
	return local, l.settings.federated, ok
}

func (l *Local) bundleLocked() (*spiffebundle.Bundle, bool) {
	if len(l.authorities) == 0 {
		return nil, false
	}
	b := spiffebundle.New(l.td)
	for _, a := range l.authorities {
		if !b.HasX509Authority(a.root) {
			b.AddX509Authority(a.root)
		}
		_ = b.AddJWTAuthority(a.jwtKID, a.jwtKey.Public())
	}
	b.SetSequenceNumber(l.seq)
	return b, true
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

// activeCA returns the signing authority, checking first that the state on
// disk has not changed or gone, and that the authority is published and
// saved (a reloaded state is published here, before it signs).
func (l *Local) activeCA() (*authority, *settings, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	reloaded, err := l.ensureCALocked()
	if err != nil {
		return nil, nil, fmt.Errorf("the local CA is unavailable: %w", err)
	}
	if reloaded {
		// Wake Run to reschedule for the reloaded authorities.
		select {
		case l.changed <- struct{}{}:
		default:
		}
	}
	a, err := l.signerLocked()
	if err != nil {
		return nil, nil, fmt.Errorf("the local CA cannot sign: %w", err)
	}
	return a, l.settings, nil
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
