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
