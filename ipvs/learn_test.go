package ipvs

import (
	"context"
	"encoding/binary"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/internal/netlab"
)

func ipv4UDP(src, dst netip.Addr, sport, dport uint16) []byte {
	b := make([]byte, 28)
	b[0] = 0x45
	b[9] = 17
	copy(b[12:16], src.AsSlice())
	copy(b[16:20], dst.AsSlice())
	binary.BigEndian.PutUint16(b[20:], sport)
	binary.BigEndian.PutUint16(b[22:], dport)
	return b
}

func ipv6Proto(src, dst netip.Addr, proto byte) []byte {
	b := make([]byte, 48)
	b[0] = 0x60
	b[6] = proto
	copy(b[8:24], src.AsSlice())
	copy(b[24:40], dst.AsSlice())
	return b
}

func TestFlowOf(t *testing.T) {
	s, d := netip.MustParseAddr("198.51.100.7"), netip.MustParseAddr("203.0.113.1")
	f, err := flowOf(ipv4UDP(s, d, 500, 4500), 0x7d001002)
	if err != nil || f != (NewFlow{Src: s, Dst: d, Proto: 17, SrcPort: 500, DstPort: 4500, Mark: 0x7d001002}) {
		t.Fatalf("%+v %v", f, err)
	}
	s6, d6 := netip.MustParseAddr("2001:db8::7"), netip.MustParseAddr("2001:db8:ffff::1")
	if f, err := flowOf(ipv6Proto(s6, d6, 50), 3); err != nil || f.Src != s6 || f.Dst != d6 || f.Proto != 50 || f.DstPort != 0 {
		t.Fatalf("%+v %v", f, err)
	}
	for _, bad := range [][]byte{nil, {0x45}, {0x46, 0, 0}, {0x60, 1, 2}, {0x10}} {
		if f, err := flowOf(bad, 0); err == nil {
			t.Fatalf("accepted %x: %+v", bad, f)
		}
	}
}

func FuzzFlowOf(f *testing.F) {
	f.Add(ipv4UDP(netip.MustParseAddr("198.51.100.7"), netip.MustParseAddr("203.0.113.1"), 500, 500))
	f.Add(ipv6Proto(netip.MustParseAddr("2001:db8::7"), netip.MustParseAddr("2001:db8::1"), 17))
	f.Add([]byte{0x4f})
	f.Fuzz(func(t *testing.T, b []byte) {
		fl, err := flowOf(b, 1)
		if err == nil && (!fl.Src.IsValid() || !fl.Dst.IsValid()) {
			t.Fatalf("accepted a packet without addresses: %+v", fl)
		}
	})
}

// TestNSFirstPacketLearning sends IKE, NAT-T and ESP from an unknown peer
// and from a known one through the host kernel (route-only): the unknown
// peer's FIRST packet is reported, once (not its second), with the mark of
// the node HashPick names; the known peer is never reported.
func TestNSFirstPacketLearning(t *testing.T) {
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
		done <- firstPackets(l.dp.cfg, l.dir.NsHandle())(ctx, func(f NewFlow) {
			mu.Lock()
			flows = append(flows, f)
			mu.Unlock()
		})
	}()
	// Packets logged before the group is bound are lost: wait for it.
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		var b []byte
		_ = l.dir.Do(func() (err error) { b, err = os.ReadFile("/proc/thread-self/net/netfilter/nfnetlink_log"); return err })
		if strings.Contains(string(b), fmt.Sprint(DefaultLogGroup)+" ") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("NFLOG group not bound")
		}
	}
	unknown, known := l.peers[3], l.peers[0]
	for _, v6 := range []bool{false, true} {
		src := unknown.If(netlab.IfOutside).Addr(v6)
		want := NewFlow{Src: src, Dst: l.vip(v6), Proto: 17, SrcPort: 500, DstPort: 500,
			Mark: l.dp.cfg.Fwmark(HashPick(src, l.des.HashSeed, []uint16{1, 2, 3}))}
		for i, kind := range []string{"ike", "ike", "natt", "esp"} {
			if err := send(unknown, kind, src, l.vip(v6), "learn"); err != nil {
				t.Fatal(err)
			}
			if i == 0 {
				deadline := time.Now().Add(3 * time.Second)
				for {
					mu.Lock()
					n := len(flows)
					mu.Unlock()
					if n > 0 || time.Now().After(deadline) {
						break
					}
					time.Sleep(10 * time.Millisecond)
				}
			}
		}
		if err := send(known, "ike", known.If(netlab.IfOutside).Addr(v6), l.vip(v6), "known"); err != nil {
			t.Fatal(err)
		}
		time.Sleep(300 * time.Millisecond)
		mu.Lock()
		got := flows
		flows = nil
		mu.Unlock()
		if len(got) != 1 || got[0] != want {
			t.Fatalf("v6=%v: reported %+v, want exactly the first packet %+v", v6, got, want)
		}
		t.Logf("v6=%v: first packet reported once: %+v", v6, got[0])
	}
	cancel()
	if err := <-done; err != context.Canceled {
		t.Fatalf("watch ended with %v", err)
	}
}
