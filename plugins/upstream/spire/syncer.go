package spire

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/attestor"
	"github.com/lanyard-dev/lanyard/conf"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	bundlev1 "github.com/spiffe/spire-api-sdk/proto/spire/api/server/bundle/v1"
	entryv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/server/entry/v1"
	"github.com/spiffe/spire-api-sdk/proto/spire/api/types"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// entryMask asks for every field the agent uses.
var entryMask = &types.EntryMask{
	SpiffeId:       true,
	ParentId:       true,
	Selectors:      true,
	X509SvidTtl:    true,
	JwtSvidTtl:     true,
	FederatesWith:  true,
	DnsNames:       true,
	RevisionNumber: true,
	StoreSvid:      true,
	Hint:           true,
	CreatedAt:      true,
}

// syncedEntry is what the agent keeps of an authorized entry.
type syncedEntry struct {
	revision  int64
	createdAt int64
	entry     *agent.Entry // nil when it is not served to workloads
}

// syncState is what the last syncs brought; guarded by Spire.syncMu.
type syncState struct {
	entries       map[string]*syncedEntry
	entriesDirty  bool // changed since last handed to the sink
	unimplemented bool // the server lacks SyncAuthorizedEntries

	localProto   *types.Bundle
	local        *spiffebundle.Bundle
	fedProto     map[spiffeid.TrustDomain]*types.Bundle
	federated    map[spiffeid.TrustDomain]*spiffebundle.Bundle
	bundlesDirty bool

	taintedX509 map[string]bool // DER of authorities already acted on
	taintedJWT  map[string]bool // key IDs already acted on
	missingFed  map[spiffeid.TrustDomain]bool
	delivered   bool
}

func (st *syncState) init() {
	st.entries = map[string]*syncedEntry{}
	st.fedProto = map[spiffeid.TrustDomain]*types.Bundle{}
	st.federated = map[spiffeid.TrustDomain]*spiffebundle.Bundle{}
	st.taintedX509 = map[string]bool{}
	st.taintedJWT = map[string]bool{}
	st.missingFed = map[spiffeid.TrustDomain]bool{}
}

// runSync syncs every sync_interval, and sooner with backoff after errors,
// until ctx ends or another part of the agent fails for good. A sync on
// demand (Resync) restarts the interval.
func (s *Spire) runSync(ctx context.Context, sink agent.Sink) error {
	bo := agent.NewBackoff(time.Second, max(30*time.Second, s.syncInterval))
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case err := <-s.fatal:
			sink.ReportUpstream(err)
			return err
		case <-s.synced:
			timer.Reset(s.syncInterval)
			continue
		case <-timer.C:
		}
		wait := s.syncInterval
		if s.syncMu.Acquire(ctx, 1) != nil {
			return nil // ctx ended
		}
		err := s.syncOnce(ctx, sink)
		s.syncMu.Release(1)
		if ctx.Err() != nil {
			return nil
		}
		sink.ReportUpstream(err)
		if err != nil {
			wait = bo.Next()
			s.logRetry("Could not sync with the SPIRE Server; retrying", wait, err)
		} else {
			bo.Reset()
		}
		timer.Reset(wait)
	}
}

// The budget of syncs on demand. SPIRE Server refreshes the entries it
// serves agents every 5 s (its cache_reload_interval), so a just-created
// entry shows up at some point within that. Two quick syncs catch a server
// that has it already; then one a second finds it within a second of the
// server having it, and the ten tokens cover two such waits in a row at
// spire-agent's default sync_interval.
const (
	resyncBurst = 10
	// resyncEarnEvery: one token is earned per this many sync_intervals.
	resyncEarnEvery = 1
	// The first two syncs on demand of a run start at least
	// sync_interval/resyncFirstSpacingDivisor after the previous sync of
	// any kind, the next ones sync_interval/resyncSpacingDivisor.
	resyncFirstSpacingDivisor = 20
	resyncSpacingDivisor      = 5
)

// Reconfigure accepts a SIGHUP: the spire upstream has no plugin_data, and
// the agent refuses changes to its agent-block settings, which need a
// restart.
func (s *Spire) Reconfigure(*conf.Section) error { return nil }

// Resync syncs now, for a workload that found no identity: its entry may
// have been created since the last sync. Syncs on demand are spaced (a
// twentieth of sync_interval after the previous sync for the first two of
// a run that finds nothing new, a fifth for the next ones; callers arriving
// meanwhile share the next one), spend a token of a budget of ten that
// earns one per sync_interval, and restart the periodic timer. So a burst
// of misses costs the server at most ten extra syncs; misses that go on for
// good are served one sync per sync_interval, each standing in for a
// periodic one, as from spire-agent (twice that at worst, when each miss
// comes just after a periodic sync). Syncs are incremental: the server
// lists revisions and sends only new entries. Without a token Resync
// returns false at once: the caller is answered from what the agent has.
func (s *Spire) Resync(ctx context.Context) (bool, error) {
	select {
	case <-s.ready:
	default:
		return false, nil
	}
	asked := s.now()
	if err := s.syncMu.Acquire(ctx, 1); err != nil {
		return false, err
	}
	for {
		if s.sink == nil {
			s.syncMu.Release(1)
			return false, nil
		}
		if !s.lastSync.Before(asked) {
			// A sync started after the caller asked; it has finished, since
			// this holds syncMu.
			s.syncMu.Release(1)
			return true, nil
		}
		wait := s.lastSync.Add(s.resyncSpacingLocked()).Sub(s.now())
		if wait <= 0 {
			break
		}
		s.syncMu.Release(1)
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return false, ctx.Err()
		case <-t.C:
		}
		if err := s.syncMu.Acquire(ctx, 1); err != nil {
			return false, err
		}
	}
	defer s.syncMu.Release(1)
	if !s.resyncBudget.Allow() {
		return false, nil
	}
	if s.now().Sub(s.lastResync) > s.syncInterval {
		s.resyncStreak = 0
	}
	s.lastResync = s.now()
	sets := s.entrySets
	// Callers waiting on syncMu share this sync: one caller leaving must
	// not cut it short.
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), rpcTimeout)
	err := s.syncOnce(sctx, s.sink)
	cancel()
	if s.entrySets != sets || err != nil {
		s.resyncStreak = 0
	} else {
		s.resyncStreak++
	}
	s.sink.ReportUpstream(err)
	kick(s.synced)
	if err == nil && ctx.Err() != nil {
		return false, ctx.Err()
	}
	return err == nil, err
}

// resyncSpacingLocked is how long after the previous sync the next sync on
// demand may start.
func (s *Spire) resyncSpacingLocked() time.Duration {
	if s.resyncStreak < 2 || s.now().Sub(s.lastResync) > s.syncInterval {
		return s.resyncFirstSpacing
	}
	return s.resyncSpacing
}

func (s *Spire) logRetry(msg string, wait time.Duration, err error) {
	args := []any{"retry_in", wait, "error", err}
	if hint := handshakeHint(err); hint != "" {
		args = append(args, "hint", hint)
	}
	s.log.Warn(msg, args...)
}

// syncOnce brings entries and bundles up to date and hands what changed to
// the sink: bundles first, so that an SVID that needs a new bundle never
// reaches a workload before it.
func (s *Spire) syncOnce(ctx context.Context, sink agent.Sink) error {
	st := &s.sync
	start := s.now()
	s.lastSync = start
	s.syncs.Add(1)
	if err := s.syncEntries(ctx); err != nil {
		return err
	}
	if err := s.syncBundles(ctx); err != nil {
		return err
	}
	if st.bundlesDirty || !st.delivered {
		feds := make([]*spiffebundle.Bundle, 0, len(st.federated))
		for _, b := range st.federated {
			feds = append(feds, b)
		}
		sink.SetBundles(st.local, feds)
		st.bundlesDirty = false
	}
	s.applyTaints(sink)
	if st.entriesDirty || !st.delivered {
		list := make([]*agent.Entry, 0, len(st.entries))
		for _, se := range st.entries {
			if se.entry != nil {
				list = append(list, se.entry)
			}
		}
		sink.SetEntries(list)
		s.entrySets++
		st.entriesDirty = false
		s.log.Debug("Synced registration entries", "served", len(list), "authorized", len(st.entries), "took", s.now().Sub(start))
	}
	if !st.delivered {
		s.log.Info("First sync with the SPIRE Server done", "entries", len(st.entries), "federated_bundles", len(st.federated))
	}
	st.delivered = true
	return nil
}

// syncEntries fetches what changed with SyncAuthorizedEntries, or the
// whole list with GetAuthorizedEntries from servers that lack it.
func (s *Spire) syncEntries(ctx context.Context) error {
	st := &s.sync
	if !st.unimplemented {
		err := s.call(ctx, func(ctx context.Context, cc *grpc.ClientConn) error {
			return s.streamEntries(ctx, entryv1.NewEntryClient(cc))
		})
		if status.Code(err) != codes.Unimplemented {
			return err
		}
		st.unimplemented = true
		s.log.Info("The SPIRE Server has no SyncAuthorizedEntries; fetching whole entry lists with GetAuthorizedEntries")
	}
	return s.call(ctx, func(ctx context.Context, cc *grpc.ClientConn) error {
		resp, err := entryv1.NewEntryClient(cc).GetAuthorizedEntries(ctx, &entryv1.GetAuthorizedEntriesRequest{OutputMask: entryMask})
		if err != nil {
			return err
		}
		seen := make(map[string]bool, len(resp.Entries))
		for _, e := range resp.Entries {
			seen[e.Id] = true
			s.putEntry(e)
		}
		s.dropEntriesExcept(seen)
		return nil
	})
}

// streamEntries runs one SyncAuthorizedEntries exchange: the server sends
// every entry when there are few, or else their revisions, and the agent
// asks in full only for those it lacks or holds an older revision of.
// Entries not mentioned are dropped, but only when the exchange completes.
func (s *Spire) streamEntries(ctx context.Context, client entryv1.EntryClient) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := client.SyncAuthorizedEntries(ctx)
	if err != nil {
		return err
	}
	if err := stream.Send(&entryv1.SyncAuthorizedEntriesRequest{OutputMask: entryMask}); err != nil {
		return recvErr(stream, err)
	}
	resp, err := stream.Recv()
	if err != nil {
		return err
	}
	seen := map[string]bool{}
	if len(resp.EntryRevisions) == 0 {
		for {
			for _, e := range resp.Entries {
				seen[e.Id] = true
				s.putEntry(e)
			}
			if !resp.More {
				break
			}
			if resp, err = stream.Recv(); err != nil {
				return err
			}
		}
		s.dropEntriesExcept(seen)
		return stream.CloseSend()
	}
	pageSize := len(resp.EntryRevisions)
	var needFull []string
	for {
		for _, rev := range resp.EntryRevisions {
			if rev.Id == "" {
				continue
			}
			seen[rev.Id] = true
			if se := s.sync.entries[rev.Id]; se == nil || se.stale(rev.RevisionNumber, rev.CreatedAt) {
				needFull = append(needFull, rev.Id)
			}
		}
		if !resp.More {
			break
		}
		if resp, err = stream.Recv(); err != nil {
			return err
		}
		if len(resp.Entries) > 0 {
			return errors.New("the SPIRE Server sent entries while listing revisions")
		}
	}
	sort.Strings(needFull)
	for len(needFull) > 0 {
		n := min(len(needFull), pageSize)
		if err := stream.Send(&entryv1.SyncAuthorizedEntriesRequest{Ids: needFull[:n]}); err != nil {
			return recvErr(stream, err)
		}
		needFull = needFull[n:]
		for {
			resp, err := stream.Recv()
			if err != nil {
				return err
			}
			if len(resp.EntryRevisions) > 0 {
				return errors.New("the SPIRE Server sent revisions while sending requested entries")
			}
			for _, e := range resp.Entries {
				s.putEntry(e)
			}
			if !resp.More {
				break
			}
		}
	}
	s.dropEntriesExcept(seen)
	return stream.CloseSend()
}

// recvErr returns the stream's status when a Send failed: gRPC reports
// the server's reason there, and only io.EOF from Send.
func recvErr(stream grpc.ClientStream, sendErr error) error {
	if err := stream.RecvMsg(new(entryv1.SyncAuthorizedEntriesResponse)); err != nil {
		return err
	}
	return sendErr
}

// stale reports whether the server holds another version of the entry: a
// new revision, or a different entry under the same ID (deleted and
// created again), which CreatedAt tells apart.
func (se *syncedEntry) stale(revision, createdAt int64) bool {
	return se.revision != revision || (createdAt != 0 && se.createdAt != createdAt)
}

func (s *Spire) putEntry(e *types.Entry) {
	s.fetched.Add(1)
	st := &s.sync
	if old := st.entries[e.Id]; old != nil && !old.stale(e.RevisionNumber, e.CreatedAt) {
		return
	}
	st.entries[e.Id] = s.convertEntry(e)
	st.entriesDirty = true
}

func (s *Spire) dropEntriesExcept(seen map[string]bool) {
	st := &s.sync
	for id := range st.entries {
		if !seen[id] {
			delete(st.entries, id)
			st.entriesDirty = true
		}
	}
}

// convertEntry turns a server entry into the agent's. Entries the agent
// does not serve to workloads keep a nil entry, so that the next sync does
// not ask for them again: entries for an SVIDStore (store_svid), which
// Lanyard does not have, entries that name the node (node aliases), and
// entries it cannot read.
func (s *Spire) convertEntry(e *types.Entry) *syncedEntry {
	se := &syncedEntry{revision: e.RevisionNumber, createdAt: e.CreatedAt}
	if e.StoreSvid {
		s.log.Debug("Not serving an entry meant for an SVIDStore plugin, which Lanyard does not have", "entry_id", e.Id)
		return se
	}
	if parent, err := idFromProto(e.ParentId); err == nil && parent == s.serverID {
		return se
	}
	if s.nodeEntry(e) {
		return se
	}
	entry, err := s.entryFromProto(e)
	if err != nil {
		s.log.Warn("Ignoring a registration entry the agent cannot use", "entry_id", e.Id, "error", err)
		return se
	}
	se.entry = entry
	return se
}

// nodeEntry reports whether e names the node rather than a workload: its
// selectors name an agent ID, as those of the entry `spire-server token
// generate -spiffeID` creates (spiffe_id:<the agent's join_token ID>). No
// workload attestor produces such a selector.
func (s *Spire) nodeEntry(e *types.Entry) bool {
	prefix := s.td.IDString() + "/spire/agent/"
	for _, sel := range e.Selectors {
		if sel.Type == "spiffe_id" && strings.HasPrefix(sel.Value, prefix) {
			return true
		}
	}
	return false
}

func (s *Spire) entryFromProto(e *types.Entry) (*agent.Entry, error) {
	id, err := idFromProto(e.SpiffeId)
	if err != nil {
		return nil, fmt.Errorf("bad SPIFFE ID: %w", err)
	}
	if id.TrustDomain() != s.td {
		return nil, fmt.Errorf("SPIFFE ID %s is not in trust domain %s", id, s.td)
	}
	out := &agent.Entry{
		ID:             e.Id,
		SPIFFEID:       id,
		X509SVIDTTL:    time.Duration(e.X509SvidTtl) * time.Second,
		JWTSVIDTTL:     time.Duration(e.JwtSvidTtl) * time.Second,
		Hint:           e.Hint,
		CreatedAt:      e.CreatedAt,
		RevisionNumber: e.RevisionNumber,
	}
	for _, sel := range e.Selectors {
		if sel.Type == "" || sel.Value == "" {
			return nil, fmt.Errorf("selector %q:%q has an empty part", sel.Type, sel.Value)
		}
		out.Selectors = append(out.Selectors, attestor.Selector{Type: sel.Type, Value: sel.Value})
	}
	out.Selectors = attestor.SortSelectors(out.Selectors)
	if len(e.DnsNames) > 0 {
		out.DNSNames = slices.Clone(e.DnsNames)
	}
	for _, name := range e.FederatesWith {
		td, err := spiffeid.TrustDomainFromString(name)
		if err != nil {
			return nil, fmt.Errorf("bad federates_with trust domain %q: %w", name, err)
		}
		if !slices.Contains(out.FederatesWith, td) {
			out.FederatesWith = append(out.FederatesWith, td)
		}
	}
	slices.SortFunc(out.FederatesWith, func(a, b spiffeid.TrustDomain) int { return strings.Compare(a.Name(), b.Name()) })
	return out, nil
}

func idFromProto(id *types.SPIFFEID) (spiffeid.ID, error) {
	if id == nil {
		return spiffeid.ID{}, errors.New("missing")
	}
	td, err := spiffeid.TrustDomainFromString(id.TrustDomain)
	if err != nil {
		return spiffeid.ID{}, err
	}
	return spiffeid.FromPath(td, id.Path)
}

// syncBundles fetches the trust domain's bundle and those of the trust
// domains the served entries federate with.
func (s *Spire) syncBundles(ctx context.Context) error {
	st := &s.sync
	want := map[spiffeid.TrustDomain]bool{}
	for _, se := range st.entries {
		if se.entry == nil {
			continue
		}
		for _, td := range se.entry.FederatesWith {
			if td != s.td {
				want[td] = true
			}
		}
	}
	var local *types.Bundle
	fed := map[spiffeid.TrustDomain]*types.Bundle{}
	err := s.call(ctx, func(ctx context.Context, cc *grpc.ClientConn) error {
		client := bundlev1.NewBundleClient(cc)
		var err error
		if local, err = client.GetBundle(ctx, &bundlev1.GetBundleRequest{}); err != nil {
			return fmt.Errorf("fetching the bundle: %w", err)
		}
		for td := range want {
			b, err := client.GetFederatedBundle(ctx, &bundlev1.GetFederatedBundleRequest{TrustDomain: td.Name()})
			switch status.Code(err) {
			case codes.OK:
				fed[td] = b
				if st.missingFed[td] {
					delete(st.missingFed, td)
					s.log.Info("The federated bundle is now on the SPIRE Server", "trust_domain", td)
				}
			case codes.NotFound:
				if !st.missingFed[td] {
					st.missingFed[td] = true
					s.log.Warn("An entry federates with a trust domain whose bundle the SPIRE Server does not have: create the federation relationship on the server", "trust_domain", td)
				}
			default:
				return fmt.Errorf("fetching the federated bundle of %s: %w", td, err)
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	if !proto.Equal(local, st.localProto) {
		b, err := bundleFromProto(local)
		if err != nil {
			return err
		}
		if b.TrustDomain() != s.td {
			return fmt.Errorf("the SPIRE Server serves trust domain %s, not %s: check trust_domain", b.TrustDomain(), s.td)
		}
		if len(b.X509Authorities()) == 0 {
			return errors.New("the SPIRE Server's bundle has no X.509 authority")
		}
		if st.local == nil || !st.local.Equal(b) {
			st.bundlesDirty = true
		}
		if st.local == nil || !x509AuthoritiesEqual(st.local.X509Authorities(), b.X509Authorities()) {
			s.setRoots(b.X509Authorities())
			if st.local != nil {
				s.log.Info("The trust domain's X.509 authorities changed", "count", len(b.X509Authorities()))
			}
		}
		st.localProto, st.local = local, b
	}
	next := make(map[spiffeid.TrustDomain]*spiffebundle.Bundle, len(fed))
	for td, pb := range fed {
		if old := st.fedProto[td]; old != nil && proto.Equal(old, pb) {
			next[td] = st.federated[td]
			continue
		}
		b, err := bundleFromProto(pb)
		if err != nil {
			s.log.Warn("Ignoring a federated bundle the agent cannot read", "trust_domain", td, "error", err)
			continue
		}
		if b.TrustDomain() != td {
			s.log.Warn("Ignoring a federated bundle for another trust domain than asked", "asked", td, "got", b.TrustDomain())
			continue
		}
		next[td] = b
		st.bundlesDirty = true
	}
	if len(next) != len(st.federated) {
		st.bundlesDirty = true
	}
	st.fedProto, st.federated = fed, next
	return nil
}

// setRoots switches server verification to new authorities and stores
// them, so that a restart trusts the server's current CAs rather than the
// bootstrap bundle, which rotation may have left behind.
func (s *Spire) setRoots(roots []*x509.Certificate) {
	s.persistMu.Lock()
	defer s.persistMu.Unlock()
	s.mu.Lock()
	s.roots = roots
	creds := s.creds
	s.mu.Unlock()
	if err := s.store.writeState(creds, roots); err != nil {
		s.log.Error("Could not store the trust bundle; a restart will verify the server with the previous one", "error", err)
	}
	// A CA revoked before the agent SVID it signed was replaced: renew
	// now, on the connection still open, before new ones are refused.
	if creds != nil && !signedBy(creds.svid, roots) {
		s.log.Warn("The agent SVID's CA left the bundle; renewing it now")
		kick(s.renewKick)
	}
}

func x509AuthoritiesEqual(a, b []*x509.Certificate) bool {
	return slices.EqualFunc(a, b, func(x, y *x509.Certificate) bool { return x.Equal(y) })
}

// applyTaints acts on newly tainted authorities of the local bundle, as
// spire-agent does: the SVIDs they signed are replaced at once, the
// agent's own included.
func (s *Spire) applyTaints(sink agent.Sink) {
	st := &s.sync
	if st.localProto == nil {
		return
	}
	var x509s []*x509.Certificate
	var kids []string
	for _, a := range st.localProto.X509Authorities {
		if a.Tainted && !st.taintedX509[string(a.Asn1)] {
			cert, err := x509.ParseCertificate(a.Asn1)
			if err != nil {
				continue
			}
			st.taintedX509[string(a.Asn1)] = true
			x509s = append(x509s, cert)
		}
	}
	for _, k := range st.localProto.JwtAuthorities {
		if k.Tainted && !st.taintedJWT[k.KeyId] {
			st.taintedJWT[k.KeyId] = true
			kids = append(kids, k.KeyId)
		}
	}
	if len(x509s) == 0 && len(kids) == 0 {
		return
	}
	s.log.Info("Authorities of the trust domain were tainted; replacing what they signed", "x509_authorities", len(x509s), "jwt_authorities", len(kids))
	sink.TaintX509Authorities(x509s)
	sink.TaintJWTAuthorities(kids)
	if c := s.currentCreds(); c != nil && len(x509s) > 0 && signedBy(c.svid, x509s) {
		s.log.Info("The agent SVID was signed by a tainted authority; renewing it now")
		kick(s.renewKick)
	}
}

// signedBy reports whether chain verifies up to one of roots.
func signedBy(chain []*x509.Certificate, roots []*x509.Certificate) bool {
	pool := x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	_, err := chain[0].Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}, CurrentTime: chain[0].NotBefore.Add(time.Second)})
	return err == nil
}

// bundleFromProto converts a server bundle.
func bundleFromProto(b *types.Bundle) (*spiffebundle.Bundle, error) {
	if b == nil {
		return nil, errors.New("the SPIRE Server returned no bundle")
	}
	td, err := spiffeid.TrustDomainFromString(b.TrustDomain)
	if err != nil {
		return nil, fmt.Errorf("the SPIRE Server's bundle names a bad trust domain %q: %w", b.TrustDomain, err)
	}
	out := spiffebundle.New(td)
	for _, a := range b.X509Authorities {
		cert, err := x509.ParseCertificate(a.Asn1)
		if err != nil {
			return nil, fmt.Errorf("parsing an X.509 authority of %s: %w", td, err)
		}
		out.AddX509Authority(cert)
	}
	for _, k := range b.JwtAuthorities {
		pub, err := x509.ParsePKIXPublicKey(k.PublicKey)
		if err != nil {
			return nil, fmt.Errorf("parsing JWT authority %q of %s: %w", k.KeyId, td, err)
		}
		if k.KeyId == "" {
			return nil, fmt.Errorf("a JWT authority of %s has no key ID", td)
		}
		if err := out.AddJWTAuthority(k.KeyId, pub); err != nil {
			return nil, fmt.Errorf("JWT authority %q of %s: %w", k.KeyId, td, err)
		}
	}
	if b.RefreshHint > 0 {
		out.SetRefreshHint(time.Duration(b.RefreshHint) * time.Second)
	}
	out.SetSequenceNumber(b.SequenceNumber)
	return out, nil
}
