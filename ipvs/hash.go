package ipvs

import (
	"net/netip"
	"slices"

	"github.com/tunneldirector/tunneldirector/ipvs/nft"
)

// HashPick returns the node mark the kernel assigns to a peer that is not in
// the peer maps: the jhash of its address with seed, over the active node
// marks in ascending order (the order the hash map is programmed in). It
// returns 0 when there is no active node. A HashSeed of 0 stands for a fixed
// non-zero seed on both sides.
func HashPick(addr netip.Addr, seed uint32, activeMarks []uint16) uint16 {
	if len(activeMarks) == 0 {
		return 0
	}
	ms := slices.Clone(activeMarks)
	slices.Sort(ms)
	ms = slices.Compact(ms)
	return ms[nft.HashIndex(addr, seed, uint32(len(ms)))]
}
