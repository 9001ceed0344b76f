package vmtest

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/internal/netlab"
	"github.com/tunneldirector/tunneldirector/internal/vmlab"
	"github.com/tunneldirector/tunneldirector/ipvs"
	"github.com/tunneldirector/tunneldirector/ipvs/conntrack"
)

// TestGuestFirstPacketLearning: in IPVS mode an unknown peer's FIRST IKE
// or NAT-T packet is reported to the learner (with conntrack NEW events it
// would be seen only at its first ESP packet), once although it keeps
// retransmitting, with the mark of the node HashPick names, and its IKE
// reaches that node.
func TestGuestFirstPacketLearning(t *testing.T) {
	vmlab.RequireGuest(t)
	l := newMoveLab(t)
	o := l.top.Peers[0].If(netlab.IfOutside)
	delete(l.des.Peers, o.Addr4)
	delete(l.des.Peers, o.Addr6)
	ctx, cancel := context.WithCancel(l.start(t))
	defer cancel()
	var mu sync.Mutex
	var flows []ipvs.NewFlow
	done := make(chan error, 1)
	go func() {
		done <- l.top.Directors[0].Do(func() error {
			return ipvs.FirstPackets(ipvs.Config{})(ctx, func(f ipvs.NewFlow) { mu.Lock(); flows = append(flows, f); mu.Unlock() })
		})
	}()
	// Packets logged before the group is bound are lost (and the peer is
	// logged again a LearnInterval later): wait for the bind.
	bound := func() bool {
		var b []byte
		_ = l.top.Directors[0].Do(func() (err error) {
			b, err = os.ReadFile("/proc/thread-self/net/netfilter/nfnetlink_log")
			return err
		})
		return strings.Contains(string(b), fmt.Sprint(ipvs.DefaultLogGroup)+" ")
	}
	for deadline := time.Now().Add(10 * time.Second); !bound(); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("NFLOG group not bound after 10 s")
		}
	}
	cfg := ipvs.Config{MarkBase: 0x7d000000, MarkMask: 0xff001fff}
	for _, v6 := range []bool{false, true} {
		src := o.Addr(v6)
		want := ipvs.HashPick(src, l.des.HashSeed, []uint16{1, 2, 3})
		r := startRetransmitter(t, l.top.Peers[0], map[bool]string{false: "u4", true: "u6"}[v6], src, l.vip(v6))
		r.settle(100)
		r.halt()
		l.onlyAt(t, "unknown peer's IKE", int(want)-1, 50, r.after(0))
		var got []ipvs.NewFlow
		for deadline := time.Now().Add(3 * time.Second); len(got) == 0 && time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
			mu.Lock()
			got = slices.Clone(flows)
			mu.Unlock()
		}
		time.Sleep(200 * time.Millisecond) // a second report would come now
		mu.Lock()
		got = flows
		flows = nil
		mu.Unlock()
		if len(got) != 1 {
			t.Fatalf("v6=%v: %d reports for one retransmitting unknown peer, want 1: %+v", v6, len(got), got)
		}
		f := got[0]
		m, ok := cfg.NodeOf(f.Mark)
		if f.Src != src || f.Dst != l.vip(v6) || f.Proto != 17 || (f.DstPort != 500 && f.DstPort != 4500) || !ok || m != want || f.Mark&ipvs.IKEBit == 0 {
			t.Fatalf("v6=%v: reported %+v (node %d), want the first IKE/NAT-T packet of %s with node %d and the IKE bit", v6, f, m, src, want)
		}
		t.Logf("v6=%v: first packet reported once out of %d sent: %+v", v6, r.seq.Load(), f)
	}
	cancel()
	if err := <-done; err != context.Canceled {
		t.Fatalf("first-packet watch ended with %v", err)
	}
}

// TestGuestConntrackForIPVSFlows measures what a conntrack-based learner
// would see in IPVS mode, the evidence behind ipvs.FirstPackets: with
// net.ipv4.vs.conntrack=0 (the default) a known peer's IKE datagrams
// through IPVS create no conntrack NEW event at all; with conntrack=1 they
// do, and the count per datagram is logged.
func TestGuestConntrackForIPVSFlows(t *testing.T) {
	vmlab.RequireGuest(t)
	l := newMoveLab(t)
	ctx := l.start(t)
	dir := l.top.Directors[0]
	src := l.top.Peers[0].If(netlab.IfOutside).Addr4
	for _, ct := range []string{"0", "1"} {
		if err := dir.Sysctl("net/ipv4/vs/conntrack", ct); err != nil {
			t.Fatal(err)
		}
		wctx, cancel := context.WithCancel(ctx)
		var mu sync.Mutex
		events := 0
		done := make(chan error, 1)
		go func() {
			done <- conntrack.WatchNew(wctx, dir.NsHandle(), func(f conntrack.Flow) {
				if f.Orig.SrcAddr() == src && f.Orig.Proto == 17 {
					mu.Lock()
					events++
					mu.Unlock()
				}
			})
		}()
		time.Sleep(200 * time.Millisecond)
		c, err := l.top.Peers[0].UDPSocket(netip.AddrPortFrom(src, 500))
		if err != nil {
			t.Fatal(err)
		}
		const n = 50
		for i := 0; i < n; i++ {
			if _, err := c.WriteToUDPAddrPort([]byte("ct"), netip.AddrPortFrom(l.top.VIP4, 500)); err != nil {
				t.Fatal(err)
			}
			time.Sleep(5 * time.Millisecond)
		}
		c.Close()
		time.Sleep(500 * time.Millisecond)
		cancel()
		<-done
		mu.Lock()
		got := events
		mu.Unlock()
		t.Logf("net.ipv4.vs.conntrack=%s: %d conntrack NEW events for %d IKE datagrams from one port through one-packet IPVS", ct, got, n)
		if ct == "0" && got != 0 {
			t.Fatalf("conntrack=0: %d NEW events for IKE through IPVS, want 0 (the kernel fact the learner's design rests on)", got)
		}
		if ct == "1" && got == 0 {
			t.Fatal("conntrack=1: no NEW event for IKE through IPVS")
		}
	}
}
