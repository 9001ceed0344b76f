package nft

import (
	"encoding/binary"
	"math/bits"
	"net/netip"
)

// defaultSeed replaces a zero seed: the kernel's nft_hash draws a random
// seed when the netlink message carries none, and google/nftables omits a
// zero seed, so zero cannot be programmed and the Go side must agree.
const defaultSeed = 0x74646972

// EffectiveSeed is the seed programmed for s.
func EffectiveSeed(s uint32) uint32 {
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

// HashIndex is what nft_jhash_eval leaves in its register for the
// classifier's hash rule: the jhash of the address bytes (network order, as
// the payload expression loads them) scaled into [0, mod) with
// reciprocal_scale.
func HashIndex(addr netip.Addr, seed uint32, mod uint32) uint32 {
	b := addr.Unmap().AsSlice()
	h := jhash(b, EffectiveSeed(seed))
	return uint32((uint64(h) * uint64(mod)) >> 32)
}
