package local

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/lanyard-dev/lanyard/agent"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"golang.org/x/time/rate"
)

// openLocked loads the CA state from the data directory, or creates it on
// the first start, once: New does not touch the disk. A state that cannot
// be used leaves the CA unavailable (the agent serves what it saved and
// retries); any other error is returned, and the next call tries again.
func (l *Local) openLocked() error {
	if l.opened {
		return nil
	}
	if err := l.loadAuthorities(); err != nil {
		var unavailable *unavailableError
		if !errors.As(err, &unavailable) {
			return err
		}
		l.caErr = err
		l.log.Error("The local CA cannot be loaded; saved SVIDs are served until it can", "error", err)
	}
	l.opened = true
	return nil
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
	l.metrics.LocalCAActive(l.authorities[l.active].notAfter, false)
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
	l.metrics.LocalCAActive(auths[active].notAfter, previous != "" && previous != agent.Fingerprint(auths[active].root))
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
	if err := l.openLocked(); err != nil {
		return now, false, err
	}
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
		l.metrics.LocalCAActive(active.notAfter, true)
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
	if l.openLocked() != nil {
		return nil, nil, false
	}
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
