package director

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"path/filepath"
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
