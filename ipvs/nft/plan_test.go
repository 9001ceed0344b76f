package nft

import (
	"maps"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"
)

// TestUpdateDigest: the digest an Update's plan carries (from the values
// Update looked up) is the one WithDigest computes by looking every deleted
// element up again, and the model's own digest once the plan is applied;
// the model then holds want's maps. A second model shares its target's
// maps (Share, ApplyTo), as the dataplane's does: its plans carry the same
// digest and the same left marks as the first's, whose maps are its own.
// Random deltas of moves, new keys, deletions, keys deleted and set again
// in one delta, with and without a length appearing or going.
func TestUpdateDigest(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	peer := func(i int) netip.Addr { return netip.AddrFrom4([4]byte{100, 64, byte(i >> 8), byte(i)}) }
	subnet := func(i int) netip.Prefix {
		bits := 24 + i%4 // lengths 24-27, so a length can appear and go
		return netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i >> 8), byte(i), 0}), bits).Masked()
	}
	value := func(m uint16) uint32 { return 0x7d000000 | uint32(m) }
	model, want, swant := NewState(), NewState(), NewState()
	model.Table = true
	for i := range 300 {
		for _, s := range []*State{model, want, swant} {
			s.Peers.Set(peer(i), value(uint16(i%4)))
			s.AddSubnet(subnet(i), value(uint16(i%4)))
		}
	}
	for _, s := range []*State{model, want, swant} {
		s.Peers.Set(peer(1000), value(9))
	}
	model.Stored, model.HasStored = model.Digest(), true
	// The same kernel, as a model sharing its target's maps.
	shared := model.Clone()
	shared.Share(swant)
	for round := range 200 {
		c := Changes{SetPeers: map[netip.Addr]uint16{}, SetSubnets: map[netip.Prefix]uint16{}, Value: value}
		// A subnet alone at its length: its map appears and goes.
		lone := netip.MustParsePrefix("172.16.0.0/20")
		switch rng.IntN(3) {
		case 0:
			c.SetSubnets[lone] = uint16(rng.IntN(4))
		case 1:
			c.DelSubnets = append(c.DelSubnets, lone)
		}
		for range rng.IntN(40) {
			i := rng.IntN(400) // some keys new
			switch rng.IntN(4) {
			case 0:
				c.DelPeers = append(c.DelPeers, peer(i))
				c.DelSubnets = append(c.DelSubnets, subnet(i))
			default: // a move, a new key, or the same value again
				c.SetPeers[peer(i)] = uint16(rng.IntN(4))
				c.SetSubnets[subnet(i)] = uint16(rng.IntN(4))
			}
		}
		if round == 100 {
			// Enough new peers for the target's map to be replaced by a
			// larger one (GrowFor), and the first IPv6 peer (a map made
			// on first use): the sharing model keeps its old maps until
			// ApplyTo.
			for i := range 1100 {
				c.SetPeers[netip.AddrFrom4([4]byte{198, 18, byte(i >> 8), byte(i)})] = uint16(i % 4)
			}
			c.SetPeers[netip.MustParseAddr("2001:db8::7")] = 2
		}
		if rng.IntN(4) == 0 {
			// The only peer at mark 9, deleted and set again with
			// its value in one delta: it leaves no node.
			c.DelPeers = append(c.DelPeers, peer(1000))
			c.SetPeers[peer(1000)] = 9
		}
		p := Update(model, want, c)
		p.WithDigest(model)
		// The same plan without what Update knew: WithDigest's own look-ups.
		again := *p
		again.update, again.Digest = nil, nil
		again.WithDigest(model)
		if (p.Digest == nil) != (again.Digest == nil) || p.Digest != nil && *p.Digest != *again.Digest {
			t.Fatalf("round %d: digest from Update's values %v, from looking them up %v", round, p.Digest, again.Digest)
		}
		// The nodes the plan's peers leave, from the model's own maps.
		left := map[uint32]struct{}{}
		for _, a := range p.DelPeers {
			fm, _ := model.Peers.Get(a)
			if nm, ok := p.AddPeers.Get(a); !ok || nm != fm {
				left[fm] = struct{}{}
			}
		}
		if !maps.Equal(p.Left, left) {
			t.Fatalf("round %d: left %v, want %v", round, p.Left, left)
		}
		sp := Update(shared, swant, c)
		sp.WithDigest(shared)
		if (sp.Digest == nil) != (p.Digest == nil) || sp.Digest != nil && *sp.Digest != *p.Digest || !maps.Equal(sp.Left, left) {
			t.Fatalf("round %d: sharing the target's maps: digest %v, left %v; with maps of its own: %v, %v", round, sp.Digest, sp.Left, p.Digest, left)
		}
		model.Apply(p)
		shared.ApplyTo(sp, swant)
		for _, m := range []*State{model, shared} {
			if m.Stored != m.Digest() {
				t.Fatalf("round %d: stored digest %+v, the model's maps %+v", round, m.Stored, m.Digest())
			}
		}
		if !shared.SharesMaps(swant) || !maps.Equal(shared.Lens, model.Lens) || !slices.Equal(shared.Sig.Lens, model.Sig.Lens) {
			t.Fatalf("round %d: the sharing model: shares %v, lengths %v %v, want %v %v", round, shared.SharesMaps(swant), shared.Lens, shared.Sig.Lens, model.Lens, model.Sig.Lens)
		}
		if model.Digest() != want.Digest() || model.Peers.Len() != want.Peers.Len() || model.Subnets.Len() != want.Subnets.Len() {
			t.Fatalf("round %d: model %+v (%d peers, %d subnets), want %+v (%d, %d)", round,
				model.Digest(), model.Peers.Len(), model.Subnets.Len(), want.Digest(), want.Peers.Len(), want.Subnets.Len())
		}
		for k, v := range want.Subnets.All() {
			if mv, ok := model.Subnets.Get(k); !ok || mv != v {
				t.Fatalf("round %d: subnet %s: model %#x %v, want %#x", round, k, mv, ok, v)
			}
			if mv, ok := shared.Subnets.Get(k); !ok || mv != v {
				t.Fatalf("round %d: subnet %s: sharing model %#x %v, want %#x", round, k, mv, ok, v)
			}
		}
		if d := Diff(shared, swant); !d.Empty() {
			t.Fatalf("round %d: a model sharing its target's maps differs from it: %+v", round, d)
		}
	}
}
