package agents

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/xfrm"
	"github.com/tunneldirector/tunneldirector/xfrm/report"
)

// FuzzMerge drives the merge with arbitrary agents' facts over a table of
// NMS and learned tunnels: peers and subnets drawn from small ranges so
// that they collide (shared peers, overlapping and nested subnets, a
// subnet holding the VIP, more than 64 subnets), nodes down, time moving.
// Every plan must commit as it is: the merge checks what it proposes, so
// the table never has to refuse (and Drop never runs); and once a sweep
// has committed, another at the same time changes nothing.
func FuzzMerge(f *testing.F) {
	f.Add([]byte("\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x0b\x0c"))
	f.Add([]byte("\x00\x10\x20\x30\x40\x50\x60\x70\x80\x90\xa0\xb0\xc0\xd0\xe0\xf0\xff\xfe\xfd"))
	f.Add([]byte("\xff\xff\xff\xff\x00\x00\x00\x00\x11\x22\x33\x44\x55\x66\x77\x88\x99\xaa\xbb\xcc\xdd\xee"))
	f.Fuzz(func(t *testing.T, b []byte) {
		next := func() byte {
			if len(b) == 0 {
				return 0
			}
			v := b[0]
			b = b[1:]
			return v
		}
		now := time.Date(2026, 11, 29, 12, 0, 0, 0, time.UTC)
		tab, err := affinity.New(affinity.Options{VIPs: []netip.Addr{netip.MustParseAddr("10.0.0.1")}, Now: func() time.Time { return now }})
		if err != nil {
			t.Fatal(err)
		}
		nodes := []string{"n0", "n1", "n2"}
		for i, n := range nodes {
			st := affinity.NodeActive
			if next()%5 == 0 {
				st = affinity.NodeDown
			}
			if _, err := tab.Apply([]affinity.Change{{Kind: affinity.PutNode, Node: &affinity.Node{Name: n, Addr: netip.AddrFrom4([4]byte{172, 16, 0, byte(i + 1)}), State: st}}}); err != nil {
				t.Fatal(err)
			}
		}
		peer := func(v byte) netip.Addr { return netip.AddrFrom4([4]byte{192, 0, 2, 1 + v%8}) }
		subnet := func(v byte) netip.Prefix {
			bits := 8 + int(v%4)*8 // /8 (holds the VIP), /16, /24, /32
			return netip.PrefixFrom(netip.AddrFrom4([4]byte{10, v >> 5 & 3, v >> 3 & 3, v & 1}), bits).Masked()
		}
		// Some NMS tunnels first (those the table takes).
		for i := range int(next() % 4) {
			tu := &affinity.Tunnel{ID: fmt.Sprintf("nms-%d", i), Peer: peer(next()), Subnets: []netip.Prefix{subnet(next())}, Node: nodes[next()%3], Pinned: next()%2 == 0}
			tab.Apply([]affinity.Change{{Kind: affinity.PutTunnel, Tunnel: tu}})
		}
		cfg := DefaultConfig()
		cfg.TokenDir, cfg.Hold, cfg.LearnedTTL = "x", 3*time.Second, time.Minute
		if next()%2 == 0 {
			cfg.Adopt = AdoptFollowSA
		}
		m := NewMerger(cfg)
		seq := map[string]uint64{}
		for round := 0; len(b) > 0 && round < 16; round++ {
			node := nodes[next()%3]
			var ts []xfrm.Tunnel
			for range int(next() % 4) {
				tu := xfrm.Tunnel{Peer: peer(next()), SAs: 2, LastUse: int64(next())}
				for range int(next()%3) + int(next()/200)*70 {
					tu.Subnets = append(tu.Subnets, subnet(next()))
				}
				ts = append(ts, tu)
			}
			seq[node]++
			r := &report.Report{Version: report.Version, Kind: report.KindFull, Node: node, Session: "s", Seq: 1, Tunnels: ts}
			if seq[node] > 1 && next()%2 == 0 {
				r.Kind, r.Seq = report.KindDelta, seq[node]
			} else {
				seq[node] = 1
			}
			if _, err := m.Accept(node, r, now); err != nil {
				t.Fatal(err)
			}
			now = now.Add(time.Duration(next()) * 100 * time.Millisecond)
			// A plan (a sweep or not), then a sweep: both commit; a
			// third at the same time finds nothing left to do.
			for _, sweep := range []bool{next()%2 == 0, true} {
				// As the daemon does: again at once while a plan freed
				// subnets it refused to others.
				for again, n := true, 0; again; n++ {
					if n == 3 {
						t.Fatalf("round %d: still planning again after 3 passes", round)
					}
					p := m.Plan(tab, now, sweep)
					if _, err := tab.Apply(p.Changes); err != nil {
						t.Fatalf("round %d: the table refused the merge's batch: %v\nbatch: %+v", round, err, p.Changes)
					}
					m.Done(p, 0, nil)
					again = p.Again
				}
			}
			if p := m.Plan(tab, now, true); len(p.Changes) != 0 {
				for _, c := range p.Changes {
					t.Logf("%s %+v", c.Reason, c.Tunnel)
				}
				t.Fatalf("round %d: a second plan at the same time changed %d tunnels", round, len(p.Changes))
			}
		}
	})
}
