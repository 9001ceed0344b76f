package director

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/director/health"
	"github.com/tunneldirector/tunneldirector/director/replication"
	"github.com/tunneldirector/tunneldirector/internal/cputime"
	"github.com/tunneldirector/tunneldirector/ipvs"
	"github.com/tunneldirector/tunneldirector/ipvs/ipvstest"
	"github.com/tunneldirector/tunneldirector/store"
)

// importTunnels imports n tunnels the scheduler places.
func importTunnels(t *testing.T, d *Daemon, n int) {
	t.Helper()
	var b strings.Builder
	b.WriteString("id,peer,subnets\n")
	for i := range n {
		fmt.Fprintf(&b, "t%04d,100.64.%d.%d,10.%d.%d.0/27\n", i, i/250, i%250+1, i/8, i%8*32)
	}
	if _, err := d.Service().Import(strings.NewReader(b.String()), ImportRequest{Name: "t.csv"}); err != nil {
		t.Fatal(err)
	}
}

func downDecision(node string, at time.Time) health.Decision {
	reason := "health: ike: timeout (4 requests, no answer) 2/2"
	return health.Decision{Node: node, State: affinity.NodeDown, Reason: reason, At: at,
		Record: health.Record{Down: true, Since: at, Reason: reason, Downs: []time.Time{at}}}
}

// TestHealthDecisionIsNodeDown: a health down commits exactly what the
// operator's `node down` would (the same tunnels to the same nodes, the
// others untouched) in one revision, with the checks' reason in every
// change and the record stored with the node; the kernel follows. A
// health up moves nothing back.
func TestHealthDecisionIsNodeDown(t *testing.T) {
	d, k, st, _ := startDaemon(t)
	importTunnels(t, d, 300)
	eventually(t, "the import in the kernel", func() bool { return kernelEquals(k, st.Table()) })
	before := st.Table().Snapshot()
	want, err := st.Table().PlanNodeState("vpn-b", affinity.NodeDown)
	if err != nil || len(want.Moves) == 0 {
		t.Fatalf("operator's plan: %v, %d moves", err, len(want.Moves))
	}
	cur, err := st.Changes(st.Revision())
	if err != nil {
		t.Fatal(err)
	}
	defer cur.Close()

	at := time.Date(2026, 12, 1, 12, 0, 0, 0, time.Local)
	dec := downDecision("vpn-b", at)
	if err := d.Apply(dec); err != nil {
		t.Fatal(err)
	}
	// The master's unknown-peer buckets follow in revisions of their own
	// (bucket changes only): the decision is the one other batch.
	all, err := store.ReadAll(cur)
	if err != nil {
		t.Fatal(err)
	}
	var batches []store.Batch
	for _, b := range all {
		if slices.ContainsFunc(b.Changes, func(c affinity.Change) bool { return c.Kind != affinity.PutBucket }) {
			batches = append(batches, b)
		}
	}
	if len(batches) != 1 {
		t.Fatalf("the decision took %d revisions, want one", len(batches))
	}
	b := batches[0]
	if len(b.Changes) != len(want.Moves)+1 {
		t.Fatalf("%d changes, want %d moves and the node", len(b.Changes), len(want.Moves))
	}
	for _, c := range b.Changes {
		if !strings.Contains(c.Reason, "node vpn-b down (health: ike: timeout") {
			t.Fatalf("change without the checks' reason: %q", c.Reason)
		}
	}
	tab := st.Table()
	for _, m := range want.Moves {
		if tu, _ := tab.Tunnel(m.Tunnel); tu.Node != m.To {
			t.Fatalf("tunnel %s went to %s, node down sends it to %s", m.Tunnel, tu.Node, m.To)
		}
	}
	for _, tu := range before.Tunnels {
		if now, _ := tab.Tunnel(tu.ID); tu.Node != "vpn-b" && now.Node != tu.Node {
			t.Fatalf("tunnel %s of %s moved to %s", tu.ID, tu.Node, now.Node)
		}
	}
	n, _ := tab.Node("vpn-b")
	if n.State != affinity.NodeDown || !n.Health.Down || !n.Health.Since.Equal(at) || n.Health.Reason != dec.Reason {
		t.Fatalf("node after the decision: %+v", n)
	}
	eventually(t, "the moves in the kernel", func() bool { return kernelEquals(k, st.Table()) })
	s := d.Status()
	if s.HealthDowns != 1 || s.HealthMoves != len(want.Moves) || s.Health == nil {
		t.Fatalf("status counters: downs %d moves %d (want 1, %d)", s.HealthDowns, s.HealthMoves, len(want.Moves))
	}
	res, _ := d.Service().Nodes()
	for _, ni := range res.Nodes {
		if ni.Name == "vpn-b" && !strings.HasPrefix(ni.HealthSummary, "down since") {
			t.Fatalf("HEALTH of vpn-b: %q", ni.HealthSummary)
		}
	}

	// Up: the node is active again, nothing moves back, the history
	// stays for flap damping.
	rec := n.Health
	rec.Down, rec.Since, rec.Reason = false, at.Add(time.Minute), ""
	snap := st.Table().Snapshot()
	if err := d.Apply(health.Decision{Node: "vpn-b", State: affinity.NodeActive, Reason: "health: passing 2/2", Record: rec}); err != nil {
		t.Fatal(err)
	}
	n, _ = st.Table().Node("vpn-b")
	if n.State != affinity.NodeActive || n.Health.Down || len(n.Health.Downs) != 1 {
		t.Fatalf("node after up: %+v", n)
	}
	if got := st.Table().Counts()["vpn-b"]; got != 0 {
		t.Fatalf("%d tunnels moved back to vpn-b", got)
	}
	if len(st.Table().Snapshot().Tunnels) != len(snap.Tunnels) || d.Status().HealthUps != 1 {
		t.Fatal("up changed tunnels or was not counted")
	}
}

// TestHealthOperatorWins: a decision about a node the operator changed
// meanwhile is refused and changes nothing; the operator's `node up`
// clears health's record, hold included.
func TestHealthOperatorWins(t *testing.T) {
	d, _, st, _ := startDaemon(t)
	importTunnels(t, d, 30)
	svc := d.Service()
	if _, err := svc.NodeAction(NodeRequest{Action: "drain", Name: "vpn-a"}); err != nil {
		t.Fatal(err)
	}
	if _, err := svc.NodeAction(NodeRequest{Action: "down", Name: "vpn-c"}); err != nil {
		t.Fatal(err)
	}
	// The nodes and tunnels, not the revision: the master's unknown-peer
	// buckets follow the drain and the down in revisions of their own.
	before := st.Table().Snapshot()
	now := time.Now()
	for _, dec := range []health.Decision{
		downDecision("vpn-a", now), // drained by hand
		downDecision("vpn-c", now), // already down by hand
		{Node: "vpn-c", State: affinity.NodeActive, Reason: "health: passing 2/2"}, // down by hand: not health's to bring up
		downDecision("nope", now),
	} {
		err := d.Apply(dec)
		if err == nil {
			t.Fatalf("%s applied", dec)
		}
		if dec.Node != "nope" && !errors.Is(err, errStale) {
			t.Fatalf("%s: %v", dec, err)
		}
	}
	after := st.Table().Snapshot()
	if !slices.EqualFunc(before.Nodes, after.Nodes, func(a, b affinity.Node) bool { return a.Equal(&b) }) ||
		!slices.EqualFunc(before.Tunnels, after.Tunnels, func(a, b affinity.Tunnel) bool { return a.ID == b.ID && a.Node == b.Node }) {
		t.Fatal("a refused decision changed the table")
	}
	if _, err := svc.NodeAction(NodeRequest{Action: "undrain", Name: "vpn-a"}); err != nil {
		t.Fatal(err)
	}
	held := downDecision("vpn-a", now)
	held.Record.HoldUntil, held.Record.Holds = now.Add(time.Hour), 1
	if err := d.Apply(held); err != nil {
		t.Fatal(err)
	}
	res, _ := svc.Nodes()
	if ni := res.Nodes[0]; ni.Name != "vpn-a" || !strings.HasPrefix(ni.HealthSummary, "held down until") {
		t.Fatalf("HEALTH of a held node: %+v", ni)
	}
	if _, err := svc.NodeAction(NodeRequest{Action: "up", Name: "vpn-a"}); err != nil {
		t.Fatal(err)
	}
	if n, _ := st.Table().Node("vpn-a"); n.State != affinity.NodeActive || !n.Health.IsZero() {
		t.Fatalf("after the operator's up: %+v", n)
	}
	// The monitor follows the table: its view has the operator's state
	// and an empty record.
	eventually(t, "the health view of vpn-a", func() bool {
		hs := d.HealthStatus()
		v, ok := hs.Node("vpn-a")
		return ok && v.State == affinity.NodeActive && v.Record.IsZero()
	})
	hs := d.HealthStatus()
	if v, _ := hs.Node("vpn-c"); !v.Operator {
		t.Fatalf("vpn-c down by hand is not shown as the operator's: %+v", v)
	}
}

// TestHealthOnBackup: the backup refuses decisions (it takes the master's
// by replication), and the master's record (a hold) reaches the backup's
// table and its checks' view, so a new master continues it.
func TestHealthOnBackup(t *testing.T) {
	lo := netip.MustParseAddrPort("127.0.0.1:0")
	u0, err := replication.ListenUDP(replication.UDPConfig{Local: lo, Peer: netip.MustParseAddrPort("127.0.0.1:9")})
	if err != nil {
		t.Fatal(err)
	}
	u1, err := replication.ListenUDP(replication.UDPConfig{Local: lo, Peer: u0.LocalAddr()})
	if err != nil {
		t.Fatal(err)
	}
	u0.SetPeer(u1.LocalAddr())
	t.Cleanup(func() { u0.Close(); u1.Close() })
	key := []byte(strings.Repeat("k", 32))
	pair := func(id uint32, tr replication.Transport, role replication.Role) func(*DaemonOptions) {
		return func(o *DaemonOptions) {
			r, err := replication.New(replication.Config{ID: id, Key: key, Store: o.Store.(*store.Store), Transport: tr})
			if err != nil {
				t.Fatal(err)
			}
			r.SetRole(role)
			o.Replicator = r
		}
	}
	master, _, mst, _ := startDaemonOpts(t, ipvstest.NewFake(ipvs.ModeRouteOnly), pair(1, u0, replication.RoleMaster))
	backup, _, bst, _ := startDaemonOpts(t, ipvstest.NewFake(ipvs.ModeRouteOnly), pair(2, u1, replication.RoleBackup))
	importTunnels(t, master, 60)
	eventually(t, "the backup in sync", func() bool { return bst.Revision() == mst.Revision() && backup.Ready() })

	now := time.Now()
	dec := downDecision("vpn-b", now)
	if err := backup.Apply(dec); !errors.Is(err, ErrNotMaster) {
		t.Fatalf("backup applied a decision: %v", err)
	}
	dec.Record.HoldUntil, dec.Record.Holds = now.Add(time.Hour), 1
	if err := master.Apply(dec); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the decision on the backup", func() bool {
		n, _ := bst.Table().Node("vpn-b")
		return n.State == affinity.NodeDown && n.Health.HoldUntil.Equal(dec.Record.HoldUntil)
	})
	eventually(t, "the hold in the backup's checks", func() bool {
		hs := backup.HealthStatus()
		v, ok := hs.Node("vpn-b")
		return ok && v.Record.Down && v.Record.HoldUntil.Equal(dec.Record.HoldUntil)
	})
	if m, b := mst.Table().Snapshot(), bst.Table().Snapshot(); !sameNodes(m.Nodes, b.Nodes) {
		t.Fatalf("nodes differ:\n%+v\n%+v", m.Nodes, b.Nodes)
	}
	// Takeover: the new master decides, and the checks know it.
	if err := backup.SetRole(replication.RoleMaster); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the new master's checks", func() bool { return backup.HealthStatus().Master })
}

func sameNodes(a, b []affinity.Node) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if !a[i].Equal(&b[i]) {
			return false
		}
	}
	return true
}

// BenchmarkHealthApply is the store side of a health down: plan and
// commit moving 10,000 tunnels of a dead node (40,000 in the table):
//
//	go test -run '^$' -bench HealthApply ./director/
func BenchmarkHealthApply(b *testing.B) {
	const nodes, perNode = 4, 10_000
	st, err := store.Open(store.Options{Path: filepath.Join(b.TempDir(), "td.db")})
	if err != nil {
		b.Fatal(err)
	}
	defer st.Close()
	var csv strings.Builder
	csv.WriteString("id,peer,subnets,node\n")
	for i := range nodes * perNode {
		fmt.Fprintf(&csv, "t%05d,100.%d.%d.%d,10.%d.%d.%d/27,node%d\n", i, 64+i>>16, i>>8&255, i&255,
			i>>11, i>>3&255, i&7*32, i%nodes)
	}
	cfg := DefaultConfig()
	cfg.VIPs = []netip.Addr{netip.MustParseAddr("198.51.100.10")}
	cfg.Health.Enabled = false
	for i := range nodes {
		cfg.Nodes = append(cfg.Nodes, NodeConfig{Name: fmt.Sprintf("node%d", i), Address: netip.AddrFrom4([4]byte{172, 16, 0, byte(i + 1)})})
	}
	d, err := NewDaemon(DaemonOptions{Config: &cfg, Store: st, Dataplane: ipvstest.NewFake(ipvs.ModeRouteOnly), Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		b.Fatal(err)
	}
	d.openStartGate() // the benchmark changes the table without Run
	imp := func() {
		if _, err := d.Service().Import(strings.NewReader(csv.String()), ImportRequest{Name: "farm.csv"}); err != nil {
			b.Fatal(err)
		}
	}
	imp()
	var cpu time.Duration
	b.ResetTimer()
	for i := range b.N {
		v := fmt.Sprintf("node%d", i%nodes)
		c0 := cputime.Process()
		if err := d.Apply(downDecision(v, time.Now())); err != nil {
			b.Fatal(err)
		}
		cpu += cputime.Process() - c0
		b.StopTimer()
		if _, err := d.Service().NodeAction(NodeRequest{Action: "up", Name: v}); err != nil {
			b.Fatal(err)
		}
		imp()
		b.StartTimer()
	}
	// CPU time (user and sys, GC included) beside the wall time: the
	// machine is shared, wall time mostly measures the other work.
	b.ReportMetric(float64(cpu.Microseconds())/1000/float64(b.N), "cpu-ms/op")
}
