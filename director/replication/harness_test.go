package replication

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"path/filepath"
	"reflect"
	"slices"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/director/replication/wire"
	"github.com/tunneldirector/tunneldirector/internal/clock"
	"github.com/tunneldirector/tunneldirector/store"
)

var testKey = []byte("0123456789abcdef-test-key")

var epoch0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

// pair is two directors over a FakeNetwork, stepped in one goroutine.
type pair struct {
	t      testing.TB
	clk    *clock.Manual
	net    *FakeNetwork
	ep     [2]*FakeEndpoint
	st     [2]*store.Store
	r      [2]*Replicator
	dir    string
	cfgMod func(int, *Config)
	step_  time.Duration
}

func openStore(t testing.TB, path string, journal int) *store.Store {
	t.Helper()
	s, err := store.Open(store.Options{Path: path, JournalChanges: journal, Table: affinity.Options{Now: func() time.Time { return epoch0 }}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func newPair(t testing.TB, fc FakeConfig, mod func(int, *Config)) *pair {
	t.Helper()
	p := &pair{t: t, clk: clock.NewManual(epoch0), dir: t.TempDir(), cfgMod: mod, step_: time.Millisecond}
	p.net, p.ep[0], p.ep[1] = NewFakeNetwork(fc, p.clk)
	for i := range 2 {
		p.st[i] = openStore(t, filepath.Join(p.dir, fmt.Sprintf("d%d.db", i)), 0)
	}
	return p
}

// start creates side i's replicator (0 is made master).
func (p *pair) start(i int) {
	p.t.Helper()
	cfg := Config{ID: uint32(i + 1), Key: testKey, Store: p.st[i], Transport: p.ep[i], Clock: p.clk}
	if p.cfgMod != nil {
		p.cfgMod(i, &cfg)
	}
	r, err := New(cfg)
	if err != nil {
		p.t.Fatal(err)
	}
	p.r[i] = r
	if i == 0 {
		r.SetRole(RoleMaster)
	}
}

func (p *pair) startBoth() { p.start(0); p.start(1) }

// step advances the clock and lets everything due happen.
func (p *pair) step() {
	p.clk.Advance(p.step_)
	p.net.Settle(64, func(i int, b []byte) {
		if p.r[i] != nil { // a stopped director's datagrams are lost
			p.r[i].HandleDatagram(b)
		}
	})
	for i := range 2 {
		if p.r[i] != nil {
			p.r[i].Tick()
		}
	}
}

// churn commits the ops' first batch and then rounds random batches, one
// step apart, and waits until the backup holds the master's table.
func (p *pair) churn(o *ops, rounds int) {
	p.t.Helper()
	commit(p.st[0], o.init())
	for range rounds {
		commit(p.st[0], o.batch(p.st[0].Table()))
		p.step()
	}
	if !p.settle(10 * time.Second) {
		p.t.Fatal(p.describeDiff())
	}
}

func (p *pair) steps(n int) {
	for range n {
		p.step()
	}
}

func (p *pair) equal() bool {
	a, b := p.st[0].Table().Snapshot(), p.st[1].Table().Snapshot()
	return reflect.DeepEqual(a, b)
}

// settle steps until the tables are equal and the backup says in-sync.
func (p *pair) settle(limit time.Duration) bool {
	for d := time.Duration(0); d < limit; d += p.step_ {
		p.step()
		if p.equal() && p.r[1].Status().State == StateInSync && p.r[1].Ready() {
			return true
		}
	}
	return false
}

func (p *pair) describeDiff() string {
	a, b := p.st[0].Table().Snapshot(), p.st[1].Table().Snapshot()
	s := fmt.Sprintf("master rev %d (%d tunnels, %d nodes), backup rev %d (%d tunnels, %d nodes)",
		a.Revision, len(a.Tunnels), len(a.Nodes), b.Revision, len(b.Tunnels), len(b.Nodes))
	bt := map[string]affinity.Tunnel{}
	for _, t := range b.Tunnels {
		bt[t.ID] = t
	}
	n := 0
	for _, t := range a.Tunnels {
		if o, ok := bt[t.ID]; !ok || !reflect.DeepEqual(o, t) {
			if n < 3 {
				s += fmt.Sprintf("\n  master %+v\n  backup %+v", t, o)
			}
			n++
		}
	}
	st := p.r[1].Status()
	return s + fmt.Sprintf("\n  %d differ; backup status %s %q counters %+v\n  master status %+v", n, st.State, st.Reason, st.Counters, p.r[0].Status())
}

// ops generates random batches on a master's table: imports, moves,
// deletes, comment edits and node changes.
type ops struct {
	rng   *rand.Rand
	next  int
	nodes int
}

func newOps(seed uint64) *ops { return &ops{rng: rand.New(rand.NewPCG(seed, 7))} }

func nodeChange(i int, state affinity.NodeState, weight uint32) affinity.Change {
	return affinity.Change{Kind: affinity.PutNode, Node: &affinity.Node{
		Name: fmt.Sprintf("n%d", i), Addr: netip.AddrFrom4([4]byte{10, 255, byte(i >> 8), byte(i)}),
		Weight: weight, State: state}}
}

func (o *ops) tunnel(id int) *affinity.Tunnel {
	return &affinity.Tunnel{
		ID:      fmt.Sprintf("t%d", id),
		Peer:    netip.AddrFrom4([4]byte{198, 18, byte(id >> 8), byte(id)}),
		Subnets: []netip.Prefix{netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(id >> 11), byte(id >> 3), byte(id<<5) & 0xe0}), 27)},
	}
}

func (o *ops) init() []affinity.Change {
	var cs []affinity.Change
	for i := range 4 {
		cs = append(cs, nodeChange(i, affinity.NodeActive, 100))
	}
	o.nodes = 4
	return cs
}

// batch builds one random batch against the current table.
func (o *ops) batch(tab *affinity.Table) []affinity.Change {
	var cs []affinity.Change
	tunnels := tab.Tunnels()
	nodes := tab.Nodes()
	var active []string
	for _, n := range nodes {
		if n.State == affinity.NodeActive {
			active = append(active, n.Name)
		}
	}
	switch k := o.rng.IntN(100); {
	case k < 40 || len(tunnels) < 10: // import
		for range 1 + o.rng.IntN(40) {
			if o.next >= 60000 {
				break
			}
			cs = append(cs, affinity.Change{Kind: affinity.PutTunnel, Tunnel: o.tunnel(o.next), Reason: "import"})
			o.next++
		}
	case k < 60 && len(active) > 0: // moves
		for range 1 + o.rng.IntN(10) {
			t := tunnels[o.rng.IntN(len(tunnels))]
			t.Node = active[o.rng.IntN(len(active))]
			t.Pinned = true
			cs = append(cs, affinity.Change{Kind: affinity.PutTunnel, Tunnel: &t, Reason: "move"})
		}
	case k < 75: // deletes
		seen := map[string]bool{}
		for range 1 + o.rng.IntN(10) {
			t := tunnels[o.rng.IntN(len(tunnels))]
			if !seen[t.ID] {
				seen[t.ID] = true
				cs = append(cs, affinity.Change{Kind: affinity.DeleteTunnel, Name: t.ID, Reason: "delete"})
			}
		}
	case k < 80: // comments
		t := tunnels[o.rng.IntN(len(tunnels))]
		t.Comment = fmt.Sprintf("c%d", o.rng.IntN(1000))
		cs = append(cs, affinity.Change{Kind: affinity.PutTunnel, Tunnel: &t})
	case k < 85: // an unknown-peer bucket step, now and then a resize
		cur := tab.Buckets()
		next := slices.Clone(cur)
		if len(next) == 0 || o.rng.IntN(10) == 0 {
			next = make([]uint16, 16<<o.rng.IntN(3))
		}
		for range 1 + o.rng.IntN(8) {
			next[o.rng.IntN(len(next))] = uint16(1 + o.rng.IntN(o.nodes))
		}
		cs = affinity.BucketChanges(cur, next, "bucket step")
	case k < 95: // node weight / drain / activate
		i := o.rng.IntN(o.nodes)
		st := affinity.NodeActive
		if o.rng.IntN(3) == 0 {
			st = affinity.NodeDraining
		}
		if o.rng.IntN(8) == 0 && len(active) > 2 {
			st = affinity.NodeDown
		}
		cs = append(cs, nodeChange(i, st, uint32(50+o.rng.IntN(100))))
	default: // a new node
		if o.nodes < 12 {
			cs = append(cs, nodeChange(o.nodes, affinity.NodeActive, 100))
			o.nodes++
		}
	}
	return cs
}

// commit commits a batch, ignoring refusals (a random move onto a full
// node, say): they commit nothing.
func commit(s *store.Store, cs []affinity.Change) bool {
	if len(cs) == 0 {
		return false
	}
	_, err := s.Commit(cs)
	return err == nil
}

func ids(ts []affinity.Tunnel) []string {
	var out []string
	for _, t := range ts {
		out = append(out, t.ID)
	}
	slices.Sort(out)
	return out
}

// seal builds a datagram as side from would send it to replicator to:
// bound to to's session, under the given header.
func seal(to *Replicator, key []byte, h wire.Header, body func(*wire.Builder)) []byte {
	var w wire.Builder
	w.Start(nil, h)
	w.U64(wire.TSession, 0xfeed)
	w.U64(wire.TPeerSession, to.session)
	body(&w)
	b, err := w.Seal(wire.NewCodec(key))
	if err != nil {
		panic(err)
	}
	return b
}
