package director

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"path/filepath"
	"slices"
	"testing"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/ipvs"
	"github.com/tunneldirector/tunneldirector/ipvs/ipvstest"
	"github.com/tunneldirector/tunneldirector/store"
)

// TestReconcileFollowsTheChangeLog: the reconciler reads its own cursor on
// the store's change log. Batches it keeps up with become deltas; when it
// falls further behind than the log reaches (or reads batches back from
// the journal, which lack the records they replaced) it syncs the whole
// table instead, and the kernel still ends equal to the table.
func TestReconcileFollowsTheChangeLog(t *testing.T) {
	for _, tc := range []struct {
		name          string
		ring, journal int
		wantFull      bool
	}{
		{"in the ring", 1000, 1000, false},
		{"behind the ring, in the journal", 10, 1000, true},
		{"behind the journal", 10, 10, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st, err := store.Open(store.Options{Path: filepath.Join(t.TempDir(), "td.db"), RingChanges: tc.ring, JournalChanges: tc.journal})
			if err != nil {
				t.Fatal(err)
			}
			defer st.Close()
			cfg := DefaultConfig()
			cfg.VIPs = []netip.Addr{netip.MustParseAddr("198.51.100.10")}
			cfg.Nodes = []NodeConfig{{Name: "vpn-a", Address: netip.MustParseAddr("172.16.0.1")}, {Name: "vpn-b", Address: netip.MustParseAddr("172.16.0.2")}}
			k := ipvstest.NewFake(ipvs.ModeRouteOnly)
			d, err := NewDaemon(DaemonOptions{Config: &cfg, Store: st, Dataplane: k, Logger: slog.New(slog.DiscardHandler)})
			if err != nil {
				t.Fatal(err)
			}
			ctx := context.Background()
			if err := d.syncAll(ctx, "start"); err != nil {
				t.Fatal(err)
			}
			for b := range 5 {
				var cs []affinity.Change
				for i := range 10 {
					n := b*10 + i
					cs = append(cs, affinity.Change{Kind: affinity.PutTunnel, Tunnel: &affinity.Tunnel{
						ID: fmt.Sprintf("t%d", n), Peer: netip.AddrFrom4([4]byte{100, 64, 0, byte(n + 1)}),
						Subnets: []netip.Prefix{netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 0, byte(n), 0}), 24)}}})
				}
				if _, err := st.Commit(cs); err != nil {
					t.Fatal(err)
				}
			}
			syncs := countOps(k, "Sync")
			d.reconcile(ctx)
			if !kernelEquals(k, st.Table()) {
				t.Fatal("kernel differs from the table after reconcile")
			}
			if full := countOps(k, "Sync") > syncs; full != tc.wantFull {
				t.Errorf("full sync %v (syncs %d, updates %d), want %v", full, countOps(k, "Sync")-syncs, countOps(k, "Update"), tc.wantFull)
			}
			// Afterwards the cursor keeps up again: a delta.
			syncs = countOps(k, "Sync")
			if _, err := st.Commit([]affinity.Change{{Kind: affinity.DeleteTunnel, Name: "t49"}}); err != nil {
				t.Fatal(err)
			}
			d.reconcile(ctx)
			if !kernelEquals(k, st.Table()) || countOps(k, "Sync") != syncs {
				t.Errorf("after catching up: equal %v, %d more full syncs", kernelEquals(k, st.Table()), countOps(k, "Sync")-syncs)
			}
		})
	}
}

// TestReconcileNodeDownIsADelta: a node going down reaches the kernel as
// one Update carrying the moved tunnels' elements and the new nodes, not
// as a full sync, and the kernel ends equal to the table (nodes included).
func TestReconcileNodeDownIsADelta(t *testing.T) {
	st, cfg := testStore(t, 3)
	cfg.Health = DefaultConfig().Health // as this test has always run
	k := ipvstest.NewFake(ipvs.ModeRouteOnly)
	d, err := NewDaemon(DaemonOptions{Config: cfg, Store: st, Dataplane: k, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	var cs []affinity.Change
	for n := range 60 {
		cs = append(cs, affinity.Change{Kind: affinity.PutTunnel, Tunnel: &affinity.Tunnel{
			ID: fmt.Sprintf("t%d", n), Peer: netip.AddrFrom4([4]byte{100, 64, 0, byte(n + 1)}),
			Subnets: []netip.Prefix{netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 0, byte(n), 0}), 24)}}})
	}
	if _, err := st.Commit(cs); err != nil {
		t.Fatal(err)
	}
	if err := d.syncAll(ctx, "start"); err != nil {
		t.Fatal(err)
	}
	onA := len(st.Table().TunnelsOfNode("vpn-a"))
	if onA == 0 {
		t.Fatal("no tunnel on vpn-a to move")
	}
	syncs, updates := countOps(k, "Sync"), countOps(k, "Update")
	if _, err := st.Do(func(t *affinity.Table) ([]affinity.Change, error) {
		p, err := t.PlanNodeState("vpn-a", affinity.NodeDown)
		if err != nil {
			return nil, err
		}
		return p.Batch(), nil
	}); err != nil {
		t.Fatal(err)
	}
	d.reconcile(ctx)
	if countOps(k, "Sync") != syncs || countOps(k, "Update") != updates+1 {
		t.Fatalf("node down: %d syncs, %d updates, want 0 and 1", countOps(k, "Sync")-syncs, countOps(k, "Update")-updates)
	}
	calls := k.Calls()
	dl := calls[len(calls)-1].Delta
	if dl == nil || len(dl.SetPeers) != onA || len(dl.SetSubnets) != onA || len(dl.DeletePeers)+len(dl.DeleteSubnets) != 0 {
		t.Fatalf("the update is not the %d moves: %+v", onA, dl)
	}
	if !kernelEquals(k, st.Table()) {
		t.Fatal("kernel maps differ from the table after the node went down")
	}
	if want := d.Desired(); !slices.Equal(k.State().Nodes, want.Nodes) {
		t.Fatalf("kernel nodes %+v, want %+v", k.State().Nodes, want.Nodes)
	}
}

// syncedDaemon is a daemon on a fresh store of three nodes and a fake
// dataplane, after its start's full sync.
func syncedDaemon(t *testing.T) (*Daemon, *store.Store, *ipvstest.Fake) {
	t.Helper()
	st, cfg := testStore(t, 3)
	k := ipvstest.NewFake(ipvs.ModeRouteOnly)
	d, err := NewDaemon(DaemonOptions{Config: cfg, Store: st, Dataplane: k, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	if err := d.syncAll(context.Background(), "start"); err != nil {
		t.Fatal(err)
	}
	return d, st, k
}

// TestReconcileBulkIsASync: a batch of bigDelta new tunnels or more that is
// half the table or more (an import into an empty table) reaches the kernel
// as a full sync, with no delta's maps beside the table; a batch of as many
// into a table more than twice its size stays a delta, and so do moves of
// the whole table (a node going down is never a full comparison).
func TestReconcileBulkIsASync(t *testing.T) {
	if testing.Short() {
		t.Skip("builds a table of 327,680 tunnels")
	}
	d, st, k := syncedDaemon(t)
	ctx := context.Background()
	// batch is bigDelta new tunnels, the i-th such batch.
	batch := func(i int) []affinity.Change {
		cs := make([]affinity.Change, 0, bigDelta)
		for n := i * bigDelta; n < (i+1)*bigDelta; n++ {
			cs = append(cs, affinity.Change{Kind: affinity.PutTunnel, Tunnel: &affinity.Tunnel{
				ID: fmt.Sprintf("t%d", n), Peer: netip.AddrFrom4([4]byte{100, 64 + byte(n>>16), byte(n >> 8), byte(n)}),
				Subnets: []netip.Prefix{netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(n >> 16), byte(n >> 8), byte(n)}), 32)}}})
		}
		return cs
	}
	for i, want := range []string{"Sync", "Sync", "Update"} {
		if i == 2 {
			// A third batch into a table of two: a third of it.
			if _, err := st.Commit(batch(3)); err != nil {
				t.Fatal(err)
			}
			if _, err := st.Commit(batch(4)); err != nil {
				t.Fatal(err)
			}
			d.reconcile(ctx)
		}
		syncs, updates := countOps(k, "Sync"), countOps(k, "Update")
		if _, err := st.Commit(batch(i)); err != nil {
			t.Fatal(err)
		}
		d.reconcile(ctx)
		got := map[bool]string{true: "Sync", false: "Update"}[countOps(k, "Sync") > syncs]
		if got != want || countOps(k, "Sync")+countOps(k, "Update") != syncs+updates+1 {
			t.Fatalf("batch %d into %d tunnels: %d syncs and %d updates, want one %s", i, st.Table().Len()-bigDelta,
				countOps(k, "Sync")-syncs, countOps(k, "Update")-updates, want)
		}
		if !kernelEquals(k, st.Table()) {
			t.Fatalf("batch %d: kernel differs from the table", i)
		}
	}
	// Every tunnel moves (pinned to the next node): all of them are
	// set, none is new.
	nodes := st.Table().Nodes()
	syncs, updates := countOps(k, "Sync"), countOps(k, "Update")
	if _, err := st.Do(func(tb *affinity.Table) ([]affinity.Change, error) {
		var cs []affinity.Change
		for _, tu := range tb.Tunnels() {
			i := slices.IndexFunc(nodes, func(n affinity.Node) bool { return n.Name == tu.Node })
			tu.Node, tu.Pinned = nodes[(i+1)%len(nodes)].Name, true
			cs = append(cs, affinity.Change{Kind: affinity.PutTunnel, Tunnel: &tu})
		}
		return cs, nil
	}); err != nil {
		t.Fatal(err)
	}
	d.reconcile(ctx)
	if countOps(k, "Sync") != syncs || countOps(k, "Update") != updates+1 || !kernelEquals(k, st.Table()) {
		t.Fatalf("moves of every tunnel: %d syncs, %d updates, kernel equal %v; want one update",
			countOps(k, "Sync")-syncs, countOps(k, "Update")-updates, kernelEquals(k, st.Table()))
	}
}

// TestReconcileDeltaKeys: a delta deletes exactly the keys a change gives
// up. A tunnel that changes its peer and one of its subnets, a second
// tunnel that takes the freed keys and is deleted again, and a plain
// move: in separate reconciles and all in one, the kernel ends equal to
// the table by deltas alone, and a move deletes nothing.
func TestReconcileDeltaKeys(t *testing.T) {
	p1, p2 := netip.MustParseAddr("100.64.0.1"), netip.MustParseAddr("100.64.0.2")
	s1, s2, s3 := netip.MustParsePrefix("10.0.1.0/24"), netip.MustParsePrefix("10.0.2.0/24"), netip.MustParsePrefix("10.0.3.0/24")
	put := func(id, node string, peer netip.Addr, subnets ...netip.Prefix) affinity.Change {
		return affinity.Change{Kind: affinity.PutTunnel, Tunnel: &affinity.Tunnel{ID: id, Peer: peer, Subnets: subnets, Node: node, Pinned: true}}
	}
	steps := [][]affinity.Change{
		{put("t1", "vpn-a", p1, s1, s2)},
		{put("t1", "vpn-a", p2, s2, s3)}, // p1 and s1 given up
		{put("t2", "vpn-b", p1, s1)},     // and taken by another tunnel
		{{Kind: affinity.DeleteTunnel, Name: "t2"}},
		{put("t1", "vpn-c", p2, s2, s3)}, // a move
	}
	for _, together := range []bool{false, true} {
		t.Run(fmt.Sprintf("together=%v", together), func(t *testing.T) {
			d, st, k := syncedDaemon(t)
			ctx := context.Background()
			syncs := countOps(k, "Sync")
			for i, cs := range steps {
				if _, err := st.Commit(cs); err != nil {
					t.Fatalf("step %d: %v", i, err)
				}
				if together && i < len(steps)-1 {
					continue
				}
				d.reconcile(ctx)
				if !kernelEquals(k, st.Table()) {
					t.Fatalf("step %d: kernel differs from the table", i)
				}
			}
			if n := countOps(k, "Sync") - syncs; n != 0 {
				t.Errorf("%d full syncs, want deltas only", n)
			}
			if !together {
				calls := k.Calls()
				if dl := calls[len(calls)-1].Delta; dl == nil || len(dl.SetPeers) != 1 || len(dl.SetSubnets) != 2 || len(dl.DeletePeers)+len(dl.DeleteSubnets) != 0 {
					t.Errorf("the move's delta is not one peer and two subnets set, nothing deleted: %+v", dl)
				}
			}
		})
	}
}
