package director

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/director/replication"
	"github.com/tunneldirector/tunneldirector/internal/clock"
	"github.com/tunneldirector/tunneldirector/ipvs"
	"github.com/tunneldirector/tunneldirector/ipvs/ipvstest"
	"github.com/tunneldirector/tunneldirector/store"
	"github.com/tunneldirector/tunneldirector/store/etcdstore"
)

// bucketDaemon runs a daemon on a manual clock with 256 buckets (a
// balancing step may move them all) over a fake kernel; prep runs on the
// store before the daemon starts.
type bucketDaemon struct {
	d   *Daemon
	k   *ipvstest.Fake
	st  *store.Store
	clk *clock.Manual
	cfg *Config
}

func startBucketDaemon(t *testing.T, repl func(*store.Store) *replication.Replicator, prep func(*store.Store)) *bucketDaemon {
	t.Helper()
	return startBucketDaemonOn(t, repl, prep, nil)
}

// startBucketDaemonOn is startBucketDaemon with the daemon's store wrapped
// (nil: the bbolt store itself).
func startBucketDaemonOn(t *testing.T, repl func(*store.Store) *replication.Replicator, prep func(*store.Store), wrap func(*store.Store) store.Backend) *bucketDaemon {
	t.Helper()
	st, cfg := testStore(t, 3)
	// These tests have always run with the default health settings
	// (testStore turns the checks off).
	cfg.Health = DefaultConfig().Health
	cfg.UnknownPeers = UnknownPeersConfig{Buckets: 256, MaxChanges: 256}
	if prep != nil {
		prep(st)
	}
	b := &bucketDaemon{k: ipvstest.NewFake(ipvs.ModeRouteOnly), st: st, clk: clock.NewManual(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)), cfg: cfg}
	o := DaemonOptions{Config: cfg, Store: st, Dataplane: b.k, Logger: slog.New(slog.DiscardHandler), Clock: b.clk}
	if wrap != nil {
		o.Store = wrap(st)
	}
	if repl != nil {
		o.Replicator = repl(st)
	}
	d, err := NewDaemon(o)
	if err != nil {
		t.Fatal(err)
	}
	b.d = d
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { b.d.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	eventually(t, "the first sync", func() bool { return countOps(b.k, "Sync") > 0 })
	return b
}

// perNode counts the table's buckets by node name.
func (b *bucketDaemon) perNode() map[string]int {
	out := map[string]int{}
	for _, m := range b.st.Table().Buckets() {
		n, _ := b.st.Table().NodeByMark(m)
		out[n.Name]++
	}
	return out
}

// inKernel reports whether the fake kernel holds the table's buckets.
func (b *bucketDaemon) inKernel() bool {
	s := b.k.State()
	return s != nil && slices.Equal(s.Buckets, b.st.Table().Buckets()) && b.d.Status().KernelRevision == b.st.Revision()
}

// tick advances the clock by one bucket interval and waits until the
// daemon has taken it (a status round trip through its loop is not
// available, so wait for the kernel to hold the table).
func (b *bucketDaemon) tick(t *testing.T) {
	t.Helper()
	b.clk.Advance(affinity.DefaultBucketInterval)
	time.Sleep(20 * time.Millisecond)
	eventually(t, "the kernel to follow the table", b.inKernel)
}

// addrIn returns an address the kernel hashes into a bucket whose node
// is mark, and its bucket, searching from the 198.18.0.0/15 range.
func addrIn(t *testing.T, seed uint32, buckets []uint16, mark uint16, below int) (netip.Addr, int) {
	t.Helper()
	for i := range 1 << 16 {
		a := netip.AddrFrom4([4]byte{198, 18, byte(i >> 8), byte(i)})
		if bk := ipvs.Bucket(a, seed, len(buckets)); buckets[bk] == mark && bk < below {
			return a, bk
		}
	}
	t.Fatalf("no address hashes into a bucket of mark %d below %d", mark, below)
	return netip.Addr{}, 0
}

// TestDaemonBucketsFollowLoad: the master assigns every bucket before the
// first sync; when the loads change, a step moves buckets to the emptiest
// node, the kernel takes them by delta (one Update, no Sync), and new
// unknown peers then mostly land there; a peer pinned on a node keeps it
// whatever its bucket does.
func TestDaemonBucketsFollowLoad(t *testing.T) {
	b := startBucketDaemon(t, nil, nil)
	if first := b.k.Calls()[0]; first.Op != "Sync" || len(first.Sync.Buckets) != 256 {
		t.Fatalf("first kernel call %s with %d buckets: want a sync with all 256", first.Op, len(first.Sync.Buckets))
	}
	even := b.perNode()
	if len(even) != 3 || even["vpn-a"] < 80 || even["vpn-c"] < 80 {
		t.Fatalf("buckets of an empty farm: %v", even)
	}
	pinned := netip.MustParseAddr("192.0.2.200")
	var csv strings.Builder
	csv.WriteString("id,peer,subnets,node\n")
	fmt.Fprintf(&csv, "pinned,%s,10.255.0.0/24,vpn-a\n", pinned)
	for i := range 300 {
		node := "vpn-a"
		if i%3 == 0 {
			node = "vpn-b"
		}
		fmt.Fprintf(&csv, "t%d,100.64.%d.%d,10.%d.%d.0/24,%s\n", i, i/250, i%250+1, i/250, i%250, node)
	}
	if _, err := b.d.Service().Import(strings.NewReader(csv.String()), ImportRequest{Name: "load.csv"}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the import in the kernel", b.inKernel)
	syncs := countOps(b.k, "Sync")
	b.tick(t)
	after := b.perNode()
	if after["vpn-c"] <= even["vpn-c"] || after["vpn-a"] >= even["vpn-a"] || after["vpn-c"] < after["vpn-a"]+after["vpn-b"] {
		t.Fatalf("buckets %v after vpn-a took 201 and vpn-b 100 tunnels, vpn-c none (before %v)", after, even)
	}
	if countOps(b.k, "Sync") != syncs {
		t.Fatal("a bucket step went through a full sync, not a delta")
	}
	var moved bool
	for _, c := range b.k.Calls() {
		moved = moved || c.Op == "Update" && len(c.Delta.Buckets) > 0
	}
	if !moved {
		t.Fatal("no Update carried bucket changes")
	}
	land := map[uint16]int{}
	for i := range 3000 {
		land[ipvs.BucketPick(netip.AddrFrom4([4]byte{100, 100, byte(i >> 8), byte(i)}), b.cfg.HashSeed, b.st.Table().Buckets())]++
	}
	if land[3] < 1500 {
		t.Fatalf("new unknown peers by node mark %v: want most on vpn-c (mark 3)", land)
	}
	// The pinned peer's bucket moved away from vpn-a or not: it stays.
	if m, _ := b.k.State().Peers[pinned]; m != 1 {
		t.Fatalf("pinned peer at mark %d in the kernel", m)
	}
	t.Logf("buckets %v -> %v; 3000 new unknown peers by mark: %v", even, after, land)
}

// TestDaemonBucketsKeepPinWindow: a bucket in which the learner saw an
// unpinned first packet keeps its node while its node drains (quiet
// window), the others of that node move at once; after the quiet window
// it moves too. A peer the learner pins goes where its packet's mark says.
func TestDaemonBucketsKeepPinWindow(t *testing.T) {
	b := startBucketDaemon(t, nil, nil)
	noLearn := false
	b.cfg.Learn = &noLearn // the packet's bucket is recorded, the peer not pinned
	peer, bk := addrIn(t, b.cfg.HashSeed, b.st.Table().Buckets(), 1, 256)
	b.d.onFlow(ipvs.NewFlow{Src: peer, Dst: b.cfg.VIPs[0], Proto: 50, Mark: b.cfg.Dataplane().Fwmark(1)})
	if _, err := b.d.Service().NodeAction(NodeRequest{Action: "drain", Name: "vpn-a"}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "vpn-a's quiet buckets moved", func() bool { return b.perNode()["vpn-a"] == 1 })
	eventually(t, "the kernel to follow", b.inKernel)
	if got := b.st.Table().Buckets()[bk]; got != 1 {
		t.Fatalf("bucket %d of a peer waiting for its pin moved to mark %d", bk, got)
	}
	for range 4 {
		b.tick(t)
	}
	if got := b.st.Table().Buckets()[bk]; got == 1 {
		t.Fatalf("bucket %d still on the draining node after the quiet window", bk)
	}
	// Learning pins the mark the packet got, not what its bucket says now.
	learn := true
	b.cfg.Learn = &learn
	b.d.onFlow(ipvs.NewFlow{Src: peer, Dst: b.cfg.VIPs[0], Proto: 50, Mark: b.cfg.Dataplane().Fwmark(2)})
	if tu, ok := b.st.Table().LookupPeer(peer); !ok || tu.Node != "vpn-b" {
		t.Fatalf("learned %+v %v, want on vpn-b (the packet's mark)", tu, ok)
	}
}

// skewedBuckets returns every bucket on vpn-a (mark 1) and the prep that
// commits the three nodes and that assignment, with reason, to a store.
func skewedBuckets(t *testing.T, reason string) ([]uint16, func(*store.Store)) {
	skewed := make([]uint16, 256)
	for i := range skewed {
		skewed[i] = 1
	}
	return skewed, func(st *store.Store) {
		ns := []affinity.Change{}
		for i, n := range []string{"vpn-a", "vpn-b", "vpn-c"} {
			ns = append(ns, affinity.Change{Kind: affinity.PutNode, Node: &affinity.Node{Name: n, Addr: netip.AddrFrom4([4]byte{172, 16, 0, byte(i + 1)})}})
		}
		if _, err := st.Commit(append(ns, affinity.BucketChanges(nil, skewed, reason)...)); err != nil {
			t.Fatal(err)
		}
	}
}

// TestDaemonBackupNeverStepsTakeoverKeepsBuckets: a backup programs the
// table's buckets (the master's) and never steps them; the first packets
// it sees still count, so after a takeover its first step keeps the bucket
// of a peer waiting for its pin and balances the rest.
func TestDaemonBackupNeverStepsTakeoverKeepsBuckets(t *testing.T) {
	skewed, prep := skewedBuckets(t, "master") // as a master left them
	var clk *clock.Manual
	repl := func(st *store.Store) *replication.Replicator {
		clk = clock.NewManual(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
		_, ep, _ := replication.NewFakeNetwork(replication.FakeConfig{}, clk)
		r, err := replication.New(replication.Config{ID: 2, Key: []byte("0123456789abcdef0123456789abcdef"), Store: st, Transport: ep, Clock: clk})
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	b := startBucketDaemon(t, repl, prep)
	rev := b.st.Revision()
	peer, bk := addrIn(t, b.cfg.HashSeed, skewed, 1, 64)
	b.d.onFlow(ipvs.NewFlow{Src: peer, Dst: b.cfg.VIPs[0], Proto: 17, DstPort: 500, SrcPort: 500, Mark: b.cfg.Dataplane().IKEMark(1)})
	b.tick(t)
	if b.st.Revision() != rev || !slices.Equal(b.st.Table().Buckets(), skewed) {
		t.Fatalf("the backup changed its table: revision %d -> %d, buckets %v", rev, b.st.Revision(), b.perNode())
	}
	if _, ok := b.st.Table().LookupPeer(peer); ok {
		t.Fatal("the backup pinned a peer")
	}
	if err := b.d.SetRole(replication.RoleMaster); err != nil {
		t.Fatal(err)
	}
	// The takeover keeps the assignment for an interval; then it
	// balances (the peer's bucket still within its quiet window).
	time.Sleep(50 * time.Millisecond)
	if b.st.Revision() != rev {
		t.Fatalf("the takeover itself changed the table: %v", b.perNode())
	}
	b.tick(t)
	eventually(t, "the new master's first step", func() bool { return b.perNode()["vpn-b"] > 0 })
	eventually(t, "the kernel to follow", b.inKernel)
	got := b.perNode()
	if got["vpn-a"] > 100 || got["vpn-c"] < 70 {
		t.Fatalf("buckets after the takeover's step: %v", got)
	}
	if b.st.Table().Buckets()[bk] != 1 {
		t.Fatalf("bucket %d, seen by the backup in the quiet window, moved at the takeover", bk)
	}
	if s := b.d.Status().UnknownPeers; s == nil || s.Buckets != 256 || s.Steps == 0 || s.Nodes["vpn-c"] != got["vpn-c"] {
		t.Fatalf("status %+v", s)
	}
}

// sharedFake is a bbolt store posing as one shared through etcd, with the
// election in the test's hands.
type sharedFake struct {
	*store.Store
	leader atomic.Bool
}

func (f *sharedFake) Writable() error { return nil }
func (f *sharedFake) IsLeader() bool  { return f.leader.Load() }
func (f *sharedFake) Health() etcdstore.Health {
	return etcdstore.Health{Connected: true, Leader: f.leader.Load()}
}
func (f *sharedFake) RequestLearn(netip.Addr, uint16) error         { return nil }
func (f *sharedFake) OnLearnRequest(func(netip.Addr, uint16) error) {}

// TestDaemonSharedStoreOnlyElectedStepsBuckets: on a table shared by N
// directors, one that is not elected never steps the buckets (N steppers
// would fight over the assignment); elected, it goes on from the table's
// assignment for an interval, then balances.
func TestDaemonSharedStoreOnlyElectedStepsBuckets(t *testing.T) {
	skewed, prep := skewedBuckets(t, "elected")
	var sh *sharedFake
	b := startBucketDaemonOn(t, nil, prep, func(st *store.Store) store.Backend { sh = &sharedFake{Store: st}; return sh })
	rev := b.st.Revision()
	b.tick(t)
	b.tick(t)
	if b.st.Revision() != rev || !slices.Equal(b.st.Table().Buckets(), skewed) {
		t.Fatalf("a director that is not elected stepped the buckets: revision %d -> %d, %v", rev, b.st.Revision(), b.perNode())
	}
	sh.leader.Store(true)
	b.d.kick()
	time.Sleep(50 * time.Millisecond)
	if b.st.Revision() != rev {
		t.Fatalf("the election itself changed the buckets: %v", b.perNode())
	}
	b.tick(t)
	eventually(t, "the elected director's first step", func() bool { return b.perNode()["vpn-b"] > 0 })
	if s := b.d.Status(); s.Etcd == nil || !s.Etcd.Leader {
		t.Fatalf("status of the elected director: %+v", s.Etcd)
	}
}
