package xfrm

import (
	"net/netip"
	"reflect"
	"slices"
	"testing"
)

// fuzzPools keep the random sets small enough that addresses, SPIs and
// policy indexes collide often: the interesting cases.
var (
	fuzzAddrs = []netip.Addr{vip, vip6, addr4("198.51.100.1"), addr4("198.51.100.2"), addr4("203.0.113.9"),
		netip.MustParseAddr("2001:db8:100::1"), netip.MustParseAddr("2001:db8:100::2"), addr4("0.0.0.0"), addr4("10.0.0.1")}
	fuzzNets = pfx("172.16.1.0/24", "172.16.2.0/24", "0.0.0.0/0", "fd00::/8", "2001:db8:1::/48", "10.0.0.0/16")
)

type byteReader struct {
	b []byte
	i int
}

func (r *byteReader) next() byte {
	if r.i >= len(r.b) {
		return 0
	}
	r.i++
	return r.b[r.i-1]
}

func (r *byteReader) more() bool { return r.i < len(r.b) }

// randomSets decodes fuzz bytes into states and policies.
func randomSets(b []byte) ([]SA, []Policy) {
	r := &byteReader{b: b}
	var sas []SA
	var pols []Policy
	for r.more() {
		op := r.next()
		if op%3 != 0 {
			sa := SA{
				Src: fuzzAddrs[int(r.next())%len(fuzzAddrs)], Dst: fuzzAddrs[int(r.next())%len(fuzzAddrs)],
				Proto: []Proto{ProtoESP, ProtoESP, ProtoAH, ProtoComp}[r.next()%4],
				SPI:   uint32(r.next() % 8), Reqid: uint32(r.next() % 4), Mode: Mode(r.next() % 2),
				Larval: r.next()%7 == 0, Bytes: uint64(r.next()) << 40, Packets: uint64(r.next()), UseTime: uint64(r.next()),
			}
			if e := r.next(); e%3 == 0 {
				sa.Encap = Encap{Type: 2, SrcPort: uint16(e), DstPort: 4500}
			}
			sas = append(sas, sa)
			continue
		}
		p := Policy{
			Index: uint32(r.next()%16) * 8, Dir: Dir(r.next() % 4), Action: r.next() % 5 / 4,
			Src: fuzzNets[int(r.next())%len(fuzzNets)], Dst: fuzzNets[int(r.next())%len(fuzzNets)],
		}
		p.Index += uint32(p.Dir)
		for n := r.next() % 3; n > 0; n-- {
			p.Tmpls = append(p.Tmpls, Template{Src: fuzzAddrs[int(r.next())%len(fuzzAddrs)], Dst: fuzzAddrs[int(r.next())%len(fuzzAddrs)],
				Proto: ProtoESP, Mode: Mode(r.next() % 2), Reqid: uint32(r.next() % 4)})
		}
		pols = append(pols, p)
	}
	return sas, pols
}

// FuzzGroup checks the grouping's invariants on random state and policy
// sets: every state is counted exactly once, no subnet is attributed to a
// peer without a policy pointing at it, the output does not depend on the
// input's order, and a Mirror fed the same content as events agrees with
// Group after every batch.
func FuzzGroup(f *testing.F) {
	f.Add([]byte{1, 2, 0, 0, 1, 1, 0, 0, 9, 9, 9, 3, 1, 0, 2, 0, 0, 1, 0, 0, 9, 9, 9, 3, 0, 1, 0, 0, 0, 1, 2, 0, 1, 1})
	f.Add([]byte{4, 5, 1, 0, 3, 1, 1, 0, 0, 0, 0, 7, 3, 6, 1, 1, 2, 1, 0, 2, 1, 1, 3, 3, 2, 2, 2, 0, 1, 5, 1, 6, 1, 1})
	f.Add([]byte("a slightly longer seed that makes many states and a few policies 0123456789"))
	f.Fuzz(func(t *testing.T, b []byte) {
		sas, pols := randomSets(b)
		local := NewLocal(vip, vip6, addr4("10.0.0.1"))
		got := Group(local, sas, pols)

		// Every state counted once.
		total := 0
		for _, tn := range got.Tunnels {
			if tn.SAs < 1 || tn.SAs != len(tn.SPIs) {
				t.Fatalf("tunnel %v: %d SAs, %d SPIs", tn.Peer, tn.SAs, len(tn.SPIs))
			}
			total += tn.SAs
		}
		s := got.Summary
		if total != s.SAs || s.SAs+s.Unattributed+s.Ignored != len(sas) || s.Tunnels != len(got.Tunnels) {
			t.Fatalf("summary %+v, tunnel SAs %d, states %d", s, total, len(sas))
		}
		// No subnet without a policy pointing at its peer (checked here
		// without the package's own helpers).
		for _, tn := range got.Tunnels {
			for _, sub := range tn.Subnets {
				found := false
				for _, p := range pols {
					if p.Action != 0 || p.Dir > DirFwd {
						continue
					}
					remote := p.Src
					if p.Dir == DirOut {
						remote = p.Dst
					}
					for _, tm := range p.Tmpls {
						end := tm.Src
						if p.Dir == DirOut {
							end = tm.Dst
						}
						if tm.Mode == ModeTunnel && end == tn.Peer && remote == sub {
							found = true
						}
					}
				}
				if !found {
					t.Fatalf("subnet %v attributed to %v without a tunnel-mode policy pointing at it", sub, tn.Peer)
				}
			}
		}
		// Order does not matter.
		rs, rp := slices.Clone(sas), slices.Clone(pols)
		slices.Reverse(rs)
		slices.Reverse(rp)
		if again := Group(local, rs, rp); !reflect.DeepEqual(again, got) {
			t.Fatalf("reversed input changed the result:\n%+v\n%+v", got, again)
		}

		// The kernel holds one state per key and one policy per index:
		// the last write wins, as events do.
		m := NewMirror()
		m.Reset(Snapshot{Local: []netip.Addr{vip, vip6, addr4("10.0.0.1")}})
		var ks []SA
		var kp []Policy
		for _, sa := range sas {
			m.Apply(Event{Kind: EventState, SA: sa})
			ks = slices.DeleteFunc(ks, func(x SA) bool { return x.key() == sa.key() })
			ks = append(ks, sa)
		}
		for _, p := range pols {
			m.Apply(Event{Kind: EventPolicy, Policy: p})
			kp = slices.DeleteFunc(kp, func(x Policy) bool { return x.key() == p.key() })
			kp = append(kp, p)
		}
		if mf, gf := m.Facts(), Group(local, ks, kp); !reflect.DeepEqual(mf, gf) {
			t.Fatalf("mirror after adds:\n%+v\nGroup:\n%+v", mf, gf)
		}
		// Delete every other state and policy.
		for i := 0; i < len(ks); i += 2 {
			m.Apply(Event{Kind: EventStateGone, SA: SA{Dst: ks[i].Dst, SPI: ks[i].SPI, Proto: ks[i].Proto}})
		}
		for i := 0; i < len(kp); i += 2 {
			m.Apply(Event{Kind: EventPolicyGone, Policy: Policy{Index: kp[i].Index, Dir: kp[i].Dir}})
		}
		var ks2 []SA
		var kp2 []Policy
		for i := 1; i < len(ks); i += 2 {
			ks2 = append(ks2, ks[i])
		}
		for i := 1; i < len(kp); i += 2 {
			kp2 = append(kp2, kp[i])
		}
		if mf, gf := m.Facts(), Group(local, ks2, kp2); !reflect.DeepEqual(mf, gf) {
			t.Fatalf("mirror after deletes:\n%+v\nGroup:\n%+v", mf, gf)
		}
		// A reset to the same content reports nothing changed.
		m.Changed()
		m.Reset(Snapshot{Local: []netip.Addr{vip, vip6, addr4("10.0.0.1")}, States: ks2, Policies: kp2})
		if c := m.Changed(); len(c) != 0 {
			t.Fatalf("reset to the same content changed %v", c)
		}
	})
}
