package spire

import (
	"crypto"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"time"

	"github.com/lanyard-dev/lanyard/agent"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

const (
	// stateFileName holds the agent SVID and the trust domain's X.509
	// authorities, in data_dir. Not spire-agent's agent-data.json: the two
	// must not overwrite each other's state.
	stateFileName = "lanyard_spire_agent.json"
	// keysFileName holds the agent SVID's key, in the disk key manager's
	// directory.
	keysFileName = "lanyard_agent_keys.json"
)

// stateFile is the JSON in stateFileName.
type stateFile struct {
	TrustDomain  string   `json:"trust_domain"`
	SVID         [][]byte `json:"svid,omitempty"` // DER, leaf first
	Reattestable bool     `json:"reattestable,omitempty"`
	Bundle       [][]byte `json:"bundle,omitempty"` // DER X.509 authorities
}

// keysFile is the JSON in keysFileName: PKCS#8 DER keys. It holds two while
// a new SVID is being stored, so a crash between the two writes leaves a
// key for whichever SVID the state file has.
type keysFile struct {
	Keys [][]byte `json:"keys"`
}

// credentials are the agent SVID and its key.
type credentials struct {
	svid         []*x509.Certificate
	key          crypto.Signer
	reattestable bool
	renewAt      time.Time
}

func (c *credentials) id() spiffeid.ID {
	if c == nil || len(c.svid) == 0 {
		return spiffeid.ID{}
	}
	id, err := spiffeid.FromURI(c.svid[0].URIs[0])
	if err != nil {
		return spiffeid.ID{}
	}
	return id
}

func (c *credentials) expired(now time.Time) bool {
	return !now.Before(c.svid[0].NotAfter)
}

// store persists the agent's state: the key in the key manager's
// directory (keyDir; "" for the memory key manager, which keeps it only in
// memory) and the SVID and bundle in data_dir.
type store struct {
	statePath string
	keyDir    string // "" = memory key manager
	td        spiffeid.TrustDomain
}

func (s *store) keysPath() string { return filepath.Join(s.keyDir, keysFileName) }

// persistsKeys reports whether the agent SVID survives a restart.
func (s *store) persistsKeys() bool { return s.keyDir != "" }

// load returns the persisted credentials (nil when there are none, or they
// cannot be used) and bundle, and why the credentials were not usable.
func (s *store) load() (*credentials, []*x509.Certificate, string, error) {
	data, err := agent.ReadPrivateFile(s.statePath)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil, "no agent SVID is stored yet", nil
	}
	if err := refused(err, "the agent state", "the SPIRE Server's CAs, which the agent trusts, and the agent SVID",
		"if it is the agent's own, make it a regular file (not a link) owned by the agent's user with mode 0600; otherwise remove it to attest the node again"); err != nil {
		return nil, nil, "", err
	}
	if err != nil {
		return nil, nil, "", fmt.Errorf("reading the agent state: %w", err)
	}
	var st stateFile
	if err := json.Unmarshal(data, &st); err != nil {
		return nil, nil, "", fmt.Errorf("the agent state %s is corrupt (%v): remove it to attest the node again", s.statePath, err)
	}
	if st.TrustDomain != s.td.Name() {
		return nil, nil, fmt.Sprintf("the stored agent SVID is for trust domain %q, not %q", st.TrustDomain, s.td.Name()), nil
	}
	bundle, err := parseDERs(st.Bundle)
	if err != nil {
		return nil, nil, "", fmt.Errorf("the bundle in %s is corrupt (%v): remove the file to attest the node again", s.statePath, err)
	}
	if len(st.SVID) == 0 {
		return nil, bundle, "no agent SVID is stored", nil
	}
	if !s.persistsKeys() {
		return nil, bundle, "the memory key manager keeps no key across restarts", nil
	}
	svid, err := parseDERs(st.SVID)
	if err != nil || len(svid) == 0 || len(svid[0].URIs) != 1 {
		return nil, bundle, "the stored agent SVID is unreadable", nil
	}
	key, err := s.findKey(svid[0])
	if err != nil {
		return nil, nil, "", err
	}
	if key == nil {
		return nil, bundle, "the key of the stored agent SVID is missing from " + s.keysPath(), nil
	}
	return &credentials{svid: svid, key: key, reattestable: st.Reattestable}, bundle, "", nil
}

func (s *store) findKey(leaf *x509.Certificate) (crypto.Signer, error) {
	data, err := agent.ReadPrivateFile(s.keysPath())
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err := refused(err, "the agent key file", "the key of the agent SVID",
		fmt.Sprintf("if it is the agent's own, make it a regular file (not a link) owned by the agent's user with mode 0600; otherwise remove it and %s to attest the node again", s.statePath)); err != nil {
		return nil, err
	}
	if err != nil {
		return nil, fmt.Errorf("reading the agent key: %w", err)
	}
	var kf keysFile
	if err := json.Unmarshal(data, &kf); err != nil {
		return nil, fmt.Errorf("the agent key file %s is corrupt (%v): remove it and %s to attest the node again", s.keysPath(), err, s.statePath)
	}
	for _, der := range kf.Keys {
		k, err := x509.ParsePKCS8PrivateKey(der)
		if err != nil {
			continue
		}
		signer, ok := k.(crypto.Signer)
		if ok && publicKeysEqual(signer.Public(), leaf.PublicKey) {
			return signer, nil
		}
	}
	return nil, nil
}

func publicKeysEqual(a, b crypto.PublicKey) bool {
	ak, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && ak.Equal(b)
}

// save persists new credentials and the bundle, keeping the previous key
// until the new SVID is on disk.
func (s *store) save(prev, next *credentials, bundle []*x509.Certificate) error {
	if s.persistsKeys() && next != nil {
		// Checked as data_dir is: whoever could change this directory
		// could delete, swap or restore the agent SVID's keys.
		if err := agent.EnsureKeyDir(s.keyDir, `KeyManager "disk" directory`); err != nil {
			return err
		}
		keys := []crypto.Signer{next.key}
		if prev != nil && prev.key != next.key {
			keys = append(keys, prev.key)
		}
		if err := s.writeKeys(keys); err != nil {
			return err
		}
	}
	if err := s.writeState(next, bundle); err != nil {
		return err
	}
	if s.persistsKeys() && next != nil && prev != nil && prev.key != next.key {
		return s.writeKeys([]crypto.Signer{next.key})
	}
	return nil
}

func (s *store) writeKeys(keys []crypto.Signer) error {
	var kf keysFile
	for _, k := range keys {
		der, err := x509.MarshalPKCS8PrivateKey(k)
		if err != nil {
			return fmt.Errorf("encoding the agent key: %w", err)
		}
		kf.Keys = append(kf.Keys, der)
	}
	data, err := json.Marshal(kf)
	if err != nil {
		return err
	}
	return agent.WriteFileAtomic(s.keysPath(), data)
}

// writeState writes the SVID (only when its key is persisted too) and the
// bundle.
func (s *store) writeState(c *credentials, bundle []*x509.Certificate) error {
	st := stateFile{TrustDomain: s.td.Name()}
	if c != nil && s.persistsKeys() {
		for _, cert := range c.svid {
			st.SVID = append(st.SVID, cert.Raw)
		}
		st.Reattestable = c.reattestable
	}
	for _, cert := range bundle {
		st.Bundle = append(st.Bundle, cert.Raw)
	}
	data, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return err
	}
	return agent.WriteFileAtomic(s.statePath, data)
}

// refused explains err when it is an *agent.UnsafeFileError: which file
// (what), why reading it would be unsafe (it holds what the agent would
// take from it), and what the operator should do (fix). Other errors give
// nil.
func refused(err error, what, holds, fix string) error {
	var unsafe *agent.UnsafeFileError
	if !errors.As(err, &unsafe) {
		return nil
	}
	return &refusedFileError{unsafe, fmt.Sprintf("refusing to read %s %s, which %s: the agent reads only its own private files, and whoever made this one would choose %s; check how it got there, then %s",
		what, unsafe.Path, unsafe.Reason, holds, fix)}
}

// refusedFileError is an *agent.UnsafeFileError told to the operator.
type refusedFileError struct {
	*agent.UnsafeFileError
	msg string
}

func (e *refusedFileError) Error() string { return e.msg }
func (e *refusedFileError) Unwrap() error { return e.UnsafeFileError }

// forget removes the stored SVID, so the next start attests again.
func (s *store) forget(bundle []*x509.Certificate) error {
	return s.writeState(nil, bundle)
}

func parseDERs(ders [][]byte) ([]*x509.Certificate, error) {
	out := make([]*x509.Certificate, 0, len(ders))
	for _, der := range ders {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	return out, nil
}

// spire-agent's own files: data_dir/agent-data.json holds the agent SVID
// and bundle (a list of PEM certificates each), and the disk key manager's
// directory holds keys.json (PKCS#8 DER keys by name).
const (
	spireAgentDataFile = "agent-data.json"
	spireAgentKeysFile = "keys.json"
)

// spireAgentFix is what to do about a spire-agent file that the agent
// refuses to take over.
const spireAgentFix = "if spire-agent wrote it as another user, chown %s and %s to the agent's user and chmod them 0600 (a link: replace it by the file it points to); " +
	"otherwise remove %s to attest the node again (with a new join token if the node attests with one)"

// loadSpireAgent reads the agent SVID that spire-agent stored in the same
// data_dir and key manager directory, so that swapping spire-agent for
// Lanyard needs no new attestation (and no new join token). It returns
// nil credentials when there is nothing usable, or the SVID expired before
// now. spire-agent writes both files mode 0600 as its own user
// (diskutil.AtomicWritePrivateFile), so they are read with
// agent.ReadAdoptedFile: the agent's own, never through a link.
func (s *store) loadSpireAgent(now time.Time) (*credentials, []*x509.Certificate, error) {
	if !s.persistsKeys() {
		return nil, nil, nil
	}
	path := filepath.Join(filepath.Dir(s.statePath), spireAgentDataFile)
	keysPath := filepath.Join(s.keyDir, spireAgentKeysFile)
	fix := fmt.Sprintf(spireAgentFix, path, keysPath, path)
	data, err := agent.ReadAdoptedFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil, nil
	}
	if err := refused(err, "spire-agent's state", "the SPIRE Server's CAs, which the agent trusts, and the agent SVID it takes over", fix); err != nil {
		return nil, nil, err
	}
	if err != nil {
		return nil, nil, fmt.Errorf("reading spire-agent's state: %w", err)
	}
	var st struct {
		SVID         [][]byte `json:"svid"`
		Bundle       [][]byte `json:"bundle"`
		Reattestable bool     `json:"reattestable"`
	}
	if err := json.Unmarshal(data, &st); err != nil || len(st.SVID) == 0 {
		return nil, nil, nil
	}
	svid, err := parsePEMs(st.SVID)
	if err != nil || len(svid[0].URIs) != 1 {
		return nil, nil, nil
	}
	if id, err := spiffeid.FromURI(svid[0].URIs[0]); err != nil || id.TrustDomain() != s.td {
		return nil, nil, nil
	}
	if !now.Before(svid[0].NotAfter) {
		return nil, nil, nil // its key is of no use
	}
	bundle, err := parsePEMs(st.Bundle)
	if err != nil {
		return nil, nil, nil
	}
	// A key file that is missing gives a new attestation, as before; one
	// that is there but cannot be read is an error, as for agent-data.json.
	keyData, err := agent.ReadAdoptedFile(keysPath)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil, nil
	}
	if err := refused(err, "spire-agent's key file", "the key of the agent SVID it takes over", fix); err != nil {
		return nil, nil, err
	}
	if err != nil {
		return nil, nil, fmt.Errorf("reading spire-agent's key file: %w", err)
	}
	var kf struct {
		Keys map[string][]byte `json:"keys"`
	}
	if err := json.Unmarshal(keyData, &kf); err != nil {
		return nil, nil, nil
	}
	for _, der := range kf.Keys {
		k, err := x509.ParsePKCS8PrivateKey(der)
		if err != nil {
			continue
		}
		if signer, ok := k.(crypto.Signer); ok && publicKeysEqual(signer.Public(), svid[0].PublicKey) {
			return &credentials{svid: svid, key: signer, reattestable: st.Reattestable}, bundle, nil
		}
	}
	return nil, nil, nil
}

// parsePEMs parses one PEM certificate per element, as spire-agent stores them.
func parsePEMs(pems [][]byte) ([]*x509.Certificate, error) {
	out := make([]*x509.Certificate, 0, len(pems))
	for _, p := range pems {
		block, _ := pem.Decode(p)
		if block == nil || block.Type != "CERTIFICATE" {
			return nil, errors.New("not a PEM certificate")
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	return out, nil
}
