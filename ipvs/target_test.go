package ipvs

import (
	"net/netip"
	"testing"

	"github.com/tunneldirector/tunneldirector/ipvs/nft"
)

// TestTargetFillsMapsInParallel: a target of more than parallelPeers
// peers, walked from Marks as the daemon gives them, holds every peer and
// subnet with its owner's fwmark; and a peer of an unknown node is still
// refused.
func TestTargetFillsMapsInParallel(t *testing.T) {
	c, err := Config{}.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	n := parallelPeers + fillBatch + 17 // several batches and a partial one
	d := bigDesiredNodes(n, 3)
	walked := *d
	walked.Peers, walked.Subnets = nil, nil
	walked.MarksPeers, walked.MarksSubnets = len(d.Peers), len(d.Subnets)
	walked.Marks = func(peer func(netip.Addr, uint16), subnet func(netip.Prefix, uint16)) {
		for a, m := range d.Peers {
			peer(a, m)
		}
		for p, m := range d.Subnets {
			subnet(p, m)
		}
	}
	k, err := c.target(ModeRouteOnly, &walked)
	if err != nil {
		t.Fatal(err)
	}
	if k.nft.Peers.Len() != n || k.nft.Digest().N != uint64(2*n) {
		t.Fatalf("target holds %d peers and %d elements, want %d and %d", k.nft.Peers.Len(), k.nft.Digest().N, n, 2*n)
	}
	for a, m := range d.Peers {
		if got, ok := k.nft.Peers.Get(a); !ok || got != c.Fwmark(m) {
			t.Fatalf("peer %s: %#x %v, want %#x", a, got, ok, c.Fwmark(m))
		}
	}
	for p, m := range d.Subnets {
		if got, ok := k.nft.Subnets.Get(p); !ok || got != c.Fwmark(m) {
			t.Fatalf("subnet %s: %#x %v, want %#x", p, got, ok, c.Fwmark(m))
		}
	}
	if lens := k.nft.Sig.Lens; len(lens) != 1 || lens[0] != (nft.Len{Bits: 27}) {
		t.Fatalf("target lengths %v, want the one /27 map", lens)
	}
	bad := *d
	bad.Peers = map[netip.Addr]uint16{}
	for a := range d.Peers {
		bad.Peers[a] = 1
	}
	bad.Peers[netip.MustParseAddr("192.0.2.77")] = 9
	if _, err := c.target(ModeRouteOnly, &bad); err == nil {
		t.Fatal("a peer of mark 9 (no node) was accepted")
	}
}

// TestTargetKeyTwice: a key met twice while a target fills its maps (two
// spellings of one subnet, or a peer repeated by a Desired's walk) holds
// its last value, counts once, and the digest is that of the maps as
// Set would have made them: Fill skips the look-up that keeps the sum,
// so the sum is recounted.
func TestTargetKeyTwice(t *testing.T) {
	c, err := Config{}.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range []int{100, parallelPeers + 5} {
		d := bigDesiredNodes(n, 3)
		var somePeer netip.Addr
		for a := range d.Peers {
			somePeer = a
			break
		}
		walked := *d
		walked.Peers, walked.Subnets = nil, nil
		walked.MarksPeers, walked.MarksSubnets = len(d.Peers), len(d.Subnets)
		again := netip.MustParsePrefix("10.200.0.0/24")
		walked.Marks = func(peer func(netip.Addr, uint16), subnet func(netip.Prefix, uint16)) {
			subnet(netip.MustParsePrefix("10.200.0.9/24"), 1) // unmasked: the same map key
			for a, m := range d.Peers {
				peer(a, m)
			}
			for p, m := range d.Subnets {
				subnet(p, m)
			}
			peer(somePeer, 3)
			subnet(again, 2)
		}
		k, err := c.target(ModeRouteOnly, &walked)
		if err != nil {
			t.Fatal(err)
		}
		ref := nft.NewState()
		for a, m := range d.Peers {
			ref.Peers.Set(a, c.Fwmark(m))
		}
		ref.Peers.Set(somePeer, c.Fwmark(3))
		for p, m := range d.Subnets {
			ref.AddSubnet(p, c.Fwmark(m))
		}
		ref.AddSubnet(again, c.Fwmark(2))
		if got, want := k.nft.Digest(), ref.Digest(); got != want {
			t.Fatalf("%d peers: target digest %+v, want %+v (the maps as Set makes them)", n, got, want)
		}
		if v, _ := k.nft.Peers.Get(somePeer); v != c.Fwmark(3) {
			t.Fatalf("%d peers: repeated peer %s holds %#x, want its last value %#x", n, somePeer, v, c.Fwmark(3))
		}
		if v, _ := k.nft.Subnets.Get(again); v != c.Fwmark(2) {
			t.Fatalf("%d peers: repeated subnet %s holds %#x, want its last value %#x", n, again, v, c.Fwmark(2))
		}
		if got := k.nft.MapCounts()["sub4_24"]; got != 1 {
			t.Fatalf("%d peers: the /24 map counts %d subnets, want 1", n, got)
		}
		if _, ok := k.nft.Lens[nft.Len{Bits: 24}]; !ok || len(k.nft.Sig.Lens) != 2 {
			t.Fatalf("%d peers: lengths %v", n, k.nft.Sig.Lens)
		}
	}
}
