package director

import (
	"net/netip"
	"testing"

	"github.com/tunneldirector/tunneldirector/affinity"
)

// TestMoveReasons classifies the reasons the planners really write (from
// real plans, so a change of wording shows here) into the bounded labels
// of tunneldirector_table_moves_total.
func TestMoveReasons(t *testing.T) {
	newTable := func() *affinity.Table {
		tb, err := affinity.New(affinity.Options{})
		if err != nil {
			t.Fatal(err)
		}
		var batch []affinity.Change
		for i, n := range []string{"a", "b", "c"} {
			batch = append(batch, affinity.Change{Kind: affinity.PutNode, Node: &affinity.Node{Name: n, Addr: netip.AddrFrom4([4]byte{172, 16, 0, byte(i + 1)})}})
		}
		for i := 0; i < 60; i++ {
			batch = append(batch, affinity.Change{Kind: affinity.PutTunnel, Tunnel: &affinity.Tunnel{ID: "t" + itoa(i),
				Peer: netip.AddrFrom4([4]byte{100, 64, 0, byte(i + 1)}), Subnets: []netip.Prefix{netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 0, byte(i), 0}), 24)}}})
		}
		if _, err := tb.Apply(batch); err != nil {
			t.Fatal(err)
		}
		return tb
	}
	first := func(p *affinity.Plan, err error) string {
		t.Helper()
		if err != nil || len(p.Moves) == 0 {
			t.Fatalf("plan: %v, %d moves", err, len(p.Moves))
		}
		return p.Moves[0].Reason
	}
	tb := newTable()
	down := first(tb.PlanNodeState("a", affinity.NodeDown))
	removed := first(tb.PlanRemoveNode("b"))
	if _, err := tb.Apply([]affinity.Change{{Kind: affinity.PutNode, Node: func() *affinity.Node { n, _ := tb.Node("c"); n.State = affinity.NodeDraining; return &n }()}}); err != nil {
		t.Fatal(err)
	}
	drain := tb.Rebalance(10)
	for _, tc := range []struct{ reason, want string }{
		{down, "node_down"},
		{removed, "node_removed"},
		{first(drain, nil), "rebalance"},
		{"import tunnels.csv", "import"},
		{"snapshot", "replication"},
		{"learned from first packet", "other"},
	} {
		if got := moveReason(tc.reason); got != tc.want {
			t.Errorf("moveReason(%q) = %s, want %s", tc.reason, got, tc.want)
		}
	}
}
