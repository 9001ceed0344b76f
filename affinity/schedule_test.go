package affinity

import (
	"fmt"
	"math"
	"math/rand/v2"
	"net/netip"
	"testing"
)

// farm builds a table with random nodes (weights, some capacities) and
// random unpinned tunnels, deterministically from seed.
func farm(t testing.TB, seed uint64, nodes, tunnels int, weighted bool) *Table {
	t.Helper()
	r := rand.New(rand.NewPCG(seed, 7))
	tb, err := New(Options{Now: fixedClock()})
	if err != nil {
		t.Fatal(err)
	}
	var batch []Change
	for i := 0; i < nodes; i++ {
		w := uint32(100)
		if weighted {
			w = uint32(50 + r.IntN(200))
		}
		batch = append(batch, Change{Kind: PutNode, Node: &Node{Name: fmt.Sprintf("node-%02d", i), Addr: netip.AddrFrom4([4]byte{172, 16, byte(i >> 8), byte(i)}), Weight: w}})
	}
	for i := 0; i < tunnels; i++ {
		batch = append(batch, Change{Kind: PutTunnel, Tunnel: &Tunnel{
			ID:      fmt.Sprintf("t%06d", i),
			Peer:    netip.AddrFrom4([4]byte{100, byte(i >> 16), byte(i >> 8), byte(i)}),
			Subnets: []netip.Prefix{netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i >> 11), byte(i >> 3), byte(i << 5)}), 27)},
		}})
	}
	if _, err := tb.Apply(batch); err != nil {
		t.Fatal(err)
	}
	return tb
}

func owners(tb *Table) map[string]string {
	out := map[string]string{}
	for _, tu := range tb.Tunnels() {
		out[tu.ID] = tu.Node
	}
	return out
}

func TestSchedulerDeterministic(t *testing.T) {
	for seed := uint64(1); seed <= 5; seed++ {
		a := owners(farm(t, seed, 7, 3000, true))
		b := owners(farm(t, seed, 7, 3000, true))
		for id, n := range a {
			if b[id] != n {
				t.Fatalf("seed %d: tunnel %s on %s in one table, %s in the other", seed, id, n, b[id])
			}
		}
	}
}

func TestSchedulerBoundedLoad(t *testing.T) {
	for seed := uint64(1); seed <= 20; seed++ {
		r := rand.New(rand.NewPCG(seed, 1))
		nodes := 2 + r.IntN(30)
		tunnels := 100 + r.IntN(5000)
		weighted := seed%2 == 0
		tb := farm(t, seed, nodes, tunnels, weighted)
		var totalW float64
		for _, n := range tb.Nodes() {
			totalW += float64(n.Weight)
		}
		counts := tb.Counts()
		for _, n := range tb.Nodes() {
			share := float64(tunnels) * float64(n.Weight) / totalW
			limit := int(math.Ceil((1 + DefaultEpsilon) * share))
			if counts[n.Name] > limit {
				t.Errorf("seed %d: node %s holds %d, above ceil(1.25 x %.1f) = %d", seed, n.Name, counts[n.Name], share, limit)
			}
		}
	}
}

func TestSchedulerCapacity(t *testing.T) {
	tb := newTable(t, 0)
	if _, err := tb.Apply([]Change{
		{Kind: PutNode, Node: &Node{Name: "small", Addr: addr("172.16.0.1"), Capacity: 3, Weight: 10000}},
		{Kind: PutNode, Node: &Node{Name: "big", Addr: addr("172.16.0.2"), Capacity: 5}},
	}); err != nil {
		t.Fatal(err)
	}
	var batch []Change
	for i := 0; i < 8; i++ {
		batch = append(batch, put(fmt.Sprintf("t%d", i), fmt.Sprintf("192.0.2.%d", i+1), "", fmt.Sprintf("10.%d.0.0/24", i)))
	}
	if _, err := tb.Apply(batch); err != nil {
		t.Fatal(err)
	}
	if c := tb.Counts(); c["small"] != 3 || c["big"] != 5 {
		t.Fatalf("counts %v, want small 3 big 5", c)
	}
	_, err := tb.Apply([]Change{put("t9", "192.0.2.99", "", "10.99.0.0/24")})
	if err == nil {
		t.Fatal("placed a tunnel beyond every node's capacity")
	}
}

// TestStickiness: adding a node moves nothing; a node failing moves only
// its own tunnels; draining moves nothing until a rebalance.
func TestStickiness(t *testing.T) {
	for seed := uint64(1); seed <= 10; seed++ {
		tb := farm(t, seed, 6, 4000, seed%2 == 0)
		before := owners(tb)

		if _, err := tb.Apply([]Change{{Kind: PutNode, Node: &Node{Name: "node-new", Addr: addr("172.31.0.1")}}}); err != nil {
			t.Fatal(err)
		}
		assertMoved(t, before, owners(tb), nil)

		victim := "node-03"
		p, err := tb.PlanNodeState(victim, NodeDown)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := tb.Apply(p.Batch()); err != nil {
			t.Fatal(err)
		}
		after := owners(tb)
		assertMoved(t, before, after, func(id string) bool { return before[id] == victim })
		if n := len(tb.TunnelsOfNode(victim)); n != 0 || len(p.Unplaced) != 0 {
			t.Fatalf("seed %d: %d tunnels left on failed node", seed, n)
		}

		before = after
		p, _ = tb.PlanNodeState("node-01", NodeDraining)
		if _, err := tb.Apply(p.Batch()); err != nil {
			t.Fatal(err)
		}
		assertMoved(t, before, owners(tb), nil)
	}
}

// assertMoved checks that exactly the tunnels for which mayMove is true
// changed owner (mayMove nil: none did).
func assertMoved(t *testing.T, before, after map[string]string, mayMove func(string) bool) {
	t.Helper()
	for id, n := range before {
		moved := after[id] != n
		want := mayMove != nil && mayMove(id)
		if moved != want {
			t.Fatalf("tunnel %s: owner %s -> %s (move expected: %v)", id, n, after[id], want)
		}
	}
}

func TestRebalance(t *testing.T) {
	tb := farm(t, 3, 4, 2000, false)
	// Fill up, then add a node: nothing moves until a rebalance.
	if _, err := tb.Apply([]Change{{Kind: PutNode, Node: &Node{Name: "node-new", Addr: addr("172.31.0.1")}}}); err != nil {
		t.Fatal(err)
	}
	if c := tb.Counts()["node-new"]; c != 0 {
		t.Fatalf("new node got %d tunnels without a rebalance", c)
	}
	rev := tb.Revision()
	plan := tb.Rebalance(100)
	if len(plan.Moves) != 100 || plan.Remaining == 0 || tb.Revision() != rev {
		t.Fatalf("plan: %d moves, %d remaining, revision %d -> %d", len(plan.Moves), plan.Remaining, rev, tb.Revision())
	}
	for _, m := range plan.Moves {
		if m.To != "node-new" || m.Reason == "" {
			t.Fatalf("move %+v: want to node-new with a reason", m)
		}
	}
	before := owners(tb)
	if _, err := tb.Apply(plan.Batch()); err != nil {
		t.Fatal(err)
	}
	moved := map[string]bool{}
	for _, m := range plan.Moves {
		moved[m.Tunnel] = true
	}
	assertMoved(t, before, owners(tb), func(id string) bool { return moved[id] })

	// An unlimited rebalance evens the load out to about the fair share.
	plan = tb.Rebalance(1 << 30)
	if _, err := tb.Apply(plan.Batch()); err != nil {
		t.Fatal(err)
	}
	for name, c := range tb.Counts() {
		if c < 300 || c > 500 {
			t.Errorf("after full rebalance node %s holds %d of 2000 over 5 nodes", name, c)
		}
	}
	// A second full rebalance has nothing left to do.
	if p := tb.Rebalance(1 << 30); len(p.Moves) != 0 {
		t.Fatalf("rebalance not idempotent: %d more moves, first %+v", len(p.Moves), p.Moves[0])
	}

	// Draining: a rebalance empties the node, pinned tunnels included.
	p, _ := tb.PlanNodeState("node-00", NodeDraining)
	if _, err := tb.Apply(p.Batch()); err != nil {
		t.Fatal(err)
	}
	n := tb.Counts()["node-00"]
	plan = tb.Rebalance(1 << 30)
	if plan.Wanted < n {
		t.Fatalf("rebalance wants %d moves, draining node holds %d", plan.Wanted, n)
	}
	if _, err := tb.Apply(plan.Batch()); err != nil {
		t.Fatal(err)
	}
	if c := tb.Counts()["node-00"]; c != 0 {
		t.Fatalf("draining node still holds %d after a full rebalance", c)
	}
}

func TestRemoveNode(t *testing.T) {
	tb := farm(t, 9, 4, 500, false)
	before := owners(tb)
	p, err := tb.PlanRemoveNode("node-02")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tb.Apply(p.Batch()); err != nil {
		t.Fatal(err)
	}
	if _, ok := tb.Node("node-02"); ok {
		t.Fatal("node not removed")
	}
	assertMoved(t, before, owners(tb), func(id string) bool { return before[id] == "node-02" })
}

func TestHRWSpread(t *testing.T) {
	// Ignoring load, the preferred node should be roughly uniform over
	// equal-weight nodes: a skewed hash would show here.
	tb := newTable(t, 5)
	hits := map[string]int{}
	for i := 0; i < 50000; i++ {
		a := netip.AddrFrom4([4]byte{100, byte(i >> 16), byte(i >> 8), byte(i)})
		hits[tb.Prefer(a)[0]]++
	}
	for n, h := range hits {
		if h < 9000 || h > 11000 {
			t.Errorf("node %s preferred %d times of 50000 (want about 10000)", n, h)
		}
	}
}
