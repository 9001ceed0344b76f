package ipvs

import (
	"context"
	"fmt"
	"maps"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tunneldirector/tunneldirector/ipvs/lvs"
	"github.com/tunneldirector/tunneldirector/ipvs/nft"
	"github.com/tunneldirector/tunneldirector/ipvs/route"
)

// fakeKernel records the kernel operations and holds their result: it is
// the nftables, the routing and (with ipvs) the IPVS of one namespace.
type fakeKernel struct {
	// clock is the dataplane's clock (newFake); readAt is when each
	// held read began.
	clock  time.Time
	readAt []time.Time
	// sizes are the map sizes the plans created, kept here from the
	// plans themselves (not State.Apply, which is under test).
	sizes  map[string]uint32
	ipvs   bool
	ops    []string
	nft    *nft.State
	rules  []route.Rule
	routes []route.Route
	svcs   map[svcKey]lvs.Service
	// failRoute makes ReplaceRoute fail for a gateway, as the kernel
	// does for a node it cannot reach.
	failRoute map[netip.Addr]error
	// gen is the ruleset generation; nftReads counts table reads.
	gen      uint32
	nftReads int
	// hold keeps background reads back until release: the test then
	// makes its changes while the read "runs".
	hold    bool
	pending []chan nft.ReadResult
	snaps   []*nft.State
}

// release delivers the held background reads (each the table as it was
// when the read began).
func (k *fakeKernel) release() {
	for i, ch := range k.pending {
		ch <- nft.ReadResult{State: k.snaps[i], Took: k.clock.Sub(k.readAt[i])}
	}
	k.pending, k.snaps, k.readAt = nil, nil, nil
}

func newFakeKernel(ipvs bool) *fakeKernel {
	k := &fakeKernel{ipvs: ipvs, svcs: map[svcKey]lvs.Service{}, nft: nft.NewState()}
	for _, v6 := range []bool{false, true} {
		k.rules = append(k.rules, route.Rule{V6: v6, Prio: 0, Table: route.TableLocal, Proto: route.ProtoKernel},
			route.Rule{V6: v6, Prio: 32766, Table: 254, Proto: route.ProtoKernel})
	}
	return k
}

func (k *fakeKernel) log(f string, a ...any) { k.ops = append(k.ops, fmt.Sprintf(f, a...)) }

// nft.Kernel
func (k *fakeKernel) Read() (*nft.State, error) { k.nftReads++; return k.nft.Clone(), nil }

// ReadInBackground takes the snapshot now: a test decides what changes
// after the read began by what it does before it calls Verify again.
func (k *fakeKernel) ReadInBackground() <-chan nft.ReadResult {
	k.nftReads++
	ch := make(chan nft.ReadResult, 1)
	if k.hold {
		k.pending, k.snaps, k.readAt = append(k.pending, ch), append(k.snaps, k.nft.Clone()), append(k.readAt, k.clock)
		return ch
	}
	ch <- nft.ReadResult{State: k.nft.Clone()}
	return ch
}
func (k *fakeKernel) Confirm(peers []netip.Addr, subnets []netip.Prefix) (nft.PeerMap, nft.SubnetMap, error) {
	var pm nft.PeerMap
	var sm nft.SubnetMap
	for _, a := range peers {
		if v, ok := k.nft.Peers.Get(a); ok {
			pm.Set(a, v)
		}
	}
	for _, p := range subnets {
		if v, ok := k.nft.Subnets.Get(p); ok {
			sm.Set(p, v)
		}
	}
	return pm, sm, nil
}
func (k *fakeKernel) ReadMeta() (*nft.State, error) {
	s := k.nft.Clone()
	s.Peers, s.Subnets = nft.PeerMap{}, nft.SubnetMap{}
	return s, nil
}
func (k *fakeKernel) Apply(p *nft.Plan) error {
	a, c, r := p.Count()
	next := k.nft.Clone()
	next.Apply(p)
	sizes := maps.Clone(k.sizes)
	if p.Recreate || sizes == nil {
		sizes = map[string]uint32{}
	}
	for _, l := range p.DelLens {
		delete(sizes, l.SetName())
	}
	maps.Copy(sizes, p.Sizes)
	// As the kernel does (ENFILE): a sized map takes no more elements
	// than its size, and the transaction is refused whole.
	for name, n := range next.MapCounts() {
		if size := sizes[name]; size > 0 && n > int(size) {
			return fmt.Errorf("map %s: %d elements, its size is %d: %w", name, n, size, unix.ENFILE)
		}
	}
	k.log("nft recreate=%v chain=%v +%d ~%d -%d", p.Recreate, p.Chain, a, c, r)
	k.nft, k.sizes = next, sizes
	k.gen++
	return nil
}
func (k *fakeKernel) DeleteTable() error {
	k.log("nft delete table")
	k.nft = nft.NewState()
	k.gen++
	return nil
}
func (k *fakeKernel) Gen() (uint32, error) { return k.gen, nil }

// route.Kernel
func (k *fakeKernel) Rules() ([]route.Rule, error) { return slices.Clone(k.rules), nil }
func (k *fakeKernel) AddRule(r route.Rule) error {
	k.log("rule add v6=%v pref %d mark %#x table %d", r.V6, r.Prio, r.Mark, r.Table)
	k.rules = append(k.rules, r)
	return nil
}
func (k *fakeKernel) DelRule(r route.Rule) error {
	k.log("rule del v6=%v pref %d mark %#x table %d", r.V6, r.Prio, r.Mark, r.Table)
	i := slices.IndexFunc(k.rules, func(x route.Rule) bool {
		return x.V6 == r.V6 && x.Prio == r.Prio && x.Mark == r.Mark && x.Table == r.Table
	})
	if i < 0 {
		return fmt.Errorf("no such rule")
	}
	k.rules = slices.Delete(k.rules, i, i+1)
	return nil
}
func (k *fakeKernel) Routes() ([]route.Route, error) { return slices.Clone(k.routes), nil }
func (k *fakeKernel) ReplaceRoute(r route.Route) error {
	if err := k.failRoute[r.Gw]; err != nil {
		return err
	}
	k.log("route replace v6=%v table %d via %s", r.V6, r.Table, r.Gw)
	k.routes = slices.DeleteFunc(k.routes, func(x route.Route) bool { return x.V6 == r.V6 && x.Table == r.Table && x.Dst == r.Dst })
	k.routes = append(k.routes, r)
	return nil
}
func (k *fakeKernel) DelRoute(r route.Route) error {
	k.log("route del v6=%v table %d", r.V6, r.Table)
	k.routes = slices.DeleteFunc(k.routes, func(x route.Route) bool { return x.V6 == r.V6 && x.Table == r.Table && x.Dst == r.Dst })
	return nil
}

// lvs.Kernel
func (k *fakeKernel) Services() ([]lvs.Service, error) {
	var out []lvs.Service
	for _, s := range k.svcs {
		out = append(out, s)
	}
	return out, nil
}
func (k *fakeKernel) Add(s lvs.Service) error {
	k.log("svc add v6=%v mark %#x ops=%v", s.V6, s.Mark, s.OnePacket)
	k.svcs[svcKey{s.V6, s.Mark}] = s
	return nil
}
func (k *fakeKernel) Remove(s lvs.Service) error {
	k.log("svc del v6=%v mark %#x", s.V6, s.Mark)
	delete(k.svcs, svcKey{s.V6, s.Mark})
	return nil
}
func (k *fakeKernel) Replace(old, new lvs.Service) error {
	k.log("svc replace v6=%v mark %#x ops=%v", new.V6, new.Mark, new.OnePacket)
	k.svcs[svcKey{new.V6, new.Mark}] = new
	return nil
}
func (k *fakeKernel) Conns() ([]lvs.Conn, error) { return nil, nil }
func (k *fakeKernel) Close() error               { return nil }

// newFake is newDataplane over k (as IPVS too when k has it).
// fakeDataplane is a dataplane with the default Config over a fresh fake
// kernel, with or without IPVS.
func fakeDataplane(t *testing.T, ipvs bool) (*dataplane, *fakeKernel) {
	t.Helper()
	k := newFakeKernel(ipvs)
	dp, err := newFake(Config{}, k)
	if err != nil {
		t.Fatal(err)
	}
	return dp, k
}

func newFake(cfg Config, k *fakeKernel) (*dataplane, error) {
	var lk lvs.Kernel
	if k.ipvs {
		lk = k
	}
	dp, err := newDataplane(cfg, k, k, lk)
	if err == nil {
		// The clock stands still unless a test moves it.
		dp.now = func() time.Time { return k.clock }
	}
	return dp, err
}

func (k *fakeKernel) take() []string { o := k.ops; k.ops = nil; return o }

var (
	pA = netip.MustParseAddr("198.51.100.101")
	pB = netip.MustParseAddr("2001:db8:100::66")
	sA = netip.MustParsePrefix("10.1.0.0/27")
	sB = netip.MustParsePrefix("2001:db8:aa::/64")
)

func unitDesired() *Desired {
	return &Desired{
		VIPs: []netip.Addr{netip.MustParseAddr("203.0.113.1")},
		Nodes: []Node{
			{Mark: 1, Name: "n1", Addr: netip.MustParseAddr("192.0.2.11"), Addr6: netip.MustParseAddr("2001:db8:2::b"), Active: true},
			{Mark: 2, Name: "n2", Addr: netip.MustParseAddr("192.0.2.12"), Active: true},
		},
		Peers:   map[netip.Addr]uint16{pA: 1, pB: 2},
		Subnets: map[netip.Prefix]uint16{sA: 1, sB: 2},
	}
}

func mustSync(t *testing.T, dp *dataplane, d *Desired) Stats {
	t.Helper()
	st, err := dp.Sync(context.Background(), d)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func TestDiffAddIdempotentMoveRemove(t *testing.T) {
	for _, ipvs := range []bool{false, true} {
		t.Run(fmt.Sprintf("ipvs=%v", ipvs), func(t *testing.T) {
			dp, k := fakeDataplane(t, ipvs)
			wantMode := map[bool]Mode{false: ModeRouteOnly, true: ModeIPVS}[ipvs]
			if dp.Mode() != wantMode {
				t.Fatalf("mode %s", dp.Mode())
			}
			d := unitDesired()
			st := mustSync(t, dp, d)
			ops := k.take()
			// routes: n1 v4+v6, n2 v4; rules likewise; 2 local moves.
			svcs := 0
			if ipvs {
				svcs = 3
			}
			if got := countPrefix(ops, "route replace"); got != 3 {
				t.Errorf("route ops %d: %v", got, ops)
			}
			if got := countPrefix(ops, "svc add"); got != svcs {
				t.Errorf("svc ops %d: %v", got, ops)
			}
			if got := countPrefix(ops, "nft "); got != 1 {
				t.Errorf("nft transactions %d: %v", got, ops)
			}
			t.Logf("first sync %+v: %v", st, ops)

			// Idempotence.
			if st := mustSync(t, dp, d); st.Added+st.Changed+st.Removed != 0 || len(k.ops) != 0 {
				t.Fatalf("second sync: %+v %v", st, k.take())
			}
			// Move one peer by Sync.
			d.Peers[pA] = 2
			st = mustSync(t, dp, d)
			if ops := k.take(); st.Changed != 1 || len(ops) != 1 || !strings.HasPrefix(ops[0], "nft recreate=false chain=false +0 ~1 -0") {
				t.Fatalf("move: %+v %v", st, ops)
			}
			// Move by Update, one transaction.
			st, err := dp.Update(context.Background(), &Delta{SetPeers: map[netip.Addr]uint16{pA: 1}, DeleteSubnets: []netip.Prefix{sB}, SetSubnets: map[netip.Prefix]uint16{netip.MustParsePrefix("10.9.0.0/27"): 2}})
			if err != nil {
				t.Fatal(err)
			}
			if ops := k.take(); st.Changed != 1 || st.Removed != 1 || st.Added != 1 || len(ops) != 1 {
				t.Fatalf("update: %+v %v", st, ops)
			}
			// Updating to the same owner changes nothing.
			st, _ = dp.Update(context.Background(), &Delta{SetPeers: map[netip.Addr]uint16{pA: 1}})
			if st.Added+st.Changed+st.Removed != 0 || len(k.take()) != 0 {
				t.Fatalf("no-op update: %+v", st)
			}
			// Unknown owner is refused.
			if _, err := dp.Update(context.Background(), &Delta{SetPeers: map[netip.Addr]uint16{pA: 9}}); err == nil {
				t.Fatal("update to unknown mark accepted")
			}
			// Node removal: node 2 goes, its tunnels move to 1.
			d = unitDesired()
			d.Nodes = d.Nodes[:1]
			d.Peers[pB] = 1
			d.Subnets[sB] = 1
			st = mustSync(t, dp, d)
			ops = k.take()
			if countPrefix(ops, "route del") != 1 || countPrefix(ops, "rule del") != 1 {
				t.Fatalf("node removal: %v", ops)
			}
			if ipvs && countPrefix(ops, "svc del") != 1 {
				t.Fatalf("node removal services: %v", ops)
			}
			// nft must stop pointing at mark 2 before its route goes.
			if i, j := slices.IndexFunc(ops, func(s string) bool { return strings.HasPrefix(s, "nft") }), slices.IndexFunc(ops, func(s string) bool { return strings.HasPrefix(s, "route del") }); i > j {
				t.Fatalf("route removed before the maps moved: %v", ops)
			}
			t.Logf("node removal %+v: %v", st, ops)
			// Full replace.
			d2 := unitDesired()
			d2.Peers = map[netip.Addr]uint16{netip.MustParseAddr("198.51.100.200"): 2}
			d2.Subnets = map[netip.Prefix]uint16{netip.MustParsePrefix("10.2.0.0/27"): 1}
			st = mustSync(t, dp, d2)
			if st.Removed < 4 {
				t.Fatalf("replace: %+v %v", st, k.take())
			}
			k.take()
			got, err := dp.Read(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			if len(got.Peers) != 1 || got.Peers[netip.MustParseAddr("198.51.100.200")] != 2 || len(got.Subnets) != 1 || len(got.Nodes) != 2 {
				t.Fatalf("read back %+v", got)
			}
			// Teardown restores the local rules and removes the rest.
			if err := dp.Teardown(context.Background()); err != nil {
				t.Fatal(err)
			}
			if len(k.routes) != 0 || len(k.svcs) != 0 || k.nft.Table || len(k.rules) != 4 {
				t.Fatalf("after teardown: routes %v svcs %v table %v rules %v", k.routes, k.svcs, k.nft.Table, k.rules)
			}
		})
	}
}

func countPrefix(ops []string, p string) int {
	n := 0
	for _, o := range ops {
		if strings.HasPrefix(o, p) {
			n++
		}
	}
	return n
}

// TestDiffAdoptWithDifferences starts a second Dataplane over a kernel a
// previous run programmed and that then drifted: only the difference is
// applied, nothing is recreated.
func TestDiffAdoptWithDifferences(t *testing.T) {
	dp, k := fakeDataplane(t, true)
	d := unitDesired()
	mustSync(t, dp, d)
	k.take()
	// A restart with a drifted kernel and a changed desire.
	k.nft.Peers.Delete(pA)
	k.nft.Subnets.Set(netip.MustParsePrefix("10.7.0.0/27"), 0x7d000001)
	k.routes = k.routes[1:]
	d.Peers[pB] = 1
	dp2, err := newFake(Config{}, k)
	if err != nil {
		t.Fatal(err)
	}
	st := mustSync(t, dp2, d)
	ops := k.take()
	if st.Added != 2 || st.Changed != 1 || st.Removed != 1 {
		t.Fatalf("adopt stats %+v, ops %v", st, ops)
	}
	for _, o := range ops {
		if strings.Contains(o, "recreate=true") || strings.Contains(o, "chain=true") || strings.HasPrefix(o, "svc") || strings.HasPrefix(o, "rule") {
			t.Fatalf("adopt did more than the difference: %v", ops)
		}
	}
	if st := mustSync(t, dp2, d); st.Added+st.Changed+st.Removed != 0 {
		t.Fatalf("sync after adopt: %+v", st)
	}
}

// verifySettled calls Verify until no background read is pending and
// returns what the calls repaired together.
func verifySettled(ctx context.Context, dp Dataplane) (Stats, error) {
	var sum Stats
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		st, err := dp.Verify(ctx)
		sum.Added, sum.Changed, sum.Removed = sum.Added+st.Added, sum.Changed+st.Changed, sum.Removed+st.Removed
		sum.Duration += st.Duration
		if err != nil || !st.Pending || time.Now().After(deadline) {
			sum.Pending = st.Pending
			return sum, err
		}
	}
}

// TestAdoptTrustsTheDigest: a restarted dataplane whose target's maps
// have the digest the kernel stored with its last transaction takes them
// without reading them back, also after updates maintained the digest
// incrementally; a target that differs from what the kernel stored is
// adopted by reading the kernel and applying the difference.
func TestAdoptTrustsTheDigest(t *testing.T) {
	dp, k := fakeDataplane(t, true)
	d := unitDesired()
	mustSync(t, dp, d)
	restart := func() *dataplane {
		t.Helper()
		k.take()
		dp2, err := newFake(Config{}, k)
		if err != nil {
			t.Fatal(err)
		}
		return dp2
	}
	reads := k.nftReads
	dp2 := restart()
	if st := mustSync(t, dp2, d); st.Added+st.Changed+st.Removed != 0 || dp2.adopted != 1 || k.nftReads != reads {
		t.Fatalf("restart on an unchanged kernel: %+v, adopted %d, %d map reads (want 0 changes, adopted 1, no read)", st, dp2.adopted, k.nftReads-reads)
	}
	// A move and a new subnet, as a delta: the stored digest follows.
	sub := netip.MustParsePrefix("10.9.0.0/24")
	if _, err := dp2.Update(context.Background(), &Delta{SetPeers: map[netip.Addr]uint16{pA: 2}, SetSubnets: map[netip.Prefix]uint16{sub: 1}}); err != nil {
		t.Fatal(err)
	}
	d.Peers[pA], d.Subnets[sub] = 2, 1
	if !k.nft.HasStored || k.nft.Stored != k.nft.Digest() {
		t.Fatalf("kernel stores digest %+v (%v), its maps' digest is %+v", k.nft.Stored, k.nft.HasStored, k.nft.Digest())
	}
	dp3 := restart()
	if st := mustSync(t, dp3, d); st.Added+st.Changed+st.Removed != 0 || dp3.adopted != 1 || k.nftReads != reads {
		t.Fatalf("restart after an update: %+v, adopted %d, %d map reads", st, dp3.adopted, k.nftReads-reads)
	}
	// The store moved on while no director ran: read and repair.
	d.Peers[pA] = 1
	dp4 := restart()
	st := mustSync(t, dp4, d)
	if dp4.adopted != 0 || k.nftReads != reads+1 || st.Changed != 1 {
		t.Fatalf("restart with a changed target: %+v, adopted %d, %d map reads (want a read and 1 change)", st, dp4.adopted, k.nftReads-reads)
	}
	if v, _ := k.nft.Peers.Get(pA); v != dp4.cfg.Fwmark(1) || k.nft.Stored != k.nft.Digest() {
		t.Fatalf("after the repair: pA -> %#x, stored digest %+v, maps %+v", v, k.nft.Stored, k.nft.Digest())
	}
}

func TestDiffRefusesForeign(t *testing.T) {
	k := newFakeKernel(false)
	k.rules = append(k.rules, route.Rule{Prio: 50, Mark: 0x7d000005, Mask: 0xffffffff, Table: 9})
	if _, err := newFake(Config{}, k); err == nil || !strings.Contains(err.Error(), "mark range") {
		t.Fatalf("foreign mark: %v", err)
	}
	k = newFakeKernel(false)
	k.rules = append(k.rules, route.Rule{Prio: 7, Table: 20010})
	if _, err := newFake(Config{}, k); err == nil || !strings.Contains(err.Error(), "routing table 20010") {
		t.Fatalf("foreign table: %v", err)
	}
	k = newFakeKernel(false)
	if _, err := newFake(Config{Mode: ModeIPVS}, k); err == nil {
		t.Fatal("ModeIPVS without IPVS accepted")
	}
}

func TestHashChangeRebuildsChain(t *testing.T) {
	dp, k := fakeDataplane(t, false)
	d := unitDesired()
	mustSync(t, dp, d)
	k.take()
	d.Nodes[1].Active = false
	mustSync(t, dp, d)
	ops := k.take()
	if len(ops) != 1 || !strings.Contains(ops[0], "chain=true") {
		t.Fatalf("deactivating a node: %v", ops)
	}
	if k.nft.Sig.HashN != 1 || k.nft.Sig.IKEBit != 0 || len(k.nft.Hash) != 1 {
		t.Fatalf("sig %+v hash %v", k.nft.Sig, k.nft.Hash)
	}
}

// TestSubnetLengthsFollowUpdates checks that a length's map and rule come
// with its first subnet and go with its last, in the Update's one
// transaction and without rebuilding the chain, and that Verify then finds
// nothing to do.
func TestSubnetLengthsFollowUpdates(t *testing.T) {
	dp, k := fakeDataplane(t, false)
	d := unitDesired()
	mustSync(t, dp, d)
	k.take()
	want := []nft.Len{{V6: false, Bits: 27}, {V6: true, Bits: 64}}
	if !slices.Equal(nft.SortedLens(k.nft.Lens), want) {
		t.Fatalf("lens %v", k.nft.Lens)
	}
	// A new length and the last of another in one Update.
	st, err := dp.Update(context.Background(), &Delta{DeleteSubnets: []netip.Prefix{sB},
		SetSubnets: map[netip.Prefix]uint16{netip.MustParsePrefix("10.9.0.0/24"): 2}})
	if err != nil {
		t.Fatal(err)
	}
	ops := k.take()
	if len(ops) != 1 || !strings.Contains(ops[0], "chain=false") || st.Added != 1 || st.Removed != 1 || st.Changed != 0 {
		t.Fatalf("update %+v %v", st, ops)
	}
	want = []nft.Len{{V6: false, Bits: 27}, {V6: false, Bits: 24}}
	if !slices.Equal(nft.SortedLens(k.nft.Lens), want) || !slices.Equal(k.nft.Sig.Lens, want) {
		t.Fatalf("lens %v sig %+v", k.nft.Lens, k.nft.Sig)
	}
	if st, err := verifySettled(context.Background(), dp); err != nil || st.Added+st.Changed+st.Removed != 0 || len(k.take()) != 0 {
		t.Fatalf("verify after update: %+v %v", st, err)
	}
	// An element change of a present length leaves the chain alone.
	if _, err := dp.Update(context.Background(), &Delta{SetSubnets: map[netip.Prefix]uint16{sA: 2}}); err != nil {
		t.Fatal(err)
	}
	if ops := k.take(); len(ops) != 1 || !strings.Contains(ops[0], "chain=false") {
		t.Fatalf("element move: %v", ops)
	}
}

// TestUpdateWithNodesEqualsSync: a node going down as one Update (its new
// state plus its tunnels' moves) leaves the kernel exactly as a full Sync
// of the same desired state would, with only the moved elements, the
// node's service and the hash map and chain in the transaction; routes
// and services of a new node are added before the maps point at it, a
// deleted node's removed after.
func TestUpdateWithNodesEqualsSync(t *testing.T) {
	for _, ipvs := range []bool{false, true} {
		t.Run(fmt.Sprintf("ipvs=%v", ipvs), func(t *testing.T) {
			dp, k := fakeDataplane(t, ipvs)
			d := unitDesired()
			mustSync(t, dp, d)
			k.take()
			// n1 goes down: its peer and subnet move to n2.
			d.Nodes[0].Active, d.Nodes[0].Down = false, true
			d.Peers[pA], d.Subnets[sA] = 2, 2
			st, err := dp.Update(context.Background(), &Delta{SetPeers: map[netip.Addr]uint16{pA: 2}, SetSubnets: map[netip.Prefix]uint16{sA: 2},
				Nodes: slices.Clone(d.Nodes)})
			if err != nil {
				t.Fatal(err)
			}
			ops := k.take()
			t.Logf("node down: %+v %v", st, ops)
			nftOps := 0
			for _, o := range ops {
				if strings.HasPrefix(o, "nft") {
					nftOps++
					if !strings.Contains(o, "recreate=false chain=true +0 ~4 -1") {
						t.Errorf("nft transaction %q, want 2 moves, the chain rebuilt (one active node fewer) and a hash slot changed, one removed", o)
					}
				}
			}
			if nftOps != 1 {
				t.Errorf("%d nft transactions, want 1: %v", nftOps, ops)
			}
			if ipvs && countPrefix(ops, "svc del") != 2 {
				t.Errorf("the down node's two services were not removed: %v", ops)
			}
			// A fresh dataplane synced to the same desired state: the same
			// kernel.
			dp2, k2 := fakeDataplane(t, ipvs)
			mustSync(t, dp2, d)
			if !reflect.DeepEqual(k.nft, k2.nft) || !reflect.DeepEqual(k.svcs, k2.svcs) || !reflect.DeepEqual(k.routes, k2.routes) {
				t.Fatalf("after the node update the kernel differs from a sync:\nupdate nft %+v\nsync   nft %+v\nupdate svcs %v\nsync   svcs %v", k.nft, k2.nft, k.svcs, k2.svcs)
			}
			// A new node n3 takes pB: its route (and service) exist
			// before the nft transaction that points pB at it.
			d.Nodes = append(d.Nodes, Node{Mark: 3, Name: "n3", Addr: netip.MustParseAddr("192.0.2.13"), Active: true})
			d.Peers[pB] = 3
			if _, err := dp.Update(context.Background(), &Delta{SetPeers: map[netip.Addr]uint16{pB: 3}, Nodes: slices.Clone(d.Nodes)}); err != nil {
				t.Fatal(err)
			}
			ops = k.take()
			route, nftAt := slices.IndexFunc(ops, func(o string) bool { return strings.Contains(o, "192.0.2.13") }), slices.IndexFunc(ops, func(o string) bool { return strings.HasPrefix(o, "nft") })
			if route < 0 || nftAt < 0 || route > nftAt {
				t.Fatalf("the new node's route is not programmed before the maps point at it: %v", ops)
			}
			// Owner marks of a delta are checked against its nodes.
			if _, err := dp.Update(context.Background(), &Delta{SetPeers: map[netip.Addr]uint16{pB: 4}, Nodes: slices.Clone(d.Nodes)}); err == nil || !strings.Contains(err.Error(), "owner mark 4 is not a node") {
				t.Fatalf("a delta to a mark its nodes lack: %v", err)
			}
			if st, err := verifySettled(context.Background(), dp); err != nil || st.Added+st.Changed+st.Removed != 0 {
				t.Fatalf("verify after node updates found %+v, %v", st, err)
			}
		})
	}
}

// TestVerifyReadsMapsOnlyWhenTheGenerationMoved: Verify trusts the model
// while the ruleset generation stays where the director's last
// transaction left it, reads the maps back and repairs when anyone else
// committed, and reads them anyway every fullVerifyEvery verifies.
func TestVerifyReadsMapsOnlyWhenTheGenerationMoved(t *testing.T) {
	dp, k := fakeDataplane(t, false)
	mustSync(t, dp, unitDesired())
	reads := k.nftReads
	verify := func() Stats {
		t.Helper()
		st, err := verifySettled(context.Background(), dp)
		if err != nil {
			t.Fatal(err)
		}
		return st
	}
	if st := verify(); k.nftReads != reads || st.Added+st.Changed+st.Removed != 0 {
		t.Fatalf("verify with an unchanged generation read the maps (%d reads) or changed %+v", k.nftReads-reads, st)
	}
	// Someone else deletes a peer: one transaction, the generation moves.
	k.nft.Peers.Delete(pA)
	k.gen++
	if st := verify(); k.nftReads != reads+1 || st.Added != 1 {
		t.Fatalf("foreign change: %d reads, repaired %+v; want 1 read, 1 added", k.nftReads-reads, st)
	}
	// A change the generation does not show (a foreign commit racing the
	// director's own): found by the periodic full read.
	k.nft.Peers.Delete(pA)
	reads = k.nftReads
	repaired := 0
	for range fullVerifyEvery {
		repaired += verify().Added
	}
	if k.nftReads != reads+1 || repaired != 1 {
		t.Fatalf("%d verifies: %d reads, %d repaired; want 1 and 1", fullVerifyEvery, k.nftReads-reads, repaired)
	}
}

// TestPeriodicReadDuty: the periodic full read waits readDuty times as
// long as the last read took, so that a read of minutes (a million
// tunnels) does not keep a core busy; a foreign change is read at once.
func TestPeriodicReadDuty(t *testing.T) {
	dp, k := fakeDataplane(t, false)
	mustSync(t, dp, unitDesired())
	ctx := context.Background()
	k.hold = true
	// A foreign change starts a read, which takes 100 s.
	k.gen++
	if _, err := dp.Verify(ctx); err != nil || dp.pending == nil {
		t.Fatalf("verify after a foreign change: %v, pending %v", err, dp.pending != nil)
	}
	k.clock = k.clock.Add(100 * time.Second)
	k.release()
	if st, err := dp.Verify(ctx); err != nil || st.Pending {
		t.Fatalf("verify taking the read: %+v %v", st, err)
	}
	// 30 s a verify: the periodic read is due after 1,000 s, at the
	// first fullVerifyEvery-th verify from then.
	reads, verifies := k.nftReads, 0
	for k.nftReads == reads && verifies < 100 {
		k.clock = k.clock.Add(30 * time.Second)
		if _, err := dp.Verify(ctx); err != nil {
			t.Fatal(err)
		}
		verifies++
	}
	if waited := time.Duration(verifies) * 30 * time.Second; waited < readDuty*100*time.Second || waited >= (readDuty*100+fullVerifyEvery*30)*time.Second {
		t.Fatalf("the periodic read came after %s; want it in the %d verifies after %s", waited, fullVerifyEvery, readDuty*100*time.Second)
	}
	k.clock = k.clock.Add(time.Second)
	k.release()
	if _, err := dp.Verify(ctx); err != nil {
		t.Fatal(err)
	}
	// Reads that take no time come every fullVerifyEvery verifies.
	k.hold = false
	reads = k.nftReads
	for range 3 * fullVerifyEvery {
		k.clock = k.clock.Add(30 * time.Second)
		if _, err := dp.Verify(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if k.nftReads-reads != 3 {
		t.Fatalf("%d verifies of instant reads: %d reads, want 3", 3*fullVerifyEvery, k.nftReads-reads)
	}
	// A foreign change is read at the next verify, duty or not.
	k.gen++
	reads = k.nftReads
	if _, err := dp.Verify(ctx); err != nil || k.nftReads != reads+1 {
		t.Fatalf("foreign change under the duty: %d reads, %v; want 1", k.nftReads-reads, err)
	}
}

// TestGrownFlushesMasq: a table recreated because a map outgrew its size
// flushes the masq services of the peers the change moved (their entries
// would keep their IKE on the old node), and only those.
func TestGrownFlushesMasq(t *testing.T) {
	dp, k, _ := masqSynced(t)
	// pA moves to node 2 together with enough new peers to outgrow the
	// peer map.
	dl := &Delta{SetPeers: map[netip.Addr]uint16{pA: 2}}
	for i := range 1100 {
		dl.SetPeers[netip.AddrFrom4([4]byte{198, 18, byte(i >> 8), byte(i)})] = 1
	}
	old, _ := dp.model.nft.Peers.Get(pA)
	if _, err := dp.Update(context.Background(), dl); err != nil {
		t.Fatal(err)
	}
	ops := k.take()
	flushed := flushedMarks(ops)
	if !slices.ContainsFunc(ops, func(op string) bool { return strings.HasPrefix(op, "nft recreate=true") }) {
		t.Fatal("the update did not recreate the table")
	}
	if len(flushed) != 1 || !flushed[old|IKEBit] {
		t.Fatalf("flushed %v; want only the masq service of pA's old node (%#x)", flushed, old|IKEBit)
	}
}

// TestVerifyInTheBackground: a read that has not arrived leaves Verify to
// the routes and services while deltas go on; when it arrives, the keys
// the deltas touched meanwhile are taken from the model (no spurious
// repair of a key the read saw before its move), a foreign change is
// repaired, and a read that saw a structure the director changed since
// is dropped and read again.
func TestVerifyInTheBackground(t *testing.T) {
	dp, k := fakeDataplane(t, false)
	d := unitDesired()
	mustSync(t, dp, d)
	ctx := context.Background()
	verify := func() Stats {
		t.Helper()
		st, err := dp.Verify(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return st
	}
	k.hold = true
	// Someone else deletes pA; the director's next Verify starts a read.
	k.nft.Peers.Delete(pA)
	k.gen++
	if st := verify(); st.Added+st.Changed+st.Removed != 0 || dp.pending == nil {
		t.Fatalf("verify with the read outstanding: %+v, pending %v", st, dp.pending != nil)
	}
	// The director moves pB while the read runs (the read saw pB on
	// node 2); the move reaches the kernel at once.
	if _, err := dp.Update(ctx, &Delta{SetPeers: map[netip.Addr]uint16{pB: 1}}); err != nil {
		t.Fatal(err)
	}
	if v, _ := k.nft.Peers.Get(pB); v != dp.cfg.Fwmark(1) {
		t.Fatalf("a move during the read did not reach the kernel: %#x", v)
	}
	k.release()
	st := verify()
	if st.Added != 1 || st.Changed != 0 || st.Removed != 0 {
		t.Fatalf("repair from the read: %+v, want pA added and nothing else", st)
	}
	if _, ok := k.nft.Peers.Get(pA); !ok {
		t.Fatal("pA not repaired")
	}
	if v, _ := k.nft.Peers.Get(pB); v != dp.cfg.Fwmark(1) {
		t.Fatalf("the read's stale pB was written back: %#x", v)
	}
	// A structural change during a read drops it; the next Verify reads
	// again and repairs.
	k.nft.Peers.Delete(pA)
	k.gen++
	verify()
	sub := netip.MustParsePrefix("2001:db8:77::/48")
	if _, err := dp.Update(ctx, &Delta{SetSubnets: map[netip.Prefix]uint16{sub: 1}}); err != nil {
		t.Fatal(err)
	}
	k.release()
	if st := verify(); st.Added+st.Changed+st.Removed != 0 || dp.pending != nil {
		t.Fatalf("a read across a new subnet length was used: %+v", st)
	}
	k.hold = false
	if st, err := verifySettled(ctx, dp); err != nil || st.Added != 1 {
		t.Fatalf("the read after the dropped one repaired %+v, want pA added", st)
	}
}

// TestInterruptedReadConfirmsMissed: a read that ran across a transaction
// may lack elements the kernel holds; Verify asks for those one by one
// instead of re-adding them as drift, and repairs the ones really gone.
func TestInterruptedReadConfirmsMissed(t *testing.T) {
	dp, k := fakeDataplane(t, false)
	mustSync(t, dp, unitDesired())
	ctx := context.Background()
	k.hold = true
	k.gen++ // someone else committed: the next Verify reads
	if _, err := dp.Verify(ctx); err != nil {
		t.Fatal(err)
	}
	// The walk skipped pA, which the kernel holds, and sA, which
	// someone else really deleted.
	k.snaps[0].Peers.Delete(pA)
	k.snaps[0].Subnets.Delete(sA)
	k.snaps[0].Interrupted = true
	k.nft.Subnets.Delete(sA)
	k.release()
	st, err := dp.Verify(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.Added != 1 || st.Changed+st.Removed != 0 {
		t.Fatalf("repair from an interrupted read: %+v, want sA alone added", st)
	}
	if _, ok := k.nft.Subnets.Get(sA); !ok {
		t.Fatal("sA not repaired")
	}
	// Not flagged, but the director moved pB during the read: the walk
	// may have skipped pA all the same.
	k.gen++
	if _, err := dp.Verify(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := dp.Update(ctx, &Delta{SetPeers: map[netip.Addr]uint16{pB: 1}}); err != nil {
		t.Fatal(err)
	}
	k.snaps[0].Peers.Delete(pA)
	k.release()
	if st, err := dp.Verify(ctx); err != nil || st.Added+st.Changed+st.Removed != 0 {
		t.Fatalf("a read that skipped pA while the director moved pB repaired %+v, %v", st, err)
	}
}

// TestUpdateWithNodesKeepsBuckets: with unknown-peer buckets, a delta that
// changes the nodes keeps the buckets as the last Sync and the Updates
// since left them (a bucket step in the same delta included), and the
// kernel ends as a Sync of the same desired state would leave it.
func TestUpdateWithNodesKeepsBuckets(t *testing.T) {
	dp, k := fakeDataplane(t, false)
	d := unitDesired()
	d.Buckets = []uint16{1, 2, 1, 2}
	mustSync(t, dp, d)
	ctx := context.Background()
	if _, err := dp.Update(ctx, &Delta{Buckets: map[int]uint16{0: 2}}); err != nil {
		t.Fatal(err)
	}
	d.Buckets[0] = 2
	// n1 goes down (its tunnels move); a new node n3 takes bucket 2.
	d.Nodes[0].Active, d.Nodes[0].Down = false, true
	d.Nodes = append(d.Nodes, Node{Mark: 3, Name: "n3", Addr: netip.MustParseAddr("192.0.2.13"), Active: true})
	d.Peers[pA], d.Subnets[sA] = 2, 2
	d.Buckets[2] = 3
	if _, err := dp.Update(ctx, &Delta{SetPeers: map[netip.Addr]uint16{pA: 2}, SetSubnets: map[netip.Prefix]uint16{sA: 2},
		Buckets: map[int]uint16{2: 3}, Nodes: slices.Clone(d.Nodes)}); err != nil {
		t.Fatal(err)
	}
	dp2, k2 := fakeDataplane(t, false)
	mustSync(t, dp2, d)
	if !reflect.DeepEqual(k.nft, k2.nft) || !reflect.DeepEqual(k.routes, k2.routes) {
		t.Fatalf("after the node update the kernel differs from a sync:\nupdate %+v\nsync   %+v", k.nft, k2.nft)
	}
}

// TestSyncFromMarks: a Desired handing its elements over Marks programs
// the same kernel as one with maps, and a mark that is no node is refused.
func TestSyncFromMarks(t *testing.T) {
	dp1, k1 := fakeDataplane(t, true)
	mustSync(t, dp1, unitDesired())
	dp2, k2 := fakeDataplane(t, true)
	d := unitDesired()
	peers, subnets := d.Peers, d.Subnets
	d.Peers, d.Subnets = nil, nil
	d.Marks = func(peer func(netip.Addr, uint16), subnet func(netip.Prefix, uint16)) {
		for a, m := range peers {
			peer(a, m)
		}
		for p, m := range subnets {
			subnet(p, m)
		}
	}
	mustSync(t, dp2, d)
	if k1.nft.Digest() != k2.nft.Digest() || k2.nft.Peers.Len() != len(peers) || k2.nft.Subnets.Len() != len(subnets) {
		t.Fatalf("from Marks: %d peers, %d subnets, digest %+v; from maps digest %+v", k2.nft.Peers.Len(), k2.nft.Subnets.Len(), k2.nft.Digest(), k1.nft.Digest())
	}
	peers[pA] = 9
	if _, err := dp2.Sync(context.Background(), d); err == nil || !strings.Contains(err.Error(), "owner mark 9 is not a node") {
		t.Fatalf("a peer on mark 9 from Marks: %v", err)
	}
}

// TestReloadFlushesMasq: a restart that replaces differing maps without
// reading them does not know which peers move, so it flushes the
// connection entries of every masq service: a moved peer's IKE must not
// stay on its old node through them.
func TestReloadFlushesMasq(t *testing.T) {
	_, k, d := masqSynced(t)
	d.Peers[pA] = 2 // moved while no director ran
	dp2, err := newFake(Config{}, k)
	if err != nil {
		t.Fatal(err)
	}
	dp2.reloadOver = 0
	mustSync(t, dp2, d)
	if dp2.reloaded != 1 {
		t.Fatalf("reloaded %d, want the maps replaced without reading them", dp2.reloaded)
	}
	flushed := flushedMarks(k.take())
	for _, n := range d.Nodes {
		if !flushed[dp2.cfg.IKEMark(n.Mark)] {
			t.Fatalf("the masq service of node %s was not flushed at the reload (flushed %v)", n.Name, flushed)
		}
	}
	if v, _ := k.nft.Peers.Get(pA); v != dp2.cfg.Fwmark(2) {
		t.Fatalf("after the reload pA -> %#x, want node 2's mark", v)
	}
}

// TestModelSharesTheTargetsMaps: after every reconcile that compared the
// maps, changed or not (a Sync, an Update, a Verify's full read), the
// model of the kernel holds the target's maps, not a copy of them.
func TestModelSharesTheTargetsMaps(t *testing.T) {
	dp, k := fakeDataplane(t, true)
	d := unitDesired()
	shares := func(when string) {
		t.Helper()
		if !dp.model.nft.SharesMaps(dp.want.nft) {
			t.Fatalf("%s: the model holds maps of its own", when)
		}
	}
	mustSync(t, dp, d)
	shares("first sync")
	mustSync(t, dp, d)
	shares("a sync that changed nothing")
	if _, err := dp.Update(context.Background(), &Delta{SetPeers: map[netip.Addr]uint16{pA: 2}}); err != nil {
		t.Fatal(err)
	}
	shares("an update")
	k.gen++ // someone else's transaction: the next verify reads the maps
	reads := k.nftReads
	if _, err := dp.Verify(context.Background()); err != nil {
		t.Fatal(err)
	}
	for i := 0; dp.pending != nil && i < 10; i++ {
		if _, err := dp.Verify(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	if k.nftReads == reads {
		t.Fatal("no verify read the maps")
	}
	shares("a full read that found nothing to repair")
}

// TestMoveFlushesMasq: a move through Update flushes the masq service of
// the node the peer left, and only that one, although the model of the
// kernel shares the target's maps, which Update has changed by then (the
// plan says where the peer was: Plan.Left). A peer deleted and set again
// with its node, and a new peer, leave no node.
func TestMoveFlushesMasq(t *testing.T) {
	dp, k, _ := masqSynced(t)
	old, _ := dp.model.nft.Peers.Get(pA)
	if _, err := dp.Update(context.Background(), &Delta{SetPeers: map[netip.Addr]uint16{pA: 2}}); err != nil {
		t.Fatal(err)
	}
	if flushed := flushedMarks(k.take()); len(flushed) != 1 || !flushed[old|IKEBit] {
		t.Fatalf("flushed %v after pA moved; want only its old node's masq service (%#x)", flushed, old|IKEBit)
	}
	dl := &Delta{DeletePeers: []netip.Addr{pB}, SetPeers: map[netip.Addr]uint16{pB: 2, netip.MustParseAddr("198.51.100.7"): 1}}
	if _, err := dp.Update(context.Background(), dl); err != nil {
		t.Fatal(err)
	}
	if flushed := flushedMarks(k.take()); len(flushed) != 0 {
		t.Fatalf("flushed %v for a peer set again with its node and a new peer; want none", flushed)
	}
}

// masqSynced is a fake IPVS dataplane synced to unitDesired with every
// node in masq, its operations so far taken.
func masqSynced(t *testing.T) (*dataplane, *fakeKernel, *Desired) {
	dp, k := fakeDataplane(t, true)
	d := unitDesired()
	for i := range d.Nodes {
		d.Nodes[i].Forward = ForwardMasq
	}
	mustSync(t, dp, d)
	k.take()
	return dp, k, d
}

// flushedMarks are the fwmarks of the services the operations replaced
// (flushed their connection entries).
func flushedMarks(ops []string) map[uint32]bool {
	flushed := map[uint32]bool{}
	for _, op := range ops {
		var v6, onePacket bool
		var mark uint32
		if n, _ := fmt.Sscanf(op, "svc replace v6=%t mark %v ops=%t", &v6, &mark, &onePacket); n == 3 {
			flushed[mark] = true
		}
	}
	return flushed
}
