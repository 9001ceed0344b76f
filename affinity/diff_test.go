package affinity

import (
	"net/netip"
	"testing"
)

// TestDiffTo: the changes DiffTo returns make a diverged table equal to a
// snapshot, records and revision included, whatever the two held: a node
// set down that still owns tunnels, a node whose mark and address changed,
// a peer and a subnet that moved to another tunnel.
func TestDiffTo(t *testing.T) {
	master := newTable(t, 3)
	replica := newTable(t, 3)
	mustApply := func(tb *Table, cs ...Change) {
		t.Helper()
		if _, err := tb.Apply(cs); err != nil {
			t.Fatal(err)
		}
	}
	mustApply(master, put("a", "192.0.2.1", "n1", "10.0.1.0/24"), put("b", "192.0.2.2", "n2", "10.0.2.0/24"),
		put("c", "192.0.2.3", "n0", "10.0.3.0/24"))
	mustApply(replica, put("a", "192.0.2.9", "n1", "10.0.2.0/24"), put("x", "192.0.2.2", "n1", "10.0.9.0/24"))
	// A node set down directly (a node import) keeps its tunnels.
	n2, _ := master.Node("n2")
	n2.State = NodeDown
	mustApply(master, Change{Kind: PutNode, Node: &n2})
	// The replica knows n0 under another address.
	n0, _ := replica.Node("n0")
	mustApply(replica, Change{Kind: DeleteNode, Name: "n0"})
	n0.Mark, n0.Addr = 0, netip.MustParseAddr("172.16.9.9")
	mustApply(replica, Change{Kind: PutNode, Node: &n0})

	snap := master.Snapshot()
	ops := replica.DiffTo(&snap, nil)
	if _, err := replica.ApplyReset(snap.Revision, ops); err != nil {
		t.Fatalf("apply the diff: %v\n%+v", err, ops)
	}
	assertSameSnapshot(t, snap, replica.Snapshot())
	if again := replica.DiffTo(&snap, nil); len(again) != 0 {
		t.Errorf("equal tables still differ by %d changes: %+v", len(again), again)
	}

	// A partial diff leaves the tunnels outside its scope alone.
	mustApply(replica, put("z", "192.0.2.26", "n1", "10.0.26.0/24"))
	mustApply(master, put("c", "192.0.2.3", "n1", "10.0.3.0/24"))
	snap = master.Snapshot()
	part := snap
	part.Tunnels = nil
	for _, tu := range snap.Tunnels {
		if tu.ID == "c" {
			part.Tunnels = append(part.Tunnels, tu)
		}
	}
	ops = replica.DiffTo(&part, func(id string) bool { return id == "c" })
	if _, err := replica.ApplyReset(snap.Revision, ops); err != nil {
		t.Fatal(err)
	}
	if c, _ := replica.Tunnel("c"); c.Node != "n1" {
		t.Errorf("tunnel c on %s after a partial diff, want n1", c.Node)
	}
	if _, ok := replica.Tunnel("z"); !ok {
		t.Error("a partial diff removed a tunnel outside its scope")
	}
}
