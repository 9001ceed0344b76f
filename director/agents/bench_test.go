package agents

import (
	"bytes"
	"fmt"
	"net/netip"
	"path/filepath"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/internal/cputime"
	"github.com/tunneldirector/tunneldirector/store"
	"github.com/tunneldirector/tunneldirector/xfrm"
	"github.com/tunneldirector/tunneldirector/xfrm/report"
)

// The farm of the measurement: 64 nodes with 2,000 SAs each (1,000
// tunnels of one CHILD_SA, two SAs, one /27 each), 64,000 tunnels.
const (
	benchNodes   = 64
	benchTunnels = 1000
)

func benchPeer(node, i int) netip.Addr {
	k := node*benchTunnels + i
	return netip.AddrFrom4([4]byte{100, 64 + byte(k>>16), byte(k >> 8), byte(k)})
}

func benchSubnet(node, i int) netip.Prefix {
	v := uint32(10<<24) + uint32(node*benchTunnels+i)*32
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)}), 27)
}

// benchBodies are the 64 nodes' full reports as they arrive on the wire.
func benchBodies(b *testing.B) [][]byte {
	out := make([][]byte, benchNodes)
	for n := range out {
		ts := make([]xfrm.Tunnel, benchTunnels)
		for i := range ts {
			ts[i] = xfrm.Tunnel{Peer: benchPeer(n, i), Subnets: []netip.Prefix{benchSubnet(n, i)}, SAs: 2, Bytes: 1 << 20, Packets: 1000, LastUse: 1764410400,
				SPIs: []xfrm.SPI{{SPI: 0xc0000000 + uint32(2*i), Reqid: uint32(i + 1), Dir: xfrm.In, Proto: "esp"},
					{SPI: 0xc0000001 + uint32(2*i), Reqid: uint32(i + 1), Dir: xfrm.Out, Proto: "esp"}}}
		}
		r := &report.Report{Version: report.Version, Kind: report.KindFull, Node: fmt.Sprintf("node-%02d", n), Session: "0123456789abcdef0123456789abcdef",
			Seq: 1, Sent: time.Unix(1764410400, 0), Tunnels: ts, Summary: xfrm.Summary{SAs: 2 * benchTunnels, Tunnels: benchTunnels}}
		var err error
		if out[n], err = report.Marshal(r); err != nil {
			b.Fatal(err)
		}
	}
	return out
}

// benchStore is a store with the 64 nodes and, when known, every tunnel
// on the node that reports it (an NMS import of the same farm).
func benchStore(b *testing.B, known bool) *store.Store {
	st, err := store.Open(store.Options{Path: filepath.Join(b.TempDir(), "td.db")})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { st.Close() })
	var cs []affinity.Change
	for n := range benchNodes {
		cs = append(cs, affinity.Change{Kind: affinity.PutNode, Node: &affinity.Node{Name: fmt.Sprintf("node-%02d", n), Addr: netip.AddrFrom4([4]byte{172, 16, 1, byte(n + 1)})}})
	}
	if known {
		for n := range benchNodes {
			for i := range benchTunnels {
				cs = append(cs, affinity.Change{Kind: affinity.PutTunnel, Tunnel: &affinity.Tunnel{ID: fmt.Sprintf("t-%d-%d", n, i), Peer: benchPeer(n, i),
					Subnets: []netip.Prefix{benchSubnet(n, i)}, Node: fmt.Sprintf("node-%02d", n), Pinned: true}})
			}
		}
	}
	if _, err := st.Commit(cs); err != nil {
		b.Fatal(err)
	}
	return st
}

// mergeFarm is the director's whole cost of 64 full reports (a takeover,
// or the first start of the agents): decode, accept, plan, commit.
func mergeFarm(b *testing.B, st *store.Store, bodies [][]byte, now time.Time) *Plan {
	cfg := DefaultConfig()
	cfg.TokenDir = "x"
	m := NewMerger(cfg)
	for n, body := range bodies {
		r, err := report.Decode(bytes.NewReader(body), report.Limits{})
		if err != nil {
			b.Fatal(err)
		}
		if _, err := m.Accept(fmt.Sprintf("node-%02d", n), r, now); err != nil {
			b.Fatal(err)
		}
	}
	var p *Plan
	_, err := st.Do(func(t *affinity.Table) ([]affinity.Change, error) {
		p = m.Plan(t, now, true)
		return p.Changes, nil
	})
	if err != nil {
		b.Fatal(err)
	}
	return p
}

// BenchmarkMergeFarm: 64 nodes x 2,000 SAs reach a director.
//   - known: the table already holds every tunnel on its node (a
//     takeover): nothing to change, the cost of looking;
//   - learn: the table holds none (agents deployed on a running farm):
//     64,000 tunnels learned with their subnets in one transaction.
func BenchmarkMergeFarm(b *testing.B) {
	bodies := benchBodies(b)
	b.Run("known", func(b *testing.B) {
		st := benchStore(b, true)
		defer cputime.PerOp(b)()
		for b.Loop() {
			if p := mergeFarm(b, st, bodies, time.Unix(1764410400, 0)); len(p.Changes) != 0 {
				b.Fatalf("%d changes on a farm the table already matches", len(p.Changes))
			}
		}
	})
	b.Run("learn", func(b *testing.B) {
		defer cputime.PerOp(b)()
		for b.Loop() {
			b.StopTimer()
			st := benchStore(b, false)
			b.StartTimer()
			if p := mergeFarm(b, st, bodies, time.Unix(1764410400, 0)); p.Learned != benchNodes*benchTunnels {
				b.Fatalf("learned %d", p.Learned)
			}
			b.StopTimer()
			st.Close()
			b.StartTimer()
		}
	})
}

// BenchmarkMergeSteady: with the farm merged, one delta (one tunnel's
// CHILD_SA rekeyed with a new subnet) and a sweep, the two things a
// running master does all the time.
func BenchmarkMergeSteady(b *testing.B) {
	st := benchStore(b, false)
	now := time.Unix(1764410400, 0)
	cfg := DefaultConfig()
	cfg.TokenDir = "x"
	m := NewMerger(cfg)
	for n, body := range benchBodies(b) {
		r, _ := report.Decode(bytes.NewReader(body), report.Limits{})
		m.Accept(fmt.Sprintf("node-%02d", n), r, now)
	}
	commit := func(sweep bool) *Plan {
		var p *Plan
		if _, err := st.Do(func(t *affinity.Table) ([]affinity.Change, error) {
			p = m.Plan(t, now, sweep)
			return p.Changes, nil
		}); err != nil {
			b.Fatal(err)
		}
		return p
	}
	commit(true)
	b.Run("delta", func(b *testing.B) {
		defer cputime.PerOp(b)()
		seq := uint64(1)
		for i := 0; b.Loop(); i++ {
			seq++
			tu := xfrm.Tunnel{Peer: benchPeer(7, 7), SAs: 2, Subnets: []netip.Prefix{benchSubnet(7, 7), netip.PrefixFrom(netip.AddrFrom4([4]byte{172, 20, byte(i >> 8), byte(i)}), 32)}}
			r := &report.Report{Version: report.Version, Kind: report.KindDelta, Node: "node-07", Session: "0123456789abcdef0123456789abcdef", Seq: seq, Tunnels: []xfrm.Tunnel{tu}}
			if _, err := m.Accept("node-07", r, now); err != nil {
				b.Fatal(err)
			}
			if p := commit(false); len(p.Changes) != 1 {
				b.Fatalf("%d changes", len(p.Changes))
			}
		}
	})
	b.Run("sweep", func(b *testing.B) {
		defer cputime.PerOp(b)()
		for b.Loop() {
			commit(true)
		}
	})
}
