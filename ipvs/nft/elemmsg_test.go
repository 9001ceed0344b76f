package nft

import (
	"bytes"
	"encoding/binary"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"

	"github.com/google/nftables"
	mdnl "github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// googleMsgs returns the messages google/nftables queues for what queue
// does on a fresh connection (the batch's begin and end left out).
func googleMsgs(t *testing.T, queue func(c *nftables.Conn)) []mdnl.Message {
	t.Helper()
	var got []mdnl.Message
	c, err := nftables.New(nftables.WithTestDial(func(req []mdnl.Message) ([]mdnl.Message, error) {
		if req == nil {
			return nil, nil
		}
		if len(req) >= 2 && req[0].Header.Type == mdnl.HeaderType(unix.NFNL_MSG_BATCH_BEGIN) {
			got = append(got, req[1:len(req)-1]...)
		}
		return []mdnl.Message{{Header: mdnl.Header{Type: mdnl.Error}, Data: make([]byte, 4)}}, nil
	}))
	if err != nil {
		t.Fatal(err)
	}
	queue(c)
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	return got
}

// TestElemMessagesAsGoogle: elemWriter's messages are byte for byte the
// ones google/nftables writes for the same element changes, set flushes
// and deletions, for both families, maps and plain sets, a set created in
// the same batch (its batch ID) and lists longer than one message.
func TestElemMessagesAsGoogle(t *testing.T) {
	n := newNames("td")
	created := n.subnetSet(Len{Bits: 24})
	r := rand.New(rand.NewPCG(1, 2))
	type el struct {
		key []byte
		val uint32
	}
	gen := func(count, keyLen int) []el {
		out := make([]el, count)
		for i := range out {
			k := make([]byte, keyLen)
			for j := range k {
				k[j] = byte(r.Uint32())
			}
			out[i] = el{k, r.Uint32N(4096) | 0x10000}
		}
		return out
	}
	peers4, peers6, vips := gen(2*elemChunk+17, 4), gen(300, 16), gen(3, 4)
	subs := gen(elemChunk+1, 4)
	toSet := func(els []el, withVal bool) []nftables.SetElement {
		out := make([]nftables.SetElement, len(els))
		for i, e := range els {
			out[i] = nftables.SetElement{Key: e.key}
			if withVal {
				out[i].Val = binary.NativeEndian.AppendUint32(nil, e.val)
			}
		}
		return out
	}
	inChunks := func(op func(*nftables.Set, []nftables.SetElement) error, s *nftables.Set, els []nftables.SetElement) {
		for len(els) > 0 {
			k := min(len(els), elemChunk)
			if err := op(s, els[:k]); err != nil {
				t.Fatal(err)
			}
			els = els[k:]
		}
	}
	want := googleMsgs(t, func(c *nftables.Conn) {
		if err := c.AddSet(created, nil); err != nil { // gives it a batch ID
			t.Fatal(err)
		}
		inChunks(c.SetDeleteElements, n.fams[0].vips, toSet(vips, false))
		inChunks(c.SetDeleteElements, n.fams[1].peers, toSet(peers6, false))
		inChunks(c.SetAddElements, n.fams[0].peers, toSet(peers4, true))
		inChunks(c.SetAddElements, created, toSet(subs, true))
		c.FlushSet(n.digest)
		inChunks(c.SetAddElements, n.digest, []nftables.SetElement{{Key: Digest{Sum: 7, N: 9}.bytes()}})
		c.DelSet(n.subnetSet(Len{Bits: 16}))
	})[1:] // the NEWSET
	if created.ID == 0 {
		t.Fatal("the set created in the batch got no batch ID")
	}
	w := &elemWriter{}
	for _, e := range vips {
		w.elem(delSetElemType, n.fams[0].vips, e.key, 0, false)
	}
	for _, e := range peers6 {
		w.elem(delSetElemType, n.fams[1].peers, e.key, 0, false)
	}
	w.end()
	// Interleaved: each set's elements still fill their own messages.
	for i := range max(len(peers4), len(subs)) {
		if i < len(peers4) {
			w.elem(newSetElemType, n.fams[0].peers, peers4[i].key, peers4[i].val, true)
		}
		if i < len(subs) {
			w.elem(newSetElemType, created, subs[i].key, subs[i].val, true)
		}
	}
	w.end()
	w.setOp(delSetElemType, n.digest)
	w.elem(newSetElemType, n.digest, Digest{Sum: 7, N: 9}.bytes(), 0, false)
	w.setOp(delSetType, n.subnetSet(Len{Bits: 16}))
	got := w.done()
	if len(got) != len(want) {
		t.Fatalf("%d messages, google/nftables writes %d", len(got), len(want))
	}
	// Interleaving the two maps reorders their messages; sort both by
	// the order google's were written in, set by set.
	for i := range want {
		j := i
		for j < len(got) && !bytes.Equal(got[j].Data, want[i].Data) {
			j++
		}
		if j == len(got) {
			t.Fatalf("google/nftables' message %d (type %#x, %d bytes) is not among elemWriter's", i, want[i].Header.Type, len(want[i].Data))
		}
		got[i], got[j] = got[j], got[i]
		if got[i].Header.Type != want[i].Header.Type || got[i].Header.Flags != want[i].Header.Flags {
			t.Fatalf("message %d: type %#x flags %#x, want %#x %#x", i, got[i].Header.Type, got[i].Header.Flags, want[i].Header.Type, want[i].Header.Flags)
		}
	}
}

// BenchmarkElemMessages: a node down's element changes at a million
// tunnels (62,500 peers and their subnets moved: a delete and an add
// each), encoded by elemWriter and by google/nftables.
func BenchmarkElemMessages(b *testing.B) {
	n := newNames("td")
	const moved = 62_500
	keys := make([][]byte, moved)
	for i := range keys {
		keys[i] = netip.AddrFrom4([4]byte{100, byte(i >> 16), byte(i >> 8), byte(i)}).AsSlice()
	}
	b.Run("elemWriter", func(b *testing.B) {
		for range b.N {
			w := &elemWriter{}
			for _, k := range keys {
				w.elem(delSetElemType, n.fams[0].peers, k, 0, false)
			}
			w.end()
			for _, k := range keys {
				w.elem(newSetElemType, n.fams[0].peers, k, 0x10003, true)
			}
			_ = w.done()
		}
	})
	b.Run("google", func(b *testing.B) {
		for range b.N {
			c, _ := nftables.New(nftables.WithTestDial(func([]mdnl.Message) ([]mdnl.Message, error) { return nil, nil }))
			del := make([]nftables.SetElement, len(keys))
			add := make([]nftables.SetElement, len(keys))
			for i, k := range keys {
				del[i] = nftables.SetElement{Key: k}
				add[i] = nftables.SetElement{Key: k, Val: binary.NativeEndian.AppendUint32(nil, 0x10003)}
			}
			for i := 0; i < len(keys); i += elemChunk {
				j := min(i+elemChunk, len(keys))
				_ = c.SetDeleteElements(n.fams[0].peers, del[i:j])
			}
			for i := 0; i < len(keys); i += elemChunk {
				j := min(i+elemChunk, len(keys))
				_ = c.SetAddElements(n.fams[0].peers, add[i:j])
			}
		}
	})
}

// TestBuildOrder: a transaction built by build and spliced as the
// transport does (spliceTail) keeps the order the kernel needs. The batch
// begins and ends it; a map is created before its elements; every
// element deletion comes before every addition (a changed element is a
// delete and an add of one key); the digest is flushed before its new
// element; a map whose length went is deleted last, and its elements are
// not deleted one by one.
func TestBuildOrder(t *testing.T) {
	p := &Plan{AddLens: []Len{{Bits: 24}}, DelLens: []Len{{Bits: 16}}, Sizes: map[string]uint32{"sub4_24": 1024},
		DelPeers:   []netip.Addr{netip.MustParseAddr("100.0.0.1"), netip.MustParseAddr("2001:db8::1")},
		DelSubnets: []netip.Prefix{netip.MustParsePrefix("10.2.0.0/25"), netip.MustParsePrefix("10.3.0.0/16")},
		DelHash:    []uint32{7}, AddHash: map[uint32]uint32{7: 0x10002, 8: 0x10001},
		Digest: &Digest{Sum: 1, N: 2}}
	p.AddPeers.Set(netip.MustParseAddr("100.0.0.1"), 0x10002)
	p.AddPeers.Set(netip.MustParseAddr("100.0.0.2"), 0x10001)
	p.AddSubnets.Set(netip.MustParsePrefix("10.1.0.0/24"), 0x10001)
	p.AddSubnets.Set(netip.MustParsePrefix("10.2.0.0/25"), 0x10002)
	var batch []mdnl.Message
	var tail []mdnl.Message
	c, err := nftables.New(nftables.WithTestDial(func(req []mdnl.Message) ([]mdnl.Message, error) {
		if req == nil {
			return nil, nil
		}
		var ok bool
		if batch, ok = spliceTail(req, tail); !ok {
			t.Fatal("the transaction is not a batch")
		}
		return []mdnl.Message{{Header: mdnl.Header{Type: mdnl.Error}, Data: make([]byte, 4)}}, nil
	}))
	if err != nil {
		t.Fatal(err)
	}
	if tail, err = build(c, "td", p, nil); err != nil {
		t.Fatal(err)
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	type msg struct {
		typ   uint16
		set   string
		elems bool
	}
	var ms []msg
	for _, m := range batch {
		x := msg{typ: uint16(m.Header.Type)}
		if len(m.Data) > 4 {
			attrs, err := mdnl.UnmarshalAttributes(m.Data[4:])
			if err != nil {
				t.Fatal(err)
			}
			for _, a := range attrs {
				switch a.Type &^ unix.NLA_F_NESTED {
				case unix.NFTA_SET_NAME: // NFTA_SET_ELEM_LIST_SET too
					x.set = string(bytes.TrimRight(a.Data, "\x00"))
				case unix.NFTA_SET_ELEM_LIST_ELEMENTS:
					x.elems = true
				}
			}
		}
		ms = append(ms, x)
	}
	const (
		newSet  = unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_NEWSET
		delSet  = unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_DELSET
		newElem = unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_NEWSETELEM
		delElem = unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_DELSETELEM
	)
	first := func(f func(msg) bool) int { return slices.IndexFunc(ms, f) }
	last := func(f func(msg) bool) int {
		for i := len(ms) - 1; i >= 0; i-- {
			if f(ms[i]) {
				return i
			}
		}
		return -1
	}
	n := len(ms)
	switch {
	case n < 2 || ms[0].typ != unix.NFNL_MSG_BATCH_BEGIN || ms[n-1].typ != unix.NFNL_MSG_BATCH_END:
		t.Fatalf("not one batch: %+v", ms)
	case first(func(m msg) bool { return m.typ == newSet && m.set == "sub4_24" }) > first(func(m msg) bool { return m.typ == newElem && m.set == "sub4_24" }):
		t.Fatalf("sub4_24's elements before the map: %+v", ms)
	case last(func(m msg) bool { return m.typ == delElem && m.elems }) > first(func(m msg) bool { return m.typ == newElem }):
		t.Fatalf("an element deletion after an addition: %+v", ms)
	case first(func(m msg) bool { return m.typ == delElem && m.set == digestSetName && !m.elems }) > first(func(m msg) bool { return m.typ == newElem && m.set == digestSetName }):
		t.Fatalf("the digest's element before its flush: %+v", ms)
	case ms[n-2].typ != delSet || ms[n-2].set != "sub4_16":
		t.Fatalf("the gone map is not deleted last: %+v", ms)
	case first(func(m msg) bool { return m.typ == delElem && m.set == "sub4_16" }) >= 0:
		t.Fatalf("elements of the gone map deleted one by one: %+v", ms)
	}
	for _, set := range []string{"peers4", "peers6", "sub4_25", hashMapName} {
		if first(func(m msg) bool { return m.typ == delElem && m.set == set && m.elems }) < 0 {
			t.Errorf("no element deletion for %s: %+v", set, ms)
		}
	}
}
