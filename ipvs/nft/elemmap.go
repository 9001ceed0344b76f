package nft

import (
	"encoding/binary"
	"iter"
	"maps"
	"net/netip"
)

// The peer and subnet maps hold an element per tunnel endpoint and per
// protected subnet: millions at the scale the director is built for, held
// twice (the target and the model of the kernel) and once more in a full
// load's plan. A Go map keyed by netip.Addr or netip.Prefix costs 32-40
// bytes a slot and, because those types carry a pointer (the zone), the
// garbage collector scans every slot on every cycle: at a million tunnels
// that scan was most of a node failure's CPU. PeerMap and SubnetMap keep
// the same content in maps whose keys are plain integers and byte arrays:
// 8-12 bytes a slot for IPv4 (most farms), nothing for the collector to
// scan.

// PeerMap maps tunnel endpoints to a 32-bit value (a fwmark). The zero
// value is an empty map ready to use.
type PeerMap struct {
	v4 map[uint32]uint32
	v6 map[[16]byte]uint32
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
func (m *PeerMap) Set(a netip.Addr, v uint32) (added bool) {
	if a.Is4() {
		if m.v4 == nil {
			m.v4 = map[uint32]uint32{}
		}
		n := len(m.v4)
		m.v4[v4Key(a)] = v
		return len(m.v4) > n
	}
	if m.v6 == nil {
		m.v6 = map[[16]byte]uint32{}
	}
	n := len(m.v6)
	m.v6[a.As16()] = v
	return len(m.v6) > n
}

// Delete removes a.
func (m *PeerMap) Delete(a netip.Addr) {
	if a.Is4() {
		delete(m.v4, v4Key(a))
		return
	}
	delete(m.v6, a.As16())
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
func (m *PeerMap) Clone() PeerMap { return PeerMap{v4: maps.Clone(m.v4), v6: maps.Clone(m.v6)} }

// SubnetMap maps protected subnets (masked prefixes) to a 32-bit value.
// The zero value is an empty map ready to use.
type SubnetMap struct {
	v4 map[uint64]uint32 // address<<8 | bits
	v6 map[prefix6]uint32
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
func (m *SubnetMap) Set(p netip.Prefix, v uint32) (added bool) {
	if p.Addr().Is4() {
		if m.v4 == nil {
			m.v4 = map[uint64]uint32{}
		}
		n := len(m.v4)
		m.v4[v4PrefixKey(p)] = v
		return len(m.v4) > n
	}
	if m.v6 == nil {
		m.v6 = map[prefix6]uint32{}
	}
	n := len(m.v6)
	m.v6[prefix6{p.Addr().As16(), uint8(p.Bits())}] = v
	return len(m.v6) > n
}

// Delete removes p and says whether it was there.
func (m *SubnetMap) Delete(p netip.Prefix) (removed bool) {
	if p.Addr().Is4() {
		n := len(m.v4)
		delete(m.v4, v4PrefixKey(p))
		return len(m.v4) < n
	}
	n := len(m.v6)
	delete(m.v6, prefix6{p.Addr().As16(), uint8(p.Bits())})
	return len(m.v6) < n
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

// DeleteLens removes every subnet of the given lengths (a deleted
// per-length map takes its elements with it).
func (m *SubnetMap) DeleteLens(gone map[Len]bool) {
	for k := range m.v4 {
		if gone[Len{false, int(k & 0xff)}] {
			delete(m.v4, k)
		}
	}
	for k := range m.v6 {
		if gone[Len{true, int(k.bits)}] {
			delete(m.v6, k)
		}
	}
}

// Clone returns a copy.
func (m *SubnetMap) Clone() SubnetMap { return SubnetMap{v4: maps.Clone(m.v4), v6: maps.Clone(m.v6)} }
