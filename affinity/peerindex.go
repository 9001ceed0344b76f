package affinity

import "net/netip"

// peerIndex is the exact index of peer addresses: IPv4 peers keyed by the
// address as a number (half the memory of a netip.Addr key), IPv6 peers by
// the address. A flat open-addressed table (kamstrup/intmap) was measured
// in its place: 0.6-0.8x the time of these maps at a million peers, but
// still two dependent cache misses (the slot, then the entry), far from
// the 100 ns goal, so the maps stay (README, "Performance").
type peerIndex struct {
	v4 map[uint32]*entry
	v6 map[netip.Addr]*entry
}

func newPeerIndex(size int) peerIndex {
	return peerIndex{v4: make(map[uint32]*entry, size), v6: map[netip.Addr]*entry{}}
}

func key4(a netip.Addr) uint32 {
	b := a.As4()
	return uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
}

func (p *peerIndex) get(a netip.Addr) (*entry, bool) {
	if a.Is4() {
		e, ok := p.v4[key4(a)]
		return e, ok
	}
	e, ok := p.v6[a]
	return e, ok
}

func (p *peerIndex) put(e *entry) {
	if e.peer.Is4() {
		p.v4[key4(e.peer)] = e
		return
	}
	p.v6[e.peer] = e
}

func (p *peerIndex) del(a netip.Addr) {
	if a.Is4() {
		delete(p.v4, key4(a))
		return
	}
	delete(p.v6, a)
}

// each calls fn for every entry, in no particular order.
func (p *peerIndex) each(fn func(*entry)) {
	for _, e := range p.v4 {
		fn(e)
	}
	for _, e := range p.v6 {
		fn(e)
	}
}

func (p *peerIndex) len() int { return len(p.v4) + len(p.v6) }

func (p *peerIndex) clear() {
	clear(p.v4)
	clear(p.v6)
}
