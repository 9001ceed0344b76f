package xfrm

import (
	"fmt"
	"net/netip"
	"runtime"
	"testing"

	"github.com/tunneldirector/tunneldirector/internal/cputime"
)

// synthetic returns a node's database with n SAs: n/2 peers, each with
// one CHILD_SA (an inbound and an outbound SA) and its in, fwd and out
// policies for one /27, as a responder running strongSwan holds them.
func synthetic(n int) Snapshot {
	s := Snapshot{Local: []netip.Addr{vip}}
	for i := 0; i < n/2; i++ {
		peer := netip.AddrFrom4([4]byte{100, 64 + byte(i>>16), byte(i >> 8), byte(i)})
		v := uint32(10<<24|128<<16) + uint32(i)*32
		remote := netip.PrefixFrom(netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)}), 27)
		c := child{local: vip, peer: peer, reqid: uint32(i + 1), spiIn: uint32(0x10000 + 2*i), spiOut: uint32(0x10001 + 2*i),
			remote: []netip.Prefix{remote}, localNet: lan}
		s.States = append(s.States, c.states()...)
		s.Policies = append(s.Policies, c.policies(uint32(i+1)*8)...)
	}
	return s
}

func BenchmarkGroup(b *testing.B) {
	for _, n := range []int{10_000, 100_000} {
		s := synthetic(n)
		local := NewLocal(s.Local...)
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			defer cputime.PerOp(b)()
			for b.Loop() {
				if f := Group(local, s.States, s.Policies); f.Summary.SAs != n {
					b.Fatal(f.Summary)
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(n), "ns/SA")
		})
	}
}

// BenchmarkMirrorReset is the grouping part of a full resync.
func BenchmarkMirrorReset(b *testing.B) {
	for _, n := range []int{10_000, 100_000} {
		s := synthetic(n)
		m := NewMirror()
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			defer cputime.PerOp(b)()
			for b.Loop() {
				m.Reset(s)
				m.Changed()
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(n), "ns/SA")
		})
	}
}

// BenchmarkMirrorEvent is one rekey (two SAs in, two out) on a node with
// n SAs: its cost must not grow with n.
func BenchmarkMirrorEvent(b *testing.B) {
	for _, n := range []int{10_000, 100_000} {
		m := NewMirror()
		m.Reset(synthetic(n))
		m.Changed()
		peer := netip.AddrFrom4([4]byte{100, 64, 0, 7})
		c := child{local: vip, peer: peer, reqid: 8, spiIn: 0x90000, spiOut: 0x90001}
		old := c.states()
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			defer cputime.PerOp(b)()
			for i := 0; b.Loop(); i++ {
				c.spiIn, c.spiOut = uint32(0xa0000+2*i), uint32(0xa0001+2*i)
				fresh := c.states()
				for _, sa := range fresh {
					m.Apply(Event{Kind: EventState, SA: sa})
				}
				for _, sa := range old {
					m.Apply(Event{Kind: EventStateGone, SA: sa})
				}
				old = fresh
				if len(m.Changed()) != 1 {
					b.Fatal("rekey changed other peers")
				}
			}
		})
	}
}

// BenchmarkDecodeDump decodes the messages of a 10,000-SA state dump.
func BenchmarkDecodeDump(b *testing.B) {
	s := synthetic(10_000)
	msgs := make([][]byte, len(s.States))
	for i, sa := range s.States {
		msgs[i] = encState(sa)
	}
	b.SetBytes(int64(len(msgs) * len(msgs[0])))
	defer cputime.PerOp(b)()
	for b.Loop() {
		for _, m := range msgs {
			if _, err := decodeState(m); err != nil {
				b.Fatal(err)
			}
		}
	}
}

// TestMirrorMemory reports what a Mirror holds per SA (it runs in the
// normal suite, 0.5 s; it prints, it asserts only a generous bound, so
// that a leak of a whole copy per SA would fail).
func TestMirrorMemory(t *testing.T) {
	if testing.Short() {
		t.Skip("allocates 100,000 SAs")
	}
	const n = 100_000
	s := synthetic(n)
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	m := NewMirror()
	m.Reset(s)
	m.Changed()
	s = Snapshot{}
	runtime.GC()
	runtime.ReadMemStats(&after)
	per := float64(after.HeapAlloc-before.HeapAlloc) / n
	t.Logf("Mirror with %d SAs (%d tunnels, %d policies): %.0f bytes of heap per SA", n, n/2, 3*n/2, per)
	if per > 4096 {
		t.Errorf("%.0f bytes per SA", per)
	}
	runtime.KeepAlive(m)
}
