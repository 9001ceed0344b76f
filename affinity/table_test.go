package affinity

import (
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"
	"unicode"
)

var (
	addr = netip.MustParseAddr
	pfx  = netip.MustParsePrefix
)

func fixedClock() func() time.Time {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	n := 0
	return func() time.Time { n++; return t0.Add(time.Duration(n) * time.Second) }
}

func newTable(t testing.TB, nodes int) *Table {
	t.Helper()
	tb, err := New(Options{Now: fixedClock(), VIPs: []netip.Addr{addr("198.51.100.1"), addr("2001:db8:ffff::1")}})
	if err != nil {
		t.Fatal(err)
	}
	var batch []Change
	for i := 0; i < nodes; i++ {
		batch = append(batch, Change{Kind: PutNode, Node: &Node{Name: fmt.Sprintf("n%d", i), Addr: netip.AddrFrom4([4]byte{172, 16, 0, byte(i + 1)})}})
	}
	if _, err := tb.Apply(batch); err != nil {
		t.Fatal(err)
	}
	return tb
}

func put(id, peer string, node string, subnets ...string) Change {
	tu := &Tunnel{ID: id, Peer: addr(peer), Node: node, Pinned: node != ""}
	for _, s := range subnets {
		tu.Subnets = append(tu.Subnets, pfx(s))
	}
	return Change{Kind: PutTunnel, Tunnel: tu}
}

func TestInvariants(t *testing.T) {
	base := []Change{
		put("t1", "192.0.2.1", "n0", "10.1.0.0/24"),
		put("t2", "2001:db8::1", "", "fd00:1::/64", "10.2.0.0/27"),
	}
	tests := []struct {
		name   string
		change Change
		want   []string // substrings of the error; nil: accepted
	}{
		{"new tunnel", put("t3", "192.0.2.3", "", "10.3.0.0/24"), nil},
		{"same peer", put("t3", "192.0.2.1", "", "10.3.0.0/24"), []string{"peer 192.0.2.1", "tunnel t1"}},
		{"same peer v6", put("t3", "2001:db8::1", "", "10.3.0.0/24"), []string{"peer 2001:db8::1", "tunnel t2"}},
		{"duplicate subnet", put("t3", "192.0.2.3", "", "10.1.0.0/24"), []string{"subnet 10.1.0.0/24 is already protected by tunnel t1"}},
		{"subnet inside", put("t3", "192.0.2.3", "", "10.1.0.128/25"), []string{"10.1.0.128/25 lies inside subnet 10.1.0.0/24 of tunnel t1"}},
		{"subnet contains", put("t3", "192.0.2.3", "", "10.0.0.0/8"), []string{"10.0.0.0/8 contains subnet", "tunnel t"}},
		{"v6 subnet inside", put("t3", "192.0.2.3", "", "fd00:1::/96"), []string{"fd00:1::/96 lies inside", "tunnel t2"}},
		{"subnet holds VIP", put("t3", "192.0.2.3", "", "198.51.100.0/24"), []string{"contains director VIP 198.51.100.1"}},
		{"peer is VIP", put("t3", "198.51.100.1", "", "10.3.0.0/24"), []string{"peer 198.51.100.1 is a director VIP"}},
		{"unknown owner", put("t3", "192.0.2.3", "nX", "10.3.0.0/24"), []string{`owner "nX" does not exist`}},
		{"host bits", put("t3", "192.0.2.3", "", "10.3.0.1/24"), []string{"host bits set", "10.3.0.0/24"}},
		{"no subnets yet (learned from IKE)", put("t3", "192.0.2.3", ""), nil},
		{"own overlap", put("t3", "192.0.2.3", "", "10.3.0.0/24", "10.3.0.0/25"), []string{"same tunnel overlap"}},
		{"bad id", put("t 3", "192.0.2.3", "", "10.3.0.0/24"), []string{"tunnel id", "contains"}},
		{"mapped peer", put("t3", "::ffff:192.0.2.3", "", "10.3.0.0/24"), []string{"IPv4-mapped"}},
		{"change own subnets", put("t1", "192.0.2.1", "n0", "10.1.0.0/23"), nil},
		{"move peer to other tunnel", put("t1", "2001:db8::1", "n0", "10.1.0.0/24"), []string{"tunnel t2"}},
		{"delete missing", Change{Kind: DeleteTunnel, Name: "nope"}, []string{"not found"}},
		{"delete node with tunnels", Change{Kind: DeleteNode, Name: "n0"}, []string{"node n0 still owns 1 tunnel(s), for example t1"}},
		{"node mark change", Change{Kind: PutNode, Node: &Node{Name: "n0", Addr: addr("172.16.0.1"), Mark: 9}}, []string{"mark 1 for life"}},
		{"node address taken", Change{Kind: PutNode, Node: &Node{Name: "n9", Addr: addr("172.16.0.2")}}, []string{"already belongs to node n1"}},
		{"node is VIP", Change{Kind: PutNode, Node: &Node{Name: "n9", Addr: addr("198.51.100.1")}}, []string{"is a director VIP"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tb := newTable(t, 3)
			if _, err := tb.Apply(base); err != nil {
				t.Fatal(err)
			}
			before := tb.Snapshot()
			_, err := tb.Apply([]Change{tc.change})
			if tc.want == nil {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("accepted, want error with %q", tc.want)
			}
			var be *BatchError
			if !errors.As(err, &be) || be.Total != 1 {
				t.Fatalf("error %v is not a one-change BatchError", err)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q lacks %q", err, w)
				}
			}
			assertSameSnapshot(t, before, tb.Snapshot())
		})
	}
}

func assertSameSnapshot(t *testing.T, a, b Snapshot) {
	t.Helper()
	if a.Revision != b.Revision || len(a.Nodes) != len(b.Nodes) || len(a.Tunnels) != len(b.Tunnels) {
		t.Fatalf("snapshots differ: rev %d/%d nodes %d/%d tunnels %d/%d", a.Revision, b.Revision, len(a.Nodes), len(b.Nodes), len(a.Tunnels), len(b.Tunnels))
	}
	for i := range a.Nodes {
		if !a.Nodes[i].Equal(&b.Nodes[i]) {
			t.Fatalf("node %d differs: %+v vs %+v", i, a.Nodes[i], b.Nodes[i])
		}
	}
	for i := range a.Tunnels {
		x, y := a.Tunnels[i], b.Tunnels[i]
		if !x.Equal(&y) {
			t.Fatalf("tunnel %d differs: %+v vs %+v", i, x, y)
		}
	}
	if !slices.Equal(a.Buckets, b.Buckets) {
		t.Fatalf("buckets differ: %d %v vs %d %v", len(a.Buckets), a.Buckets, len(b.Buckets), b.Buckets)
	}
}

func TestBatchIsAllOrNothing(t *testing.T) {
	tb := newTable(t, 2)
	if _, err := tb.Apply([]Change{put("t1", "192.0.2.1", "", "10.1.0.0/24")}); err != nil {
		t.Fatal(err)
	}
	before := tb.Snapshot()
	_, err := tb.Apply([]Change{
		put("t2", "192.0.2.2", "", "10.2.0.0/24"),                          // fine
		put("t3", "192.0.2.3", "", "10.2.0.0/25"),                          // inside t2, which is in this batch
		{Kind: DeleteTunnel, Name: "t1"},                                   // fine
		put("t4", "192.0.2.4", "nope", "10.4.0.0/24"),                      // unknown node
		put("t5", "192.0.2.5", "", "10.5.0.0/24"),                          // fine
		put("t6", "192.0.2.2", "", "10.6.0.0/24"),                          // peer of t2
		{Kind: PutNode, Node: &Node{Name: "n9", Addr: addr("172.16.1.9")}}, // fine
	})
	var be *BatchError
	if !errors.As(err, &be) {
		t.Fatalf("want BatchError, got %v", err)
	}
	if be.Total != 3 {
		t.Fatalf("want 3 refused changes, got %d: %v", be.Total, err)
	}
	for i, want := range []int{1, 3, 5} {
		if be.Errors[i].Index != want {
			t.Errorf("error %d has index %d, want %d", i, be.Errors[i].Index, want)
		}
	}
	assertSameSnapshot(t, before, tb.Snapshot())
	if _, ok := tb.Node("n9"); ok {
		t.Fatal("node of a refused batch was kept")
	}
	if _, ok := tb.LookupPeer(addr("192.0.2.2")); ok {
		t.Fatal("peer of a refused batch was kept")
	}
	if _, _, ok := tb.LookupSubnet(addr("10.2.0.1")); ok {
		t.Fatal("subnet of a refused batch was kept")
	}
	if m, ok := tb.Lookup(addr("10.1.0.7")); !ok || m.Tunnel.ID != "t1" {
		t.Fatal("deletion of a refused batch was kept")
	}
}

func TestRevisionAndNoOps(t *testing.T) {
	tb := newTable(t, 2)
	r0 := tb.Revision()
	batch := []Change{put("t1", "192.0.2.1", "", "10.1.0.0/24", "10.9.0.0/24")}
	a, err := tb.Apply(batch)
	if err != nil {
		t.Fatal(err)
	}
	if a.Revision != r0+1 || tb.Revision() != r0+1 || len(a.Changes) != 1 {
		t.Fatalf("revision %d -> %d with %d changes", r0, a.Revision, len(a.Changes))
	}
	tu, _ := tb.Tunnel("t1")
	if tu.Revision != r0+1 || tu.Node == "" || tu.Pinned {
		t.Fatalf("tunnel not stamped or scheduled: %+v", tu)
	}
	// The same content again, subnets in another order: a no-op.
	again := []Change{put("t1", "192.0.2.1", "", "10.9.0.0/24", "10.1.0.0/24")}
	a, err = tb.Apply(again)
	if err != nil {
		t.Fatal(err)
	}
	if len(a.Changes) != 0 || tb.Revision() != r0+1 {
		t.Fatalf("no-op bumped the revision to %d (%d changes)", tb.Revision(), len(a.Changes))
	}
	// Rollback restores the previous revision and content.
	before := tb.Snapshot()
	a, err = tb.Apply([]Change{put("t2", "192.0.2.2", "", "10.2.0.0/24"), {Kind: DeleteTunnel, Name: "t1"}})
	if err != nil {
		t.Fatal(err)
	}
	a.Rollback()
	assertSameSnapshot(t, before, tb.Snapshot())
}

func TestLookups(t *testing.T) {
	tb := newTable(t, 3)
	if _, err := tb.Apply([]Change{
		put("a", "192.0.2.1", "n1", "10.0.0.0/16"),
		put("b", "192.0.2.2", "n2", "10.1.0.0/24", "fd00:1::/48"),
		put("c", "2001:db8::7", "", "10.2.0.0/27"),
	}); err != nil {
		t.Fatal(err)
	}
	m, ok := tb.Lookup(addr("192.0.2.2"))
	if !ok || m.By != MatchPeer || m.Tunnel.ID != "b" || m.Node.Name != "n2" {
		t.Fatalf("peer lookup: %+v %v", m, ok)
	}
	m, ok = tb.Lookup(addr("fd00:1:0:ff::1"))
	if !ok || m.By != MatchSubnet || m.Prefix != pfx("fd00:1::/48") || m.Tunnel.ID != "b" {
		t.Fatalf("subnet lookup: %+v %v", m, ok)
	}
	m, ok = tb.Lookup(addr("10.0.200.1"))
	if !ok || m.Tunnel.ID != "a" || m.Prefix != pfx("10.0.0.0/16") {
		t.Fatalf("subnet lookup: %+v %v", m, ok)
	}
	if _, ok := tb.Lookup(addr("10.2.0.32")); ok {
		t.Fatal("address outside every subnet matched")
	}
	if mark, ok := tb.PeerMark(addr("192.0.2.1")); !ok || mark != 2 {
		t.Fatalf("peer mark %d %v, want n1's mark 2", mark, ok)
	}
	if got := tb.TunnelsOfNode("n2"); len(got) != 1 || got[0].ID != "b" {
		t.Fatalf("tunnels of n2: %+v", got)
	}
}

func TestMarksStableAndNotReused(t *testing.T) {
	tb := newTable(t, 3) // marks 1, 2, 3
	if _, err := tb.Apply([]Change{{Kind: DeleteNode, Name: "n1"}}); err != nil {
		t.Fatal(err)
	}
	n0, _ := tb.Node("n0")
	n2, _ := tb.Node("n2")
	if n0.Mark != 1 || n2.Mark != 3 {
		t.Fatalf("marks moved: %d %d", n0.Mark, n2.Mark)
	}
	// Changing a node's weight keeps its mark; a new node never takes a
	// mark an existing node holds.
	if _, err := tb.Apply([]Change{
		{Kind: PutNode, Node: &Node{Name: "n2", Addr: addr("172.16.0.3"), Weight: 300}},
		{Kind: PutNode, Node: &Node{Name: "n7", Addr: addr("172.16.0.7")}},
		{Kind: PutNode, Node: &Node{Name: "n8", Addr: addr("172.16.0.8")}},
	}); err != nil {
		t.Fatal(err)
	}
	seen := map[uint16]string{}
	for _, n := range tb.Nodes() {
		if o, dup := seen[n.Mark]; dup {
			t.Fatalf("mark %d shared by %s and %s", n.Mark, o, n.Name)
		}
		seen[n.Mark] = n.Name
	}
	if n2, _ := tb.Node("n2"); n2.Mark != 3 || n2.Weight != 300 {
		t.Fatalf("n2 after weight change: %+v", n2)
	}
}

func TestSetVIPsRefusesCoveredVIP(t *testing.T) {
	tb := newTable(t, 1)
	if _, err := tb.Apply([]Change{put("a", "192.0.2.1", "", "10.0.0.0/16")}); err != nil {
		t.Fatal(err)
	}
	err := tb.SetVIPs([]netip.Addr{addr("10.0.3.3")})
	if err == nil || !strings.Contains(err.Error(), "inside protected subnet 10.0.0.0/16 of tunnel a") {
		t.Fatalf("got %v", err)
	}
}

func TestPinnedToDownNodeRefused(t *testing.T) {
	tb := newTable(t, 2)
	p, err := tb.PlanNodeState("n1", NodeDown)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tb.Apply(p.Batch()); err != nil {
		t.Fatal(err)
	}
	_, err = tb.Apply([]Change{put("a", "192.0.2.1", "n1", "10.0.0.0/16")})
	if err == nil || !strings.Contains(err.Error(), "owner n1 is down") {
		t.Fatalf("got %v", err)
	}
}

func TestCheckChangesNothing(t *testing.T) {
	tb := newTable(t, 2)
	before := tb.Snapshot()
	if err := tb.Check([]Change{put("a", "192.0.2.1", "", "10.0.0.0/16")}); err != nil {
		t.Fatal(err)
	}
	assertSameSnapshot(t, before, tb.Snapshot())
	if _, ok := tb.Tunnel("a"); ok {
		t.Fatal("Check left the tunnel in the table")
	}
	if err := tb.Check([]Change{put("a", "192.0.2.1", "nope", "10.0.0.0/16")}); err == nil {
		t.Fatal("Check accepted an unknown owner")
	}
}

// TestHealthAndOperatorStates: a health decision moves exactly what the
// operator's `node down` moves and stores its record; the operator's
// state changes clear the record (a hold included); other changes keep it.
func TestHealthAndOperatorStates(t *testing.T) {
	tb := newTable(t, 3)
	var batch []Change
	for i := range 30 {
		batch = append(batch, put(fmt.Sprintf("t%02d", i), fmt.Sprintf("192.0.2.%d", i+1), "", fmt.Sprintf("10.%d.0.0/16", i)))
	}
	if _, err := tb.Apply(batch); err != nil {
		t.Fatal(err)
	}
	byOperator, err := tb.PlanNodeState("n1", NodeDown)
	if err != nil {
		t.Fatal(err)
	}
	rec := NodeHealth{Down: true, Since: time.Unix(100, 0).UTC(), Reason: "health: ike: timeout 2/2", Downs: []time.Time{time.Unix(100, 0).UTC()}}
	byHealth, err := tb.PlanHealthState("n1", NodeDown, rec, rec.Reason)
	if err != nil {
		t.Fatal(err)
	}
	if len(byHealth.Moves) == 0 || !reflect.DeepEqual(moved(byHealth), moved(byOperator)) {
		t.Fatalf("health moves %v, operator moves %v", moved(byHealth), moved(byOperator))
	}
	for _, c := range byHealth.Batch() {
		if !strings.Contains(c.Reason, "node n1 down (health: ike: timeout 2/2)") {
			t.Fatalf("change without the health reason: %q", c.Reason)
		}
	}
	if _, err := tb.Apply(byHealth.Batch()); err != nil {
		t.Fatal(err)
	}
	n, _ := tb.Node("n1")
	if n.State != NodeDown || !n.Health.Equal(&rec) {
		t.Fatalf("after health down: %+v", n)
	}
	// A weight change keeps the record.
	n.Weight = 200
	if _, err := tb.Apply([]Change{{Kind: PutNode, Node: &n}}); err != nil {
		t.Fatal(err)
	}
	if n, _ = tb.Node("n1"); !n.Health.Equal(&rec) {
		t.Fatalf("weight change dropped the record: %+v", n.Health)
	}
	// The operator's up clears it.
	up, err := tb.PlanNodeState("n1", NodeActive)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tb.Apply(up.Batch()); err != nil {
		t.Fatal(err)
	}
	if n, _ = tb.Node("n1"); n.State != NodeActive || !n.Health.IsZero() {
		t.Fatalf("after the operator's up: %+v", n)
	}
}

func moved(p *Plan) []string {
	var out []string
	for _, m := range p.Moves {
		out = append(out, m.Tunnel+">"+m.To)
	}
	return out
}

// TestMoveKeepsIndexes: a move (same peer and subnets, another node)
// re-points the index keys in place; every lookup and count follows it,
// and a refused batch with a move in it puts everything back.
func TestMoveKeepsIndexes(t *testing.T) {
	tb := newTable(t, 2)
	if _, err := tb.Apply([]Change{put("t1", "192.0.2.1", "n0", "10.1.0.0/24", "10.1.1.0/24")}); err != nil {
		t.Fatal(err)
	}
	owner := func(want string) {
		t.Helper()
		if tu, ok := tb.LookupPeer(addr("192.0.2.1")); !ok || tu.Node != want {
			t.Fatalf("peer lookup: %+v %v, want node %s", tu, ok, want)
		}
		for _, a := range []string{"10.1.0.9", "10.1.1.9"} {
			if tu, _, ok := tb.LookupSubnet(addr(a)); !ok || tu.Node != want {
				t.Fatalf("subnet lookup %s: %+v %v, want node %s", a, tu, ok, want)
			}
		}
		if c := tb.Counts(); c[want] != 1 || c["n0"]+c["n1"] != 1 {
			t.Fatalf("counts %v, want the tunnel on %s", c, want)
		}
	}
	before := tb.Snapshot()
	if _, err := tb.Apply([]Change{put("t1", "192.0.2.1", "n1", "10.1.0.0/24", "10.1.1.0/24"), put("t2", "192.0.2.2", "nope")}); err == nil {
		t.Fatal("a batch with an unknown node was applied")
	}
	assertSameSnapshot(t, before, tb.Snapshot())
	owner("n0")
	p, err := tb.PlanNodeState("n0", NodeDown)
	if err != nil || len(p.Moves) != 1 {
		t.Fatalf("plan %+v, %v: want one move", p, err)
	}
	a, err := tb.Apply(p.Batch())
	if err != nil {
		t.Fatal(err)
	}
	owner("n1")
	if c := a.Changes[len(a.Changes)-1]; c.Old == nil || c.Old.Node != "n0" || c.Tunnel.Node != "n1" {
		t.Fatalf("resolved move %+v old %+v, want n0 -> n1", c.Tunnel, c.Old)
	}

	// A record that keeps its keys skips the checks of its keys only:
	// a bad comment is still refused, and nothing changes.
	if p, err = tb.PlanNodeState("n0", NodeActive); err != nil {
		t.Fatal(err)
	}
	if _, err := tb.Apply(p.Batch()); err != nil {
		t.Fatal(err)
	}
	bad := put("t1", "192.0.2.1", "n0", "10.1.0.0/24", "10.1.1.0/24")
	bad.Tunnel.Comment = "bell\a"
	before = tb.Snapshot()
	var be *BatchError
	if _, err := tb.Apply([]Change{bad}); !errors.As(err, &be) || !errors.Is(be.Errors[0], ErrInvalid) {
		t.Fatalf("a move with a control character in its comment: %v, want ErrInvalid", err)
	}
	assertSameSnapshot(t, before, tb.Snapshot())
	owner("n1")
	// The same subnets in another order (checked as new keys, the slow
	// path) make the same move.
	if _, err := tb.Apply([]Change{put("t1", "192.0.2.1", "n0", "10.1.1.0/24", "10.1.0.0/24")}); err != nil {
		t.Fatal(err)
	}
	owner("n0")
	if tu, _ := tb.Tunnel("t1"); !slices.IsSortedFunc(tu.Subnets, ComparePrefix) {
		t.Fatalf("subnets %v are not sorted", tu.Subnets)
	}
}

// TestLoadRefusesRepeatedKeys: Load looks up neither an old record nor
// the peer's owner before it indexes a tunnel, so a tunnel id given twice
// (a second record with other keys, or the same keys) and a peer of two
// tunnels must still be refused, the other tunnel named, and leave the
// table empty.
func TestLoadRefusesRepeatedKeys(t *testing.T) {
	nodes := []Node{{Name: "n0", Addr: addr("172.16.0.1"), Mark: 1}}
	for _, second := range []Tunnel{
		{ID: "t1", Peer: addr("192.0.2.2"), Subnets: []netip.Prefix{pfx("10.0.2.0/24")}, Node: "n0"},
		{ID: "t1", Peer: addr("192.0.2.1"), Subnets: []netip.Prefix{pfx("10.0.1.0/24")}, Node: "n0"},
		{ID: "t2", Peer: addr("192.0.2.1"), Subnets: []netip.Prefix{pfx("10.0.2.0/24")}, Node: "n0"},
		{ID: "t2", Peer: addr("2001:db8::1"), Subnets: []netip.Prefix{pfx("10.0.1.0/25")}, Node: "n0"},
	} {
		tb, err := New(Options{})
		if err != nil {
			t.Fatal(err)
		}
		first := Tunnel{ID: "t1", Peer: addr("192.0.2.1"), Subnets: []netip.Prefix{pfx("10.0.1.0/24")}, Node: "n0"}
		err = tb.Load(7, nodes, 2, slices.Values([]*Tunnel{&first, &second}))
		var be *BatchError
		if !errors.As(err, &be) || len(be.Errors) != 1 || !errors.Is(be.Errors[0], ErrConflict) || second.ID == "t2" && !strings.Contains(err.Error(), "tunnel t1") {
			t.Fatalf("load of t1, then %s (peer %s, subnet %s): %v, want a conflict naming t1", second.ID, second.Peer, second.Subnets[0], err)
		}
		if tb.Len() != 0 || tb.Revision() != 0 || len(tb.Nodes()) != 0 {
			t.Fatalf("refused load left %d tunnels, revision %d, %d nodes", tb.Len(), tb.Revision(), len(tb.Nodes()))
		}
	}
}

// TestValidateIDASCII: the ASCII fast path of ValidateID allows exactly
// what the Unicode rule allows, byte by byte.
func TestValidateIDASCII(t *testing.T) {
	for c := rune(0); c < 0x80; c++ {
		id := "a" + string(c) + "b"
		want := unicode.IsGraphic(c) && !unicode.IsSpace(c) && !strings.ContainsRune(`,;"`, c)
		if err := ValidateID("tunnel id", id); (err == nil) != want {
			t.Errorf("ValidateID(%+q): %v, want allowed %v", id, err, want)
		}
	}
	if err := ValidateID("tunnel id", "tünnel-1"); err != nil {
		t.Errorf("non-ASCII printable id refused: %v", err)
	}
}

// TestMarksWalksTheIndexes: Marks walks the tunnels' own subnet lists;
// what it yields is exactly the prefix table and the peer index, through
// new tunnels, moves, subnet changes and deletions.
func TestMarksWalksTheIndexes(t *testing.T) {
	tb := newTable(t, 3)
	steps := [][]Change{
		{put("t1", "192.0.2.1", "n0", "10.1.0.0/24", "10.1.1.0/24"), put("t2", "2001:db8::1", "n1", "fd00:1::/64", "10.2.0.0/27"), put("t3", "192.0.2.3", "n2")},
		{put("t1", "192.0.2.1", "n1", "10.1.0.0/24", "10.1.1.0/24")},                    // moved
		{put("t2", "2001:db8::1", "n1", "fd00:2::/64")},                                 // subnets changed
		{{Kind: DeleteTunnel, Name: "t3"}, put("t4", "192.0.2.4", "n2", "10.4.0.0/16")}, // deleted, added
	}
	for i, batch := range steps {
		if _, err := tb.Apply(batch); err != nil {
			t.Fatalf("step %d: %v", i, err)
		}
		peers, subnets := map[netip.Addr]uint16{}, map[netip.Prefix]uint16{}
		tb.Marks(func(a netip.Addr, m uint16) { peers[a] = m }, func(p netip.Prefix, m uint16) { subnets[p] = m })
		wantPeers, wantSubnets := map[netip.Addr]uint16{}, map[netip.Prefix]uint16{}
		tb.peers.each(func(e *entry) { wantPeers[e.peer] = e.mark })
		for p, e := range tb.subnets.All() {
			wantSubnets[p] = e.mark
		}
		if !maps.Equal(peers, wantPeers) || !maps.Equal(subnets, wantSubnets) {
			t.Fatalf("step %d: Marks yields peers %v subnets %v, the indexes hold %v %v", i, peers, subnets, wantPeers, wantSubnets)
		}
	}
}
