// Package vmtest runs the ipvs package's IPVS-mode proofs in the vmlab
// guest (Debian's kernel, which has IPVS): TestVM boots it once for every
// TestGuest* test here.
package vmtest

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/internal/netlab"
	"github.com/tunneldirector/tunneldirector/internal/vmlab"
	"github.com/tunneldirector/tunneldirector/ipvs"
	"github.com/tunneldirector/tunneldirector/ipvs/lvs"
)

// TestVM is the host side: one boot for all guest tests of this package.
func TestVM(t *testing.T) {
	if vmlab.InGuest() {
		t.Skip("host-side test")
	}
	if testing.Short() {
		t.Skip("boots a VM (about 10-60 s); not in -short")
	}
	// nfnetlink_log and nft_log for the classifier's first-packet log,
	// nf_conntrack_netlink for the conntrack measurement.
	vmlab.Run(t, vmlab.Options{Package: ".", Run: guestRun(), Timeout: 5 * time.Minute,
		Modules: []string{"nfnetlink_log", "nft_log", "nf_conntrack_netlink"}})
}

// guestRun selects the guest tests: all of them, or TD_GUEST_RUN's
// pattern (to rerun one while working on it).
func guestRun() string {
	if r := os.Getenv("TD_GUEST_RUN"); r != "" {
		return r
	}
	return "^TestGuest"
}

func expectAt(t *testing.T, caps []*netlab.Capture, names []string, want int, what string, match func(netlab.Packet) bool) {
	t.Helper()
	if _, ok := caps[want].Wait(2*time.Second, match); !ok {
		var at []string
		for i, c := range caps {
			if c.Count(match) > 0 {
				at = append(at, names[i])
			}
		}
		t.Fatalf("%s did not reach %s (seen at %v)", what, names[want], at)
	}
	for i, c := range caps {
		if i != want && c.Count(match) > 0 {
			t.Fatalf("%s also reached %s", what, names[i])
		}
	}
}

// TestGuestIPVSMode programs IPVS mode through ipvs.New in a director
// namespace: IKE and NAT-T reach the owner through one DR fwmark service
// per node, ESP and AH (also from an ESP-only peer that never sent IKE, so
// IPVS holds no connection entry for it) and return traffic by fwmark
// routes; unknown peers land where HashPick says.
func TestGuestIPVSMode(t *testing.T) {
	vmlab.RequireGuest(t)
	top := netlab.BuildTopology(t, netlab.TopologyOptions{Peers: 4, Directors: 1, Nodes: 3, VIPOnDirectors: true})
	dir := top.Directors[0]
	des := &ipvs.Desired{
		VIPs:     []netip.Addr{top.VIP4, top.VIP6},
		Peers:    map[netip.Addr]uint16{},
		Subnets:  map[netip.Prefix]uint16{netip.MustParsePrefix("10.20.0.0/27"): 2, netip.MustParsePrefix("2001:db8:aaaa::/64"): 3},
		HashSeed: 99,
	}
	var names []string
	var caps []*netlab.Capture
	for i, nd := range top.Nodes {
		in := nd.If(netlab.IfInside)
		des.Nodes = append(des.Nodes, ipvs.Node{Mark: uint16(i + 1), Name: nd.Name, Addr: in.Addr4, Addr6: in.Addr6, Active: true})
		c, err := nd.Capture(netlab.IfInside)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		caps = append(caps, c)
		names = append(names, nd.Name)
	}
	for i := 0; i < 3; i++ {
		o := top.Peers[i].If(netlab.IfOutside)
		des.Peers[o.Addr4] = uint16(i + 1)
		des.Peers[o.Addr6] = uint16(i + 1)
	}
	var dp ipvs.Dataplane
	// New programs the namespace it is created in: its sockets are opened
	// on the thread Do switched into the director's namespace.
	if err := dir.Do(func() (err error) { dp, err = ipvs.New(ipvs.Config{}); return err }); err != nil {
		t.Fatalf("ipvs.New in %s: %v", dir.Name, err)
	}
	t.Cleanup(func() { dp.Close() })
	if dp.Mode() != ipvs.ModeIPVS {
		t.Fatalf("mode %s in the guest, want ipvs", dp.Mode())
	}
	ctx := context.Background()
	st, err := dp.Sync(ctx, des)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("sync: %+v", st)
	if st, err := dp.Sync(ctx, des); err != nil || st.Added+st.Changed+st.Removed != 0 {
		t.Fatalf("second sync: %+v %v", st, err)
	}

	// Exactly one fwmark service per node and family, one DR destination,
	// one-packet scheduling.
	var h lvs.Kernel
	if err := dir.Do(func() (err error) { h, _, err = lvs.Open(0); return err }); err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	svcs, err := h.Services()
	if err != nil {
		t.Fatal(err)
	}
	perMark := map[string]int{}
	for _, s := range svcs {
		if len(s.Dests) != 1 || s.Dests[0].Method != lvs.DirectRoute || !s.OnePacket {
			t.Fatalf("service fwmark %#x: one-packet %v, destinations %+v", s.Mark, s.OnePacket, s.Dests)
		}
		perMark[fmt.Sprintf("%#x/v6=%v", s.Mark, s.V6)]++
		t.Logf("IPVS service fwmark %#x v6=%v -> %s (DR, one-packet)", s.Mark, s.V6, s.Dests[0].Addr)
	}
	if len(svcs) != 6 || len(perMark) != 6 {
		t.Fatalf("want 6 services (3 nodes x 2 families), got %d: %v", len(svcs), perMark)
	}

	seq := 0
	check := func(round string, owner []int) {
		t.Helper()
		for _, v6 := range []bool{false, true} {
			vip := top.VIP4
			if v6 {
				vip = top.VIP6
			}
			for i := 0; i < 3; i++ {
				p := top.Peers[i]
				src := p.If(netlab.IfOutside).Addr(v6)
				kinds := []string{"ike", "natt", "esp", "ah"}
				if i == 2 {
					kinds = []string{"esp", "ah"} // the ESP-only peer
				}
				for _, k := range kinds {
					seq++
					tag := fmt.Sprintf("%s-%s-%d-%d", round, k, i, seq)
					since := time.Now()
					var err error
					match := netlab.Tagged(tag)
					switch k {
					case "ike":
						err = p.SendUDP(netip.AddrPortFrom(src, 500), netip.AddrPortFrom(vip, 500), []byte(tag))
					case "natt":
						err = p.SendUDP(netip.AddrPortFrom(src, 4500), netip.AddrPortFrom(vip, 4500), []byte(tag))
					case "esp":
						err = p.SendESP(src, vip, 0x1000+uint32(i), uint32(seq), tag)
					case "ah":
						err = p.SendRaw(netlab.ProtoAH, src, vip, netlab.ESPPayload(0x2000, uint32(seq), tag))
						match = func(pk netlab.Packet) bool {
							return pk.Proto == netlab.ProtoAH && pk.Src == src && !pk.Time.Before(since)
						}
					}
					if err != nil {
						t.Fatal(err)
					}
					expectAt(t, caps, names, owner[i], tag, match)
				}
			}
		}
	}
	check("r1", []int{0, 1, 2})

	// Return traffic to protected subnets.
	tg := top.Target
	for _, c := range []struct {
		dst  string
		want int
	}{{"10.20.0.9", 1}, {"2001:db8:aaaa::9", 2}} {
		dst := netip.MustParseAddr(c.dst)
		tag := "ret-" + c.dst
		if err := tg.SendUDP(netip.AddrPortFrom(tg.If(netlab.IfTarget).Addr(dst.Is6()), 40000), netip.AddrPortFrom(dst, 8080), []byte(tag)); err != nil {
			t.Fatal(err)
		}
		expectAt(t, caps, names, c.want, tag, netlab.Tagged(tag))
	}

	// Unknown peer: HashPick's node, IKE through IPVS and ESP by route.
	p := top.Peers[3]
	for _, v6 := range []bool{false, true} {
		src := p.If(netlab.IfOutside).Addr(v6)
		vip := top.VIP4
		if v6 {
			vip = top.VIP6
		}
		want := int(ipvs.HashPick(src, des.HashSeed, []uint16{1, 2, 3})) - 1
		tag := fmt.Sprintf("unknown-ike-%v", v6)
		if err := p.SendUDP(netip.AddrPortFrom(src, 500), netip.AddrPortFrom(vip, 500), []byte(tag)); err != nil {
			t.Fatal(err)
		}
		expectAt(t, caps, names, want, tag, netlab.Tagged(tag))
		tag = fmt.Sprintf("unknown-esp-%v", v6)
		if err := p.SendESP(src, vip, 0x3000, 1, tag); err != nil {
			t.Fatal(err)
		}
		expectAt(t, caps, names, want, tag, netlab.Tagged(tag))
	}

	// Move peer 0 to node 3: IKE (new IPVS flow from another source port)
	// and ESP follow.
	o := top.Peers[0].If(netlab.IfOutside)
	if _, err := dp.Update(ctx, &ipvs.Delta{SetPeers: map[netip.Addr]uint16{o.Addr4: 3, o.Addr6: 3}}); err != nil {
		t.Fatal(err)
	}
	for _, v6 := range []bool{false, true} {
		vip := top.VIP4
		if v6 {
			vip = top.VIP6
		}
		tag := fmt.Sprintf("moved-ike-%v", v6)
		if err := top.Peers[0].SendUDP(netip.AddrPortFrom(o.Addr(v6), 501), netip.AddrPortFrom(vip, 500), []byte(tag)); err != nil {
			t.Fatal(err)
		}
		expectAt(t, caps, names, 2, tag, netlab.Tagged(tag))
		tag = fmt.Sprintf("moved-esp-%v", v6)
		if err := top.Peers[0].SendESP(o.Addr(v6), vip, 0x4000, 1, tag); err != nil {
			t.Fatal(err)
		}
		expectAt(t, caps, names, 2, tag, netlab.Tagged(tag))
	}

	// Drift: a deleted service comes back with Verify.
	if err := h.Remove(svcs[0]); err != nil {
		t.Fatal(err)
	}
	st, err = dp.Verify(ctx)
	if err != nil || st.Added != 1 {
		t.Fatalf("verify after deleting a service: %+v %v", st, err)
	}
	if err := dp.Teardown(ctx); err != nil {
		t.Fatal(err)
	}
	if svcs, _ := h.Services(); len(svcs) != 0 {
		t.Fatalf("teardown left %d services", len(svcs))
	}
}
