package spire

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/attestor/selector"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	entryv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/server/entry/v1"
	"github.com/spiffe/spire-api-sdk/proto/spire/api/types"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
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
	Admin:          true,
	Downstream:     true,
}

// syncedEntry is what the agent keeps of an authorized entry.
type syncedEntry struct {
	revision  int64
	createdAt int64
	entry     *agent.Entry // nil when it is not served to workloads
}

// syncEntries fetches what changed with SyncAuthorizedEntries, or the
// whole list with GetAuthorizedEntries from servers that lack it.
func (s *syncer) syncEntries(ctx context.Context) error {
	st := &s.view
	if !st.unimplemented {
		err := s.client.call(ctx, func(ctx context.Context, cc *grpc.ClientConn) error {
			return s.streamEntries(ctx, entryv1.NewEntryClient(cc))
		})
		if status.Code(err) != codes.Unimplemented {
			return err
		}
		st.unimplemented = true
		s.log.Info("The SPIRE Server has no SyncAuthorizedEntries; fetching whole entry lists with GetAuthorizedEntries")
	}
	return s.client.call(ctx, func(ctx context.Context, cc *grpc.ClientConn) error {
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
func (s *syncer) streamEntries(ctx context.Context, client entryv1.EntryClient) error {
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
			if se := s.view.entries[rev.Id]; se == nil || se.stale(rev.RevisionNumber, rev.CreatedAt) {
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

func (s *syncer) putEntry(e *types.Entry) {
	s.fetched.Add(1)
	st := &s.view
	if old := st.entries[e.Id]; old != nil && !old.stale(e.RevisionNumber, e.CreatedAt) {
		return
	}
	st.entries[e.Id] = s.convertEntry(e)
	st.entriesDirty = true
}

func (s *syncer) dropEntriesExcept(seen map[string]bool) {
	st := &s.view
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
func (s *syncer) convertEntry(e *types.Entry) *syncedEntry {
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
func (s *syncer) nodeEntry(e *types.Entry) bool {
	prefix := s.td.IDString() + "/spire/agent/"
	for _, sel := range e.Selectors {
		if sel.Type == "spiffe_id" && strings.HasPrefix(sel.Value, prefix) {
			return true
		}
	}
	return false
}

func (s *syncer) entryFromProto(e *types.Entry) (*agent.Entry, error) {
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
		Admin:          e.Admin,
		Downstream:     e.Downstream,
	}
	for _, sel := range e.Selectors {
		if sel.Type == "" || sel.Value == "" {
			return nil, fmt.Errorf("selector %q:%q has an empty part", sel.Type, sel.Value)
		}
		out.Selectors = append(out.Selectors, selector.Selector{Type: sel.Type, Value: sel.Value})
	}
	out.Selectors = selector.Sort(out.Selectors)
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
