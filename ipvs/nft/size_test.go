package nft

import (
	"net/netip"
	"testing"
)

func TestMapSize(t *testing.T) {
	for n, want := range map[int]uint32{0: 1024, 682: 1024, 683: 1024, 684: 2048, 1365: 2048, 1366: 4096, 1_000_000: 1 << 21, 1_400_000: 1 << 22} {
		if got := MapSize(n); got != want {
			t.Errorf("MapSize(%d) = %d, want %d", n, got, want)
		}
	}
}

// addPeers adds n IPv4 peers from 100.64.0.0 + from (mark 1) to s.
func addPeers(s map[netip.Addr]uint16, from, n int) {
	for i := from; i < from+n; i++ {
		s[netip.AddrFrom4([4]byte{100, 64 + byte(i>>16), byte(i >> 8), byte(i)})] = 1
	}
}

// TestMapsGrow: a plan that would put more elements into a map than its
// size replaces the table with maps sized for the target (counting only
// its own changes), whether it comes from Update or Diff; a map made
// without a size (by a director before sizing) is left as it is.
func TestMapsGrow(t *testing.T) {
	value := func(m uint16) uint32 { return 0x7d000000 | uint32(m) }
	want := NewState()
	c := Changes{SetPeers: map[netip.Addr]uint16{}, SetSubnets: map[netip.Prefix]uint16{netip.MustParsePrefix("10.0.0.0/27"): 1}, Value: value}
	addPeers(c.SetPeers, 0, 1000)
	model := NewState()
	// The target takes the changes (the model has no table: the plan
	// that creates it is Diff's).
	Update(model, want, c)
	p := Diff(model, want)
	if !p.Recreate || p.Grown || p.Sizes["peers4"] != 2048 || p.Sizes["peers6"] != 1024 || p.Sizes["sub4_27"] != 1024 {
		t.Fatalf("first plan: recreate %v, grown %v, sizes %v; want a recreation with peers4 2048, peers6 1024, sub4_27 1024", p.Recreate, p.Grown, p.Sizes)
	}
	model.Apply(p)
	if model.Sizes["peers4"] != 2048 || len(model.Sizes) != 3 {
		t.Fatalf("model sizes %v", model.Sizes)
	}

	// 1,048 more fit 2,048; 1,049 do not.
	c = Changes{SetPeers: map[netip.Addr]uint16{}, Value: value}
	addPeers(c.SetPeers, 1000, 1049)
	p = Update(model, want, c)
	if a, ch, r := p.Count(); !p.Recreate || !p.Grown || p.Sizes["peers4"] != 4096 || a != 1049 || ch != 0 || r != 0 {
		t.Fatalf("update past the size: recreate %v, grown %v, sizes %v, count +%d ~%d -%d; want a grown recreation counting +1049", p.Recreate, p.Grown, p.Sizes, a, ch, r)
	}
	if p.AddPeers.Len() != 2049 || p.AddSubnets.Len() != 1 {
		t.Fatalf("the recreation carries %d peers and %d subnets, want the whole target (2049, 1)", p.AddPeers.Len(), p.AddSubnets.Len())
	}
	model.Apply(p)
	c = Changes{SetPeers: map[netip.Addr]uint16{}, Value: value}
	addPeers(c.SetPeers, 2049, 10)
	if p = Update(model, want, c); p.Recreate || p.AddPeers.Len() != 10 {
		t.Fatalf("update within the size: recreate %v, %d peers added", p.Recreate, p.AddPeers.Len())
	}
	model.Apply(p)

	// Diff grows a map the same way.
	more := want.Clone()
	for a := range 3000 {
		more.Peers.Set(netip.AddrFrom4([4]byte{100, 100, byte(a >> 8), byte(a)}), value(2))
	}
	if p = Diff(model, more); !p.Recreate || !p.Grown || p.Sizes["peers4"] != 8192 {
		t.Fatalf("diff past the size: recreate %v, grown %v, sizes %v", p.Recreate, p.Grown, p.Sizes)
	}
	if a, _, _ := p.Count(); a != 3000 {
		t.Fatalf("the grown diff counts %d additions, want 3000", a)
	}

	// An unsized map (a table made before sizing) takes any number.
	delete(model.Sizes, "peers4")
	if p = Diff(model, more); p.Recreate {
		t.Fatal("an unsized map was recreated")
	}
}
