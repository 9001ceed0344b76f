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
