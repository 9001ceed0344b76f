package ipvs

import (
	"net/netip"
	"slices"

	"github.com/tunneldirector/tunneldirector/ipvs/nft"
)

// Bucket returns the unknown-peer bucket (0..n-1) the kernel hashes addr
// into with seed and n buckets: the index into Desired.Buckets. A seed of
// 0 stands for a fixed non-zero seed on both sides.
func Bucket(addr netip.Addr, seed uint32, n int) int {
	return int(nft.HashIndex(addr, seed, uint32(n)))
}

// BucketPick returns the node mark the kernel gives a peer that is not in
// the peer maps, given the bucket map (Desired.Buckets): 0 for none.
func BucketPick(addr netip.Addr, seed uint32, buckets []uint16) uint16 {
	if len(buckets) == 0 {
		return 0
	}
	return buckets[Bucket(addr, seed, len(buckets))]
}

// HashPick is BucketPick for a dataplane without buckets (Desired.Buckets
// nil): one bucket per active node, in ascending mark order.
func HashPick(addr netip.Addr, seed uint32, activeMarks []uint16) uint16 {
	ms := slices.Clone(activeMarks)
	slices.Sort(ms)
	return BucketPick(addr, seed, slices.Compact(ms))
}
