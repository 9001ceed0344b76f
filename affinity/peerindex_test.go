package affinity

import (
	"math/rand/v2"
	"net/netip"
	"testing"
)

// TestPeerIndexMatchesMap: random puts, replacements and deletes of IPv4
// and IPv6 peers give the same answers as a Go map keyed by the address.
func TestPeerIndexMatchesMap(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 6))
	p := newPeerIndex(0)
	ref := map[netip.Addr]*entry{}
	var addrs []netip.Addr
	for i := 0; i < 3000; i++ {
		if r.IntN(5) == 0 {
			var b [16]byte
			b[0], b[1], b[15] = 0x20, 0x01, byte(i)
			b[14] = byte(i >> 8)
			addrs = append(addrs, netip.AddrFrom16(b))
		} else {
			addrs = append(addrs, netip.AddrFrom4([4]byte{100, byte(r.IntN(4)), byte(i >> 8), byte(i)}))
		}
	}
	for step := 0; step < 50000; step++ {
		a := addrs[r.IntN(len(addrs))]
		switch r.IntN(3) {
		case 0, 1:
			e := &entry{peer: a, rev: uint64(step)}
			p.put(e)
			ref[a] = e
		case 2:
			p.del(a)
			delete(ref, a)
		}
		b := addrs[r.IntN(len(addrs))]
		got, ok := p.get(b)
		want, wok := ref[b]
		if ok != wok || got != want {
			t.Fatalf("step %d: get %s = %v, %v; want %v, %v", step, b, got, ok, want, wok)
		}
	}
	n := 0
	p.each(func(e *entry) {
		n++
		if ref[e.peer] != e {
			t.Fatalf("each gave %s, which the map does not hold", e.peer)
		}
	})
	if n != len(ref) {
		t.Fatalf("each gave %d entries, want %d", n, len(ref))
	}
}
