package ipvs

import (
	"context"
	"encoding/binary"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/internal/netlab"
)

func attr(typ uint16, data []byte) []byte {
	b := make([]byte, 4, 4+len(data)+3)
	binary.NativeEndian.PutUint16(b[0:2], uint16(4+len(data)))
	binary.NativeEndian.PutUint16(b[2:4], typ)
	b = append(b, data...)
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

func ctNewMsg(src, dst netip.Addr, proto uint8, dport uint16, mark uint32) []byte {
	var ip []byte
	if src.Is4() {
		ip = append(attr(ctaIPv4Src, src.AsSlice()), attr(ctaIPv4Dst, dst.AsSlice())...)
	} else {
		ip = append(attr(ctaIPv6Src, src.AsSlice()), attr(ctaIPv6Dst, dst.AsSlice())...)
	}
	pr := attr(ctaProtoNum, []byte{proto})
	if dport != 0 {
		pr = append(pr, attr(ctaProtoSrcPort, binary.BigEndian.AppendUint16(nil, 500))...)
		pr = append(pr, attr(ctaProtoDstPort, binary.BigEndian.AppendUint16(nil, dport))...)
	}
	tuple := append(attr(ctaTupleIP|0x8000, ip), attr(ctaTupleProto|0x8000, pr)...)
	b := []byte{2, 0, 0, 0}
	b = append(b, attr(ctaTupleOrig|0x8000, tuple)...)
	return append(b, attr(ctaMark, binary.BigEndian.AppendUint32(nil, mark))...)
}

func TestDecodeCTNew(t *testing.T) {
	s, d := netip.MustParseAddr("198.51.100.7"), netip.MustParseAddr("203.0.113.1")
	f, err := decodeCTNew(ctNewMsg(s, d, 17, 4500, 0x7d000002))
	if err != nil {
		t.Fatal(err)
	}
	if f != (NewFlow{Src: s, Dst: d, Proto: 17, SrcPort: 500, DstPort: 4500, Mark: 0x7d000002}) {
		t.Fatalf("%+v", f)
	}
	s6, d6 := netip.MustParseAddr("2001:db8::7"), netip.MustParseAddr("2001:db8:ffff::1")
	if f, err := decodeCTNew(ctNewMsg(s6, d6, 50, 0, 1)); err != nil || f.Src != s6 || f.Proto != 50 {
		t.Fatalf("%+v %v", f, err)
	}
	for _, bad := range [][]byte{nil, {1, 2}, {2, 0, 0, 0, 3, 0}, {2, 0, 0, 0, 200, 0, 1, 0}} {
		if _, err := decodeCTNew(bad); err == nil {
			t.Fatalf("accepted %x", bad)
		}
	}
}

func FuzzDecodeCTNew(f *testing.F) {
	f.Add(ctNewMsg(netip.MustParseAddr("198.51.100.7"), netip.MustParseAddr("203.0.113.1"), 17, 500, 7))
	f.Add(ctNewMsg(netip.MustParseAddr("2001:db8::7"), netip.MustParseAddr("2001:db8::1"), 50, 0, 0))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		fl, err := decodeCTNew(b)
		if err == nil && (!fl.Src.IsValid() || !fl.Dst.IsValid()) {
			t.Fatalf("accepted a flow without addresses: %+v", fl)
		}
	})
}

// TestNSWatchNew sends IKE and ESP from an unknown peer and expects NEW
// events carrying the hash-picked node's mark.
func TestNSWatchNew(t *testing.T) {
	l := newLab(t, Config{})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if _, err := l.dp.Sync(ctx, l.des); err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var flows []NewFlow
	done := make(chan error, 1)
	go func() {
		done <- watchNew(ctx, int(l.dir.NsHandle()), func(f NewFlow) {
			mu.Lock()
			flows = append(flows, f)
			mu.Unlock()
		})
	}()
	time.Sleep(100 * time.Millisecond) // let the subscription start
	p := l.peers[3]
	cfg, _ := Config{}.withDefaults()
	for _, v6 := range []bool{false, true} {
		src := p.If(netlab.IfOutside).Addr(v6)
		if err := send(p, "ike", src, l.vip(v6), "ct-ike"); err != nil {
			t.Fatal(err)
		}
		if err := send(p, "esp", src, l.vip(v6), "ct-esp"); err != nil {
			t.Fatal(err)
		}
		wantMark := cfg.Fwmark(HashPick(src, l.des.HashSeed, []uint16{1, 2, 3}))
		for _, w := range []NewFlow{{Src: src, Dst: l.vip(v6), Proto: 17, SrcPort: 500, DstPort: 500, Mark: wantMark}, {Src: src, Dst: l.vip(v6), Proto: 50, Mark: wantMark}} {
			deadline := time.Now().Add(2 * time.Second)
			found := false
			for !found && time.Now().Before(deadline) {
				mu.Lock()
				for _, f := range flows {
					if f == w {
						found = true
					}
				}
				mu.Unlock()
				time.Sleep(10 * time.Millisecond)
			}
			if !found {
				mu.Lock()
				t.Fatalf("no NEW event %+v; got %+v", w, flows)
			}
		}
	}
	cancel()
	if err := <-done; err != context.Canceled {
		t.Fatalf("watch ended with %v", err)
	}
	t.Logf("events: %+v", flows)
}
