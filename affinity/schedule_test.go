package affinity

import (
	"fmt"
	"math"
	"math/rand/v2"
	"net/netip"
	"strings"
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

// refPick is the placement rule written plainly from the public API: the
// least loaded (per weight, counting the new tunnel) of the peer's d
// preferred nodes (d = 0: all) that is below its bound and capacity, the preferred one
// on a tie; else the first node in preference order below both; else the
// first below its capacity.
func refPick(tb *Table, peer netip.Addr, d int) string {
	pref, bound, counts := tb.Prefer(peer), tb.Bound(), tb.Counts()
	nodes := map[string]Node{}
	for _, n := range tb.Nodes() {
		nodes[n.Name] = n
	}
	fits := func(name string) bool {
		n := nodes[name]
		return counts[name] < bound[name] && (n.Capacity == 0 || counts[name] < n.Capacity)
	}
	best := ""
	if d == 0 {
		d = len(pref)
	}
	for _, name := range pref[:min(d, len(pref))] {
		if !fits(name) {
			continue
		}
		l := float64(counts[name]+1) / float64(nodes[name].Weight)
		if best == "" || l < float64(counts[best]+1)/float64(nodes[best].Weight) {
			best = name
		}
	}
	if best != "" {
		return best
	}
	for _, name := range pref {
		if fits(name) {
			return name
		}
	}
	// Every node within its capacity is at its bound: capacity decides.
	for _, name := range pref {
		if c := nodes[name].Capacity; c == 0 || counts[name] < c {
			return name
		}
	}
	return ""
}

func TestSchedulerChoicesMatchReference(t *testing.T) {
	for _, d := range []int{0, 1, 2, 3, 5} {
		for seed := uint64(1); seed <= 4; seed++ {
			r := rand.New(rand.NewPCG(seed, uint64(d)))
			tb, err := New(Options{Now: fixedClock(), Choices: d})
			if err != nil {
				t.Fatal(err)
			}
			var nodes []Change
			for i := 0; i < 3+r.IntN(8); i++ {
				nodes = append(nodes, Change{Kind: PutNode, Node: &Node{Name: fmt.Sprintf("n%02d", i), Addr: netip.AddrFrom4([4]byte{172, 16, 0, byte(i + 1)}),
					Weight: uint32(50 + 50*r.IntN(4)), Capacity: []int{0, 0, 0, 150}[r.IntN(4)]}})
			}
			if _, err := tb.Apply(nodes); err != nil {
				t.Fatal(err)
			}
			for i := 0; i < 600; i++ {
				peer := netip.AddrFrom4([4]byte{100, 1, byte(i >> 8), byte(i)})
				want := refPick(tb, peer, d)
				a, err := tb.Apply([]Change{put(fmt.Sprintf("t%04d", i), peer.String(), "")})
				if err != nil {
					if want != "" {
						t.Fatalf("d=%d seed %d: tunnel %d refused (%v), reference places it on %s", d, seed, i, err, want)
					}
					continue
				}
				if got := a.Changes[0].Tunnel.Node; got != want {
					t.Fatalf("d=%d seed %d: tunnel %d on %s, reference says %s", d, seed, i, got, want)
				}
				// Churn: a third of the time a random tunnel leaves.
				if r.IntN(3) == 0 {
					id := fmt.Sprintf("t%04d", r.IntN(i+1))
					if _, ok := tb.Tunnel(id); ok {
						if _, err := tb.Apply([]Change{{Kind: DeleteTunnel, Name: id}}); err != nil {
							t.Fatal(err)
						}
					}
				}
			}
		}
	}
}

// fourNodes returns a table placing with d choices, with nodes n0..n3 and
// n tunnels whose peers are in 100.net.0.0/16.
func fourNodes(t *testing.T, d, n int, net byte) *Table {
	t.Helper()
	tb, err := New(Options{Now: fixedClock(), Choices: d})
	if err != nil {
		t.Fatal(err)
	}
	var batch []Change
	for i := 0; i < 4; i++ {
		batch = append(batch, Change{Kind: PutNode, Node: &Node{Name: fmt.Sprintf("n%d", i), Addr: netip.AddrFrom4([4]byte{172, 16, 0, byte(i + 1)})}})
	}
	for i := 0; i < n; i++ {
		batch = append(batch, put(fmt.Sprintf("t%05d", i), netip.AddrFrom4([4]byte{100, net, byte(i >> 8), byte(i)}).String(), ""))
	}
	if _, err := tb.Apply(batch); err != nil {
		t.Fatal(err)
	}
	return tb
}

// TestChoicesFillAddedNode: with d = 2 an added node takes about twice its
// share of new tunnels while it is the emptiest, and nothing placed moves.
func TestChoicesFillAddedNode(t *testing.T) {
	share := map[int]int{}
	for _, d := range []int{1, 2} {
		tb := fourNodes(t, d, 4000, 2)
		before := owners(tb)
		if _, err := tb.Apply([]Change{{Kind: PutNode, Node: &Node{Name: "new", Addr: addr("172.16.0.99")}}}); err != nil {
			t.Fatal(err)
		}
		var batch []Change
		for i := 0; i < 500; i++ {
			batch = append(batch, put(fmt.Sprintf("b%05d", i), netip.AddrFrom4([4]byte{100, 3, byte(i >> 8), byte(i)}).String(), ""))
		}
		if _, err := tb.Apply(batch); err != nil {
			t.Fatal(err)
		}
		after := owners(tb)
		for id, n := range before {
			if after[id] != n {
				t.Fatalf("d=%d: tunnel %s moved from %s to %s when others arrived", d, id, n, after[id])
			}
		}
		share[d] = tb.Counts()["new"]
	}
	// d = 1: the new node is the first choice of about 1/5 of the peers
	// (100 of 500); d = 2: one of the first two of about 2/5 (200).
	if share[1] < 70 || share[1] > 130 || share[2] < 170 || share[2] > 230 {
		t.Fatalf("new node took %d (d=1) and %d (d=2) of 500 arrivals; want about 100 and 200", share[1], share[2])
	}
}

func TestOptionsValidate(t *testing.T) {
	for _, c := range []struct {
		o    Options
		want string
	}{
		{Options{Choices: -1}, "choices: -1 out of range 0..4095"},
		{Options{Choices: 4096}, "choices: 4096 out of range 0..4095"},
		{Options{Epsilon: -0.5}, "epsilon: -0.5 out of range (0, 10]"},
		{Options{Epsilon: 11, Choices: -2}, "epsilon: 11 out of range (0, 10]; choices: -2 out of range"},
	} {
		err := c.o.Validate()
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%+v: error %v, want %q", c.o, err, c.want)
		}
		if _, err := New(c.o); err == nil {
			t.Errorf("%+v: New accepted it", c.o)
		}
	}
	tb, err := New(Options{})
	if err != nil || tb.Choices() != DefaultChoices || tb.Epsilon() != DefaultEpsilon {
		t.Fatalf("defaults: %v, choices %d, epsilon %g", err, tb.Choices(), tb.Epsilon())
	}
}

// TestFailoverFillsEmptiest: a failed node's tunnels go where there is
// room. An added node, still empty, takes the displaced tunnels until it is
// level with the others; with d = 1 it takes what its rank and the load
// bound send it.
func TestFailoverFillsEmptiest(t *testing.T) {
	got := map[int]int{}
	for _, d := range []int{0, 1} {
		tb := fourNodes(t, d, 2000, 4)
		if _, err := tb.Apply([]Change{{Kind: PutNode, Node: &Node{Name: "new", Addr: addr("172.16.0.99")}}}); err != nil {
			t.Fatal(err)
		}
		before := owners(tb)
		p, err := tb.PlanNodeState("n0", NodeDown)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := tb.Apply(p.Batch()); err != nil {
			t.Fatal(err)
		}
		assertMoved(t, before, owners(tb), func(id string) bool { return before[id] == "n0" })
		got[d] = tb.Counts()["new"]
		if d == 0 {
			// 2,000 tunnels over 4 nodes: about 500 displaced, and 500 is
			// the level of the other three.
			c := tb.Counts()
			for _, n := range []string{"n1", "n2", "n3", "new"} {
				if c[n] < 490 || c[n] > 510 {
					t.Errorf("after the failure node %s holds %d; want all four near 500: %v", n, c[n], c)
				}
			}
		}
	}
	t.Logf("displaced tunnels taken by the empty node: %d with d = all, %d with d = 1", got[0], got[1])
	// With d = 1 only the load bound sends it more than its rank's share.
	if got[1] >= got[0]-100 {
		t.Errorf("the empty node took %d displaced tunnels with d = all, %d with d = 1", got[0], got[1])
	}
}
