package affinity

import (
	"math/rand/v2"
	"net/netip"

	"github.com/kamstrup/intmap"
)

// peerIndex is the exact index of peer addresses. IPv4 peers, the bulk of
// a farm, live in a flat open-addressed table (kamstrup/intmap: keys and
// values side by side, linear probing), so a lookup at a million peers
// costs about one cache miss where Go's map costs several. IPv6 peers stay
// in a Go map keyed by the address.
//
// Learned peers are chosen by whoever sends packets to a VIP, and linear
// probing with an unkeyed hash would let a sender pick addresses that pile
// up in one probe chain. The table's key is therefore the address run
// through a bijection of 32-bit integers keyed by a random salt: distinct
// addresses keep distinct keys, and their positions cannot be predicted.
type peerIndex struct {
	v4   *intmap.Map[uint32, *entry]
	v6   map[netip.Addr]*entry
	salt uint32
}

func newPeerIndex(size int) peerIndex {
	return peerIndex{v4: intmap.New[uint32, *entry](size), v6: map[netip.Addr]*entry{}, salt: rand.Uint32()}
}

// key4 scrambles an IPv4 address with the salt. Each step (xor with a
// constant, multiplication by an odd number, xor with a right shift) is a
// bijection of uint32, so the whole is one.
func (p *peerIndex) key4(a netip.Addr) uint32 {
	b := a.As4()
	x := (uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])) ^ p.salt
	x *= 0x9e3779b1
	x ^= x >> 15
	x *= 0x85ebca77
	x ^= x >> 13
	return x
}

func (p *peerIndex) get(a netip.Addr) (*entry, bool) {
	if a.Is4() {
		return p.v4.Get(p.key4(a))
	}
	e, ok := p.v6[a]
	return e, ok
}

func (p *peerIndex) put(e *entry) {
	if e.peer.Is4() {
		p.v4.Put(p.key4(e.peer), e)
		return
	}
	p.v6[e.peer] = e
}

func (p *peerIndex) del(a netip.Addr) {
	if a.Is4() {
		p.v4.Del(p.key4(a))
		return
	}
	delete(p.v6, a)
}

// each calls fn for every entry, in no particular order.
func (p *peerIndex) each(fn func(*entry)) {
	for _, e := range p.v4.All() {
		fn(e)
	}
	for _, e := range p.v6 {
		fn(e)
	}
}

func (p *peerIndex) clear() {
	p.v4.Clear()
	clear(p.v6)
}
