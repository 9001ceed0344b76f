package ipvs

import (
	"encoding/binary"
	"math/bits"
	"net/netip"
	"slices"
)

// defaultSeed replaces a zero HashSeed: the kernel's nft_hash draws a random
// seed when the netlink message carries none, and google/nftables omits a
// zero seed, so zero cannot be programmed and the Go side must agree.
const defaultSeed = 0x74646972

func effectiveSeed(s uint32) uint32 {
	if s == 0 {
		return defaultSeed
	}
	return s
}

// jhash is the kernel's jhash() (include/linux/jhash.h) over a byte key,
// with the words read little-endian as on the x86 and arm64 hosts the
// director runs on (the kernel reads them in CPU order).
func jhash(k []byte, initval uint32) uint32 {
	n := uint32(len(k))
	a := 0xdeadbeef + n + initval
	b, c := a, a
	for len(k) > 12 {
		a += binary.LittleEndian.Uint32(k[0:])
		b += binary.LittleEndian.Uint32(k[4:])
		c += binary.LittleEndian.Uint32(k[8:])
		a, b, c = jmix(a, b, c)
		k = k[12:]
	}
	if len(k) == 0 {
		return c
	}
	var tail [12]byte
	copy(tail[:], k)
	a += binary.LittleEndian.Uint32(tail[0:])
	b += binary.LittleEndian.Uint32(tail[4:])
	c += binary.LittleEndian.Uint32(tail[8:])
	return jfinal(a, b, c)
}

func jmix(a, b, c uint32) (uint32, uint32, uint32) {
	a -= c
	a ^= bits.RotateLeft32(c, 4)
	c += b
	b -= a
	b ^= bits.RotateLeft32(a, 6)
	a += c
	c -= b
	c ^= bits.RotateLeft32(b, 8)
	b += a
	a -= c
	a ^= bits.RotateLeft32(c, 16)
	c += b
	b -= a
	b ^= bits.RotateLeft32(a, 19)
	a += c
	c -= b
	c ^= bits.RotateLeft32(b, 4)
	b += a
	return a, b, c
}

func jfinal(a, b, c uint32) uint32 {
	c ^= b
	c -= bits.RotateLeft32(b, 14)
	a ^= c
	a -= bits.RotateLeft32(c, 11)
	b ^= a
	b -= bits.RotateLeft32(a, 25)
	c ^= b
	c -= bits.RotateLeft32(b, 16)
	a ^= c
	a -= bits.RotateLeft32(c, 4)
	b ^= a
	b -= bits.RotateLeft32(a, 14)
	c ^= b
	c -= bits.RotateLeft32(b, 24)
	return c
}

// hashIndex is what nft_jhash_eval leaves in its register: the jhash of the
// address bytes (network order, as the payload expression loads them)
// scaled into [0, mod) with reciprocal_scale.
func hashIndex(addr netip.Addr, seed uint32, mod uint32) uint32 {
	b := addr.AsSlice()
	h := jhash(b, effectiveSeed(seed))
	return uint32((uint64(h) * uint64(mod)) >> 32)
}

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
	return ms[hashIndex(addr.Unmap(), seed, uint32(len(ms)))]
}
