package affinity

import (
	"math/rand/v2"
	"net/netip"
	"testing"
)

// TestPeerIndexMatchesMap: random puts, replacements and deletes of IPv4
// and IPv6 peers give the same answers as a Go map, including the address
// whose scrambled key is zero.
func TestPeerIndexMatchesMap(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 6))
	p := newPeerIndex(0)
	ref := map[netip.Addr]*entry{}
	// The scrambling maps 0 to 0, so the address equal to the salt has
	// key 0, which intmap keeps aside.
	zero := netip.AddrFrom4([4]byte{byte(p.salt >> 24), byte(p.salt >> 16), byte(p.salt >> 8), byte(p.salt)})
	if p.key4(zero) != 0 {
		t.Fatalf("key of the salt's address is %#x, want 0", p.key4(zero))
	}
	addrs := []netip.Addr{zero}
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
	if q := newPeerIndex(0); q.salt == p.salt && newPeerIndex(0).salt == p.salt {
		t.Fatal("three indexes drew the same salt")
	}
}
