package nft

import (
	"encoding/binary"
	"iter"
	"maps"
	"net/netip"
)

// The peer and subnet maps hold an element per tunnel endpoint and per
// protected subnet: millions at the scale the director is built for (the
// target and the model of the kernel share them, see State.Share; a Sync
// holds a new target beside them). A Go map keyed by netip.Addr or
// netip.Prefix costs 32-40 bytes a slot and, because those types carry a
// pointer (the zone), the garbage collector scans every slot on every
// cycle: at a million tunnels that scan was most of a node failure's CPU.
// PeerMap and SubnetMap keep the same content in maps whose keys are plain
// integers and byte arrays: 8-12 bytes a slot for IPv4 (most farms),
// nothing for the collector to scan.

// PeerMap maps tunnel endpoints to a 32-bit value (a fwmark). The zero
// value is an empty map ready to use.
type PeerMap struct {
	v4  map[uint32]uint32
	v6  map[[16]byte]uint32
	sum uint64 // of elemHash over the elements: see Digest
}

// NewPeerMap returns a map sized for n IPv4 endpoints.
func NewPeerMap(n int) PeerMap { return PeerMap{v4: make(map[uint32]uint32, n)} }

func v4Key(a netip.Addr) uint32 { b := a.As4(); return binary.BigEndian.Uint32(b[:]) }

func v4Addr(k uint32) netip.Addr {
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], k)
	return netip.AddrFrom4(b)
}

// Get returns a's value.
func (m *PeerMap) Get(a netip.Addr) (uint32, bool) {
	if a.Is4() {
		v, ok := m.v4[v4Key(a)]
		return v, ok
	}
	v, ok := m.v6[a.As16()]
	return v, ok
}

// Set sets a's value and says whether a is new. An IPv4-mapped IPv6
// address is an IPv6 key, as it is to netip (callers unmap what they mean
// as IPv4).
func (m *PeerMap) Set(a netip.Addr, v uint32) (added bool) { return m.put(a, v, false) }

// Fill sets a's value for a map being filled with keys it does not hold
// yet (a target built from the table, whose peers are unique): it skips
// the look-up Set makes of an old value for the sum, a cache miss per key
// in a map of millions. It says whether a was new; when it was not, its
// value is replaced but the sum is stale until Resum.
func (m *PeerMap) Fill(a netip.Addr, v uint32) (added bool) { return m.put(a, v, true) }

// put is Set, or Fill when fresh.
func (m *PeerMap) put(a netip.Addr, v uint32, fresh bool) bool {
	if a.Is4() {
		if m.v4 == nil {
			m.v4 = map[uint32]uint32{}
		}
		return put(m.v4, &m.sum, peer4Hash, v4Key(a), v, fresh)
	}
	if m.v6 == nil {
		m.v6 = map[[16]byte]uint32{}
	}
	return put(m.v6, &m.sum, peer6Hash, a.As16(), v, fresh)
}

// Resum recomputes the sum from the elements (after Fill met a key twice).
func (m *PeerMap) Resum() { m.sum = resum(m.v4, peer4Hash) + resum(m.v6, peer6Hash) }

// Delete removes a.
func (m *PeerMap) Delete(a netip.Addr) {
	if a.Is4() {
		del(m.v4, &m.sum, peer4Hash, v4Key(a))
		return
	}
	del(m.v6, &m.sum, peer6Hash, a.As16())
}

// Len is the number of endpoints.
func (m *PeerMap) Len() int { return len(m.v4) + len(m.v6) }

// All yields every endpoint and its value, in no particular order.
func (m *PeerMap) All() iter.Seq2[netip.Addr, uint32] {
	return func(yield func(netip.Addr, uint32) bool) {
		for k, v := range m.v4 {
			if !yield(v4Addr(k), v) {
				return
			}
		}
		for k, v := range m.v6 {
			if !yield(netip.AddrFrom16(k), v) {
				return
			}
		}
	}
}

// Clone returns a copy.
func (m *PeerMap) Clone() PeerMap {
	return PeerMap{v4: maps.Clone(m.v4), v6: maps.Clone(m.v6), sum: m.sum}
}

// GrowFor makes room for o's elements ahead of adding them (see grow).
func (m *PeerMap) GrowFor(o *PeerMap) {
	m.v4, m.v6 = grow(m.v4, len(o.v4)), grow(m.v6, len(o.v6))
}

// SubnetMap maps protected subnets (masked prefixes) to a 32-bit value.
// The zero value is an empty map ready to use.
type SubnetMap struct {
	v4  map[uint64]uint32 // address<<8 | bits
	v6  map[prefix6]uint32
	sum uint64
}

type prefix6 struct {
	a    [16]byte
	bits uint8
}

// NewSubnetMap returns a map sized for n IPv4 subnets.
func NewSubnetMap(n int) SubnetMap { return SubnetMap{v4: make(map[uint64]uint32, n)} }

func v4PrefixKey(p netip.Prefix) uint64 { return uint64(v4Key(p.Addr()))<<8 | uint64(p.Bits()) }

// Get returns p's value.
func (m *SubnetMap) Get(p netip.Prefix) (uint32, bool) {
	if p.Addr().Is4() {
		v, ok := m.v4[v4PrefixKey(p)]
		return v, ok
	}
	v, ok := m.v6[prefix6{p.Addr().As16(), uint8(p.Bits())}]
	return v, ok
}

// Set sets p's value and says whether p is new.
func (m *SubnetMap) Set(p netip.Prefix, v uint32) (added bool) { return m.put(p, v, false) }

// Fill is PeerMap.Fill for subnets (the table's never overlap).
func (m *SubnetMap) Fill(p netip.Prefix, v uint32) (added bool) { return m.put(p, v, true) }

// put is Set, or Fill when fresh.
func (m *SubnetMap) put(p netip.Prefix, v uint32, fresh bool) bool {
	if p.Addr().Is4() {
		if m.v4 == nil {
			m.v4 = map[uint64]uint32{}
		}
		return put(m.v4, &m.sum, subnet4Hash, v4PrefixKey(p), v, fresh)
	}
	if m.v6 == nil {
		m.v6 = map[prefix6]uint32{}
	}
	return put(m.v6, &m.sum, subnet6Hash, prefix6{p.Addr().As16(), uint8(p.Bits())}, v, fresh)
}

// Resum is PeerMap.Resum for subnets.
func (m *SubnetMap) Resum() { m.sum = resum(m.v4, subnet4Hash) + resum(m.v6, subnet6Hash) }

// Delete removes p and says whether it was there.
func (m *SubnetMap) Delete(p netip.Prefix) (removed bool) {
	if p.Addr().Is4() {
		return del(m.v4, &m.sum, subnet4Hash, v4PrefixKey(p))
	}
	return del(m.v6, &m.sum, subnet6Hash, prefix6{p.Addr().As16(), uint8(p.Bits())})
}

// Len is the number of subnets.
func (m *SubnetMap) Len() int { return len(m.v4) + len(m.v6) }

// All yields every subnet and its value, in no particular order.
func (m *SubnetMap) All() iter.Seq2[netip.Prefix, uint32] {
	return func(yield func(netip.Prefix, uint32) bool) {
		for k, v := range m.v4 {
			if !yield(netip.PrefixFrom(v4Addr(uint32(k>>8)), int(k&0xff)), v) {
				return
			}
		}
		for k, v := range m.v6 {
			if !yield(netip.PrefixFrom(netip.AddrFrom16(k.a), int(k.bits)), v) {
				return
			}
		}
	}
}

// GrowFor makes room for o's elements ahead of adding them (see grow).
func (m *SubnetMap) GrowFor(o *SubnetMap) {
	m.v4, m.v6 = grow(m.v4, len(o.v4)), grow(m.v6, len(o.v6))
}

// grow returns m, or a copy of it sized for more keys when more would at
// least double it: a map grown one key at a time to a million rehashes
// every key several times over (an import into an empty table is one
// plan of millions of additions).
func grow[K comparable](m map[K]uint32, more int) map[K]uint32 {
	if more <= len(m) || more < 1024 {
		return m
	}
	g := make(map[K]uint32, len(m)+more)
	maps.Copy(g, m)
	return g
}

// DeleteLens removes every subnet of the given lengths (a deleted
// per-length map takes its elements with it).
func (m *SubnetMap) DeleteLens(gone map[Len]bool) {
	for k, v := range m.v4 {
		if gone[Len{false, int(k & 0xff)}] {
			delete(m.v4, k)
			m.sum -= subnet4Hash(k, v)
		}
	}
	for k, v := range m.v6 {
		if gone[Len{true, int(k.bits)}] {
			delete(m.v6, k)
			m.sum -= subnet6Hash(k, v)
		}
	}
}

// Clone returns a copy.
func (m *SubnetMap) Clone() SubnetMap {
	return SubnetMap{v4: maps.Clone(m.v4), v6: maps.Clone(m.v6), sum: m.sum}
}

// Digest identifies the content of the peer and subnet maps: the element
// count and the sum of a 64-bit hash of every element (map, key, value).
// A sum is kept up to date in O(1) per element change, so the digest of
// what the director last committed is written into the kernel in the same
// transaction (the digest set), and a restarted director that finds it
// equal to its target's adopts the maps without reading a million
// elements back.
type Digest struct {
	Sum, N uint64
}

// bytes is the digest as the 16-byte key of the digest set's element.
func (d Digest) bytes() []byte {
	b := make([]byte, 16)
	binary.BigEndian.PutUint64(b, d.Sum)
	binary.BigEndian.PutUint64(b[8:], d.N)
	return b
}

func digestOf(b []byte) (Digest, bool) {
	if len(b) != 16 {
		return Digest{}, false
	}
	return Digest{binary.BigEndian.Uint64(b), binary.BigEndian.Uint64(b[8:])}, true
}

// Digest returns the digest of the peer and subnet maps.
func (s *State) Digest() Digest {
	return Digest{Sum: s.Peers.sum + s.Subnets.sum, N: uint64(s.Peers.Len() + s.Subnets.Len())}
}

// mix is a 64-bit finaliser (SplitMix64's): every input bit moves every
// output bit, so sums of mixed elements tell contents apart.
func mix(x uint64) uint64 {
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	return x ^ x>>31
}

// Each map kind hashes with its own tag, so an element cannot stand for
// one of another map.
const (
	tagPeer4 = iota + 1
	tagPeer6
	tagSubnet4
	tagSubnet6
)

func elemHash(tag, a, b, v uint64) uint64 { return mix(mix(mix(tag<<56^a)^b) ^ v) }

func peer4Hash(k, v uint32) uint64 { return elemHash(tagPeer4, uint64(k), 0, uint64(v)) }
func peer6Hash(k [16]byte, v uint32) uint64 {
	return elemHash(tagPeer6, binary.BigEndian.Uint64(k[:8]), binary.BigEndian.Uint64(k[8:]), uint64(v))
}
func subnet4Hash(k uint64, v uint32) uint64 { return elemHash(tagSubnet4, k, 0, uint64(v)) }
func subnet6Hash(k prefix6, v uint32) uint64 {
	return elemHash(tagSubnet6, binary.BigEndian.Uint64(k.a[:8]), binary.BigEndian.Uint64(k.a[8:]), uint64(k.bits)<<32|uint64(v))
}

// hash is the element's share of m's sum.
func (m *PeerMap) hash(a netip.Addr, v uint32) uint64 {
	if a.Is4() {
		return peer4Hash(v4Key(a), v)
	}
	return peer6Hash(a.As16(), v)
}

// hash is the element's share of m's sum.
func (m *SubnetMap) hash(p netip.Prefix, v uint32) uint64 {
	if p.Addr().Is4() {
		return subnet4Hash(v4PrefixKey(p), v)
	}
	return subnet6Hash(prefix6{p.Addr().As16(), uint8(p.Bits())}, v)
}

// set sets k's value in m, keeps sum, and says whether k is new.
func set[K comparable](m map[K]uint32, sum *uint64, h func(K, uint32) uint64, k K, v uint32) bool {
	old, had := m[k]
	m[k] = v
	*sum += h(k, v) - ifHad(had, h(k, old))
	return !had
}

// put is fill when fresh, set otherwise.
func put[K comparable](m map[K]uint32, sum *uint64, h func(K, uint32) uint64, k K, v uint32, fresh bool) bool {
	if fresh {
		return fill(m, sum, h, k, v)
	}
	return set(m, sum, h, k, v)
}

// fill sets k's value in m and adds it to sum when k is new (see
// PeerMap.Fill); a new key shows in the map's length.
func fill[K comparable](m map[K]uint32, sum *uint64, h func(K, uint32) uint64, k K, v uint32) bool {
	n := len(m)
	m[k] = v
	if len(m) == n {
		return false
	}
	*sum += h(k, v)
	return true
}

// resum is the sum of m's elements.
func resum[K comparable](m map[K]uint32, h func(K, uint32) uint64) (sum uint64) {
	for k, v := range m {
		sum += h(k, v)
	}
	return sum
}

// del removes k from m, keeps sum, and says whether k was there.
func del[K comparable](m map[K]uint32, sum *uint64, h func(K, uint32) uint64, k K) bool {
	old, had := m[k]
	if had {
		delete(m, k)
		*sum -= h(k, old)
	}
	return had
}

// ifHad is h when had, else 0: what a replaced element takes off a sum.
func ifHad(had bool, h uint64) uint64 {
	if had {
		return h
	}
	return 0
}
