package agent

import (
	"net"
	"strings"
	"testing"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/internal/testkit"
)

// fairListener is a limitListener whose connections are made up: the
// policy is tested by calling admit as Accept does.
type fairListener struct {
	*limitListener
	t   *testing.T
	log *testkit.Buffer
}

func newFairListener(t *testing.T, maxConns int) *fairListener {
	log, buf := testkit.NewLogger(hclog.Warn)
	return &fairListener{limitListener: newLimitListener(nil, maxConns, log), t: t, log: buf}
}

// connect admits a connection of uid that was last active at second active.
func (f *fairListener) connect(uid uint32, active int64) (c, evicted *limitConn, ok bool) {
	a, b := net.Pipe()
	f.t.Cleanup(func() { a.Close(); b.Close() })
	c = &limitConn{Conn: a, l: f.limitListener, key: uidKey(uid)}
	evicted, ok = f.admit(c)
	c.active.Store(active)
	if evicted != nil {
		evicted.Conn.Close()
	}
	return c, evicted, ok
}

func (f *fairListener) held(uid uint32) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	if u := f.users[uidKey(uid)]; u != nil {
		return len(u.conns)
	}
	return 0
}

func TestFairShareEvictsLeastRecentlyActiveOfHeaviest(t *testing.T) {
	const attacker, victim, third = 47001, 47002, 0
	f := newFairListener(t, 8)
	// The attacker fills the cap. Connection 3 was active last, 5 and 6
	// are the idlest (5 is the older of the two).
	activity := []int64{10, 10, 10, 90, 10, 1, 1, 10}
	var conns []*limitConn
	for _, a := range activity {
		c, ev, ok := f.connect(attacker, a)
		if !ok || ev != nil {
			t.Fatalf("under the cap: admitted %v, evicted %v", ok, ev)
		}
		conns = append(conns, c)
	}
	// At the cap, alone: refused.
	if _, _, ok := f.connect(attacker, 100); ok {
		t.Fatal("a user holding the whole cap got one more connection")
	}

	// The victim gets in at the expense of the attacker's idlest.
	_, ev, ok := f.connect(victim, 100)
	if !ok || ev != conns[5] {
		t.Fatalf("the victim: admitted %v, evicted %v; want the attacker's idlest, oldest connection", ok, ev)
	}
	_, ev, ok = f.connect(victim, 100)
	if !ok || ev != conns[6] {
		t.Fatalf("the victim's second: admitted %v, evicted %v; want the next idlest", ok, ev)
	}
	// The attacker, now over its share (8/2), may not take them back.
	if _, _, ok := f.connect(attacker, 100); ok {
		t.Fatal("the attacker took a connection back over its share")
	}
	// The victim may go up to its share, 4, and no further.
	for range 2 {
		if _, _, ok := f.connect(victim, 100); !ok {
			t.Fatal("the victim was refused below its share")
		}
	}
	if _, _, ok := f.connect(victim, 100); ok {
		t.Fatal("the victim got more than its share")
	}
	if got := [2]int{f.held(attacker), f.held(victim)}; got != [2]int{4, 4} {
		t.Fatalf("held %v, want 4 each", got)
	}
	// The most recently active attacker connection is never the one closed.
	if conns[3].released {
		t.Fatal("the attacker's active connection was closed before idle ones")
	}

	// A third user, root's health probe, gets in with a share of 8/3.
	_, ev, ok = f.connect(third, 100)
	if !ok || ev == nil || ev.key != uidKey(attacker) {
		t.Fatalf("root's probe: admitted %v, evicted %v; want one of the lowest uid among the heaviest", ok, ev)
	}

	// A closed connection (closed twice, or after eviction) frees one slot.
	before := f.total
	conns[3].Close()
	conns[3].Close()
	conns[5].Close()
	if f.total != before-1 {
		t.Fatalf("total went from %d to %d after one close", before, f.total)
	}

	// The attacker is named once, however often it was refused or evicted.
	log := f.log.String()
	if n := strings.Count(log, "uid=47001"); n != 1 {
		t.Errorf("the attacker was logged %d times, want once a minute:\n%s", n, log)
	}
	if !strings.Contains(log, "limit=8") {
		t.Errorf("the warning does not give the limit:\n%s", log)
	}
}

func TestFairShareWithOneSlot(t *testing.T) {
	f := newFairListener(t, 1)
	if _, _, ok := f.connect(1, 0); !ok {
		t.Fatal("the first connection was refused")
	}
	// Taking the only slot from the only holder would just swap them over.
	if _, ev, ok := f.connect(2, 0); ok || ev != nil {
		t.Fatalf("admitted %v, evicted %v with a cap of 1", ok, ev)
	}
	// The refused newcomer is named, not the user holding the slot.
	if logs := f.log.String(); !strings.Contains(logs, "refusing a new user") || !strings.Contains(logs, "uid=2") || strings.Contains(logs, "uid=1") {
		t.Errorf("the refusal names the wrong user:\n%s", logs)
	}
}
