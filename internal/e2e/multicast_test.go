package e2e

import (
	"context"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/internal/netlab"
	"github.com/tunneldirector/tunneldirector/ipvs/conntrack"
)

// TestMulticastPair runs the pair's replication over a multicast group on
// the sync link (replication.multicast), as conntrackd and the IPVS sync
// daemon are often run: the table reaches the backup's store and kernel,
// the conntrack stream its cache, and each director ignores its own
// datagrams looped back by the group.
func TestMulticastPair(t *testing.T) {
	netlab.RequireRoot(t)
	top := netlab.BuildTopology(t, netlab.TopologyOptions{Peers: 1, Directors: 2, Nodes: 2})
	dir := t.TempDir()
	ds := startPairWith(t, top, dir, pairOptions{group: netip.MustParseAddrPort("239.255.77.1:7788")}, "master", "backup")
	waitPairAPI(t, ds)
	csv := filepath.Join(dir, "t.csv")
	os.WriteFile(csv, []byte("id,peer,subnets,node\nsite-1,192.0.2.200,10.80.0.0/16,node0\nsite-2,192.0.2.201,10.81.0.0/16,node1\n"), 0o600)
	if out, err := ds[0].cli(t, "import", csv); err != nil {
		t.Fatalf("import: %v %s", err, out)
	}
	rev := ds[0].status(t).Revision
	waitPair(t, ds, "the backup's table and kernel at the master's revision over multicast", 20*time.Second, func() bool {
		s := ds[1].status(t)
		return s.Revision == rev && s.KernelRevision == rev && s.Replication.Ready
	})
	mp, ms := ds[0].kernelMaps(t)
	bp, bs := ds[1].kernelMaps(t)
	if len(mp) != 2 || !maps.Equal(mp, bp) || !maps.Equal(ms, bs) {
		t.Fatalf("kernels differ: %v %v / %v %v", mp, ms, bp, bs)
	}
	k := kernelOf(t, top.Directors[0])
	if _, err := k.Commit(context.Background(), ctFlows(top.Target.If(netlab.IfTarget).Addr4, 0, 2000), conntrack.CommitOptions{}); err != nil {
		t.Fatal(err)
	}
	waitPair(t, ds, "the backup's conntrack cache over multicast", 20*time.Second, func() bool { return ds[1].status(t).Conntrack.Cached == 2000 })
	for _, d := range ds {
		r := d.status(t).Replication
		if r.Peer.ID == 0 || r.Peer.ID == r.ID || r.Counters.AuthFailures+r.Counters.Malformed+r.Counters.Replays != 0 {
			t.Fatalf("%s over multicast: peer %+v, counters %+v", d.host.Name, r.Peer, r.Counters)
		}
	}
}
