package ctsync

import (
	"context"
	"fmt"
	"maps"
	"net/netip"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/director/replication"
	"github.com/tunneldirector/tunneldirector/internal/clock"
	"github.com/tunneldirector/tunneldirector/ipvs/conntrack"
	"github.com/tunneldirector/tunneldirector/store"
)

// fakeTable is a kernel conntrack table in memory: what Commit writes,
// Dump reads; SetTimeout and the calls are recorded.
type fakeTable struct {
	mu       sync.Mutex
	flows    map[key]conntrack.Flow
	commits  int
	timeouts map[key]uint32
}

func newFakeTable() *fakeTable {
	return &fakeTable{flows: map[key]conntrack.Flow{}, timeouts: map[key]uint32{}}
}

func (f *fakeTable) Events(ctx context.Context, fn func(*conntrack.Event)) error {
	<-ctx.Done()
	return ctx.Err()
}

func (f *fakeTable) Dump(ctx context.Context, fn func(*conntrack.Flow) error) error {
	f.mu.Lock()
	fs := slices.Collect(maps.Values(f.flows))
	f.mu.Unlock()
	for i := range fs {
		if err := fn(&fs[i]); err != nil {
			return err
		}
	}
	return nil
}

func (f *fakeTable) Commit(ctx context.Context, flows []conntrack.Flow, o conntrack.CommitOptions) (conntrack.CommitResult, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.commits++
	for _, fl := range flows {
		f.flows[keyOf(&fl)] = fl
	}
	return conntrack.CommitResult{Committed: len(flows)}, nil
}

func (f *fakeTable) SetTimeout(ctx context.Context, flows []conntrack.Flow, timeout uint32) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, fl := range flows {
		k := keyOf(&fl)
		if e, ok := f.flows[k]; ok {
			e.Timeout = timeout
			f.flows[k] = e
			f.timeouts[k] = timeout
			n++
		}
	}
	return n, nil
}

func (f *fakeTable) put(fl conntrack.Flow) {
	f.mu.Lock()
	f.flows[keyOf(&fl)] = fl
	f.mu.Unlock()
}

func (f *fakeTable) del(fl conntrack.Flow) {
	f.mu.Lock()
	delete(f.flows, keyOf(&fl))
	f.mu.Unlock()
}

var (
	epoch0  = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	testKey = []byte("0123456789abcdef-ctsync-test-key")
	subnet  = netip.MustParsePrefix("10.70.0.0/16")
	server  = netip.MustParseAddr("198.18.1.100")
)

// testScope covers the protected subnet 10.70.0.0/16 and the VIP.
var testScope = ScopeFunc(func(a netip.Addr) bool {
	return subnet.Contains(a) || a == netip.MustParseAddr("203.0.113.1")
})

// flowN is the n-th test flow: established TCP from the server to a host
// in the protected subnet.
func flowN(n int) conntrack.Flow {
	var f conntrack.Flow
	f.Orig = conntrack.MakeTuple(conntrack.ProtoTCP, server, netip.AddrFrom4([4]byte{10, 70, byte(n >> 8), byte(n)}), uint16(10000+n%50000), 22)
	f.Reply = f.Orig.Inverse()
	f.Status = conntrack.StatusSeenReply | conntrack.StatusAssured | conntrack.StatusConfirmed
	f.TCP = conntrack.TCPInfo{Set: true, State: conntrack.TCPEstablished, FlagsOrig: 3, FlagsReply: 3, WScaleOrig: 7, WScaleReply: 7}
	f.Timeout = 432000
	return f
}

// pair is two directors' replicators and syncers over a lossy in-memory
// link, stepped in one goroutine on a manual clock.
type pair struct {
	t   testing.TB
	clk *clock.Manual
	net *replication.FakeNetwork
	ep  [2]*replication.FakeEndpoint
	r   [2]*replication.Replicator
	s   [2]*Syncer
	tab [2]*fakeTable
	buf []byte
}

func newPair(t testing.TB, fc replication.FakeConfig, mod func(*Config, *replication.Config)) *pair {
	t.Helper()
	p := &pair{t: t, clk: clock.NewManual(epoch0)}
	p.net, p.ep[0], p.ep[1] = replication.NewFakeNetwork(fc, p.clk)
	dir := t.TempDir()
	for i := range 2 {
		st, err := store.Open(store.Options{Path: filepath.Join(dir, fmt.Sprintf("d%d.db", i)), Table: affinity.Options{Now: func() time.Time { return epoch0 }}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { st.Close() })
		cfg := DefaultConfig()
		rc := replication.Config{ID: uint32(i + 1), Key: testKey, Store: st, Transport: p.ep[i], Clock: p.clk, CTQueueBytes: 64 << 20}
		if mod != nil {
			mod(&cfg, &rc)
		}
		p.tab[i] = newFakeTable()
		p.s[i] = New(Options{Config: cfg, Table: p.tab[i], Scope: testScope, Clock: p.clk})
		rc.CT = p.s[i]
		r, err := replication.New(rc)
		if err != nil {
			t.Fatal(err)
		}
		p.s[i].Attach(r)
		p.r[i] = r
	}
	p.setRoles(replication.RoleMaster, replication.RoleBackup)
	return p
}

func (p *pair) setRoles(a, b replication.Role) {
	for i, role := range []replication.Role{a, b} {
		p.r[i].SetRole(role)
		p.s[i].SetRole(context.Background(), role)
	}
}

// step advances the clock a millisecond and lets everything due happen:
// deliveries, replicator timers, and the master's resync if one is asked
// for (the dumper's job, run here in the test's goroutine).
func (p *pair) step() {
	p.clk.Advance(time.Millisecond)
	p.net.Settle(64, func(i int, b []byte) { p.r[i].HandleDatagram(b) })
	for i := range 2 {
		select {
		case <-p.s[i].dumpReq:
			if err := p.s[i].fullResync(context.Background()); err != nil {
				p.t.Fatal(err)
			}
		default:
		}
		p.r[i].Tick()
	}
}

// event hands the master's syncer a kernel event and applies it to the
// master's fake table, as the kernel would have.
func (p *pair) event(typ conntrack.EventType, f conntrack.Flow) {
	switch typ {
	case conntrack.EventDestroy:
		p.tab[0].del(f)
	default:
		p.tab[0].put(f)
	}
	p.s[0].handleEvent(&conntrack.Event{Type: typ, Flow: f}, &p.buf)
}

// want is the master table's synced flows, by key.
func (p *pair) want(i int) map[key]conntrack.Flow {
	out := map[key]conntrack.Flow{}
	p.tab[i].mu.Lock()
	defer p.tab[i].mu.Unlock()
	for k, f := range p.tab[i].flows {
		if p.s[i].filt.Match(&f) {
			out[k] = f
		}
	}
	return out
}

// cacheMatches reports whether backup i's cache holds exactly master
// m's synced flows, with their state.
func (p *pair) cacheMatches(b, m int) error {
	want := p.want(m)
	got := map[key]conntrack.Flow{}
	for _, f := range p.s[b].cache.Flows(0) {
		got[keyOf(&f)] = f
	}
	if len(got) != len(want) {
		return fmt.Errorf("cache holds %d flows, master %d", len(got), len(want))
	}
	for k, w := range want {
		g, ok := got[k]
		if !ok {
			return fmt.Errorf("cache lacks %v", &w)
		}
		if g.Reply != w.Reply || g.Status != w.Status || g.TCP != w.TCP || g.Mark != w.Mark {
			return fmt.Errorf("cache holds %v, master %v", &g, &w)
		}
	}
	return nil
}

// settle steps until backup b's cache matches master m's table.
func (p *pair) settle(b, m int, limit time.Duration) error {
	var err error
	for d := time.Duration(0); d < limit; d += time.Millisecond {
		p.step()
		if err = p.cacheMatches(b, m); err == nil {
			return nil
		}
	}
	return err
}
