package nft

import (
	"math/rand/v2"
	"net/netip"
	"testing"
)

// TestElemMapsMatchGoMaps drives PeerMap and SubnetMap and Go maps keyed by
// netip with the same random operations, IPv4 and IPv6 (mapped addresses
// too), and checks they always hold the same content.
func TestElemMapsMatchGoMaps(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	addr := func() netip.Addr {
		switch r.IntN(3) {
		case 0:
			return netip.AddrFrom4([4]byte{10, 0, byte(r.IntN(4)), byte(r.IntN(8))})
		case 1:
			return netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 15: byte(r.IntN(8))})
		}
		return netip.AddrFrom16([16]byte{10: 0xff, 11: 0xff, 12: 10, 15: byte(r.IntN(8))})
	}
	prefix := func() netip.Prefix {
		a := addr()
		return netip.PrefixFrom(a, r.IntN(a.BitLen()+1)).Masked()
	}
	var pm PeerMap
	var sm SubnetMap
	peers, subnets := map[netip.Addr]uint32{}, map[netip.Prefix]uint32{}
	for i := range 20000 {
		a, p, v := addr(), prefix(), uint32(r.IntN(4))
		switch r.IntN(3) {
		case 0:
			_, had := peers[a]
			if added := pm.Set(a, v); added == had {
				t.Fatalf("op %d: Set(%s) added=%v, Go map had it: %v", i, a, added, had)
			}
			peers[a] = v
			_, had = subnets[p]
			if added := sm.Set(p, v); added == had {
				t.Fatalf("op %d: Set(%s) added=%v, Go map had it: %v", i, p, added, had)
			}
			subnets[p] = v
		case 1:
			pm.Delete(a)
			delete(peers, a)
			_, had := subnets[p]
			if removed := sm.Delete(p); removed != had {
				t.Fatalf("op %d: Delete(%s) removed=%v, Go map had it: %v", i, p, removed, had)
			}
			delete(subnets, p)
		case 2:
			gv, gok := peers[a]
			if v, ok := pm.Get(a); ok != gok || v != gv {
				t.Fatalf("op %d: Get(%s) = %d %v, want %d %v", i, a, v, ok, gv, gok)
			}
			gv, gok = subnets[p]
			if v, ok := sm.Get(p); ok != gok || v != gv {
				t.Fatalf("op %d: Get(%s) = %d %v, want %d %v", i, p, v, ok, gv, gok)
			}
		}
	}
	if pm.Len() != len(peers) || sm.Len() != len(subnets) {
		t.Fatalf("lengths %d/%d, want %d/%d", pm.Len(), sm.Len(), len(peers), len(subnets))
	}
	n := 0
	for a, v := range pm.All() {
		if gv, ok := peers[a]; !ok || gv != v {
			t.Fatalf("All yields %s=%d, Go map has %d %v", a, v, gv, ok)
		}
		n++
	}
	for p, v := range sm.All() {
		if gv, ok := subnets[p]; !ok || gv != v {
			t.Fatalf("All yields %s=%d, Go map has %d %v", p, v, gv, ok)
		}
		n++
	}
	if n != len(peers)+len(subnets) {
		t.Fatalf("All yields %d elements, want %d", n, len(peers)+len(subnets))
	}
	c := sm.Clone()
	c.DeleteLens(map[Len]bool{{false, 24}: true, {true, 128}: true})
	for p := range subnets {
		_, ok := c.Get(p)
		if gone := p.Bits() == 24 && p.Addr().Is4() || p.Bits() == 128 && p.Addr().Is6(); ok == gone {
			t.Fatalf("DeleteLens: %s still there: %v", p, ok)
		}
		if _, ok := sm.Get(p); !ok {
			t.Fatalf("Clone shares its maps: %s gone from the original", p)
		}
	}
}

// TestUpdateDeleteAndSetAgain: a key deleted and set again with its old
// value in one delta is deleted and added in the transaction (the plan is
// computed from the model before the target changes).
func TestUpdateDeleteAndSetAgain(t *testing.T) {
	a := netip.MustParseAddr("192.0.2.7")
	pf := netip.MustParsePrefix("10.1.0.0/24")
	model, want := NewState(), NewState()
	for _, s := range []*State{model, want} {
		s.Table = true
		s.Peers.Set(a, 7)
		s.AddSubnet(pf, 7)
	}
	want.SyncLens()
	model.Sig = want.Sig
	p := Update(model, want, Changes{DelPeers: []netip.Addr{a}, SetPeers: map[netip.Addr]uint16{a: 7},
		DelSubnets: []netip.Prefix{pf}, SetSubnets: map[netip.Prefix]uint16{pf: 7}, Value: func(m uint16) uint32 { return uint32(m) }})
	if len(p.DelPeers) != 1 || p.AddPeers.Len() != 1 || len(p.DelSubnets) != 1 || p.AddSubnets.Len() != 1 {
		t.Fatalf("plan deletes %d/%d and adds %d/%d, want each 1", len(p.DelPeers), len(p.DelSubnets), p.AddPeers.Len(), p.AddSubnets.Len())
	}
	if v, ok := want.Peers.Get(a); !ok || v != 7 {
		t.Fatalf("want lost the peer: %d %v", v, ok)
	}
	model.Apply(p)
	if v, ok := model.Subnets.Get(pf); !ok || v != 7 {
		t.Fatalf("model after the plan lost the subnet: %d %v", v, ok)
	}
}

// TestGrowFor: making room for many elements keeps the content and the
// digest sum.
func TestGrowFor(t *testing.T) {
	var m, more PeerMap
	var s, moreS SubnetMap
	for i := range 100 {
		a := netip.AddrFrom4([4]byte{10, 0, 0, byte(i)})
		m.Set(a, uint32(i))
		s.Set(netip.PrefixFrom(a, 32), uint32(i))
	}
	m.Set(netip.MustParseAddr("2001:db8::1"), 7)
	for i := range 5000 {
		more.Set(netip.AddrFrom4([4]byte{11, 0, byte(i >> 8), byte(i)}), 1)
		moreS.Set(netip.PrefixFrom(netip.AddrFrom4([4]byte{11, 0, byte(i >> 8), byte(i)}), 32), 1)
	}
	before, beforeS := m.Clone(), s.Clone()
	m.GrowFor(&more)
	s.GrowFor(&moreS)
	if m.Len() != before.Len() || m.sum != before.sum || s.Len() != beforeS.Len() || s.sum != beforeS.sum {
		t.Fatalf("grown maps differ: %d/%d elements, sums %x/%x", m.Len(), s.Len(), m.sum, s.sum)
	}
	for a, v := range before.All() {
		if got, ok := m.Get(a); !ok || got != v {
			t.Fatalf("%s: %d %v after growing, want %d", a, got, ok, v)
		}
	}
	for p, v := range beforeS.All() {
		if got, ok := s.Get(p); !ok || got != v {
			t.Fatalf("%s: %d %v after growing, want %d", p, got, ok, v)
		}
	}
}
