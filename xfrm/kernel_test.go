package xfrm_test

import (
	"bytes"
	"context"
	"net"
	"net/netip"
	"os/exec"
	"slices"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/tunneldirector/tunneldirector/internal/netlab"
	"github.com/tunneldirector/tunneldirector/xfrm"
)

func ipnet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// tunnelPolicies returns the in, fwd and out policies strongSwan installs
// for one CHILD_SA between local and peer.
func tunnelPolicies(local, peer netip.Addr, localNet, remote netip.Prefix, reqid int) []*netlink.XfrmPolicy {
	in := netlink.XfrmPolicyTmpl{Src: peer.AsSlice(), Dst: local.AsSlice(), Proto: netlink.XFRM_PROTO_ESP, Mode: netlink.XFRM_MODE_TUNNEL, Reqid: reqid}
	out := netlink.XfrmPolicyTmpl{Src: local.AsSlice(), Dst: peer.AsSlice(), Proto: netlink.XFRM_PROTO_ESP, Mode: netlink.XFRM_MODE_TUNNEL, Reqid: reqid}
	return []*netlink.XfrmPolicy{
		{Src: ipnet(remote), Dst: ipnet(localNet), Dir: netlink.XFRM_DIR_IN, Tmpls: []netlink.XfrmPolicyTmpl{in}},
		{Src: ipnet(remote), Dst: ipnet(localNet), Dir: netlink.XFRM_DIR_FWD, Tmpls: []netlink.XfrmPolicyTmpl{in}},
		{Src: ipnet(localNet), Dst: ipnet(remote), Dir: netlink.XFRM_DIR_OUT, Tmpls: []netlink.XfrmPolicyTmpl{out}},
	}
}

func waitEvent(t *testing.T, ch <-chan xfrm.Event, what string, match func(xfrm.Event) bool) xfrm.Event {
	t.Helper()
	deadline := time.After(5 * time.Second)
	for {
		select {
		case e, ok := <-ch:
			if !ok {
				t.Fatalf("event channel closed while waiting for %s", what)
			}
			if match(e) {
				return e
			}
		case <-deadline:
			t.Fatalf("no event for %s within 5 s", what)
		}
	}
}

// TestKernelPoliciesInNamespace reads and watches real XFRM policies on
// the host kernel (which has XFRM but no esp4: states are tested in the
// VM, see vmtest). It covers IPv6 selectors that vishvananda/netlink's
// own parser misreads as IPv4 (fd00::/8, 2001:db8::/32, ::/0).
func TestKernelPoliciesInNamespace(t *testing.T) {
	l := netlab.New(t)
	node, err := l.AddNS("node")
	if err != nil {
		t.Fatal(err)
	}
	vip, vip6 := netip.MustParseAddr("192.0.2.10"), netip.MustParseAddr("2001:db8:f::10")
	for _, a := range []netip.Addr{vip, vip6} {
		if err := node.AddAddr("lo", netip.PrefixFrom(a, a.BitLen())); err != nil {
			t.Fatal(err)
		}
	}
	k, err := xfrm.New(xfrm.Options{Netns: node.NsHandle()})
	if err != nil {
		t.Fatal(err)
	}
	defer k.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	events, err := k.Watch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	peer, peer6 := netip.MustParseAddr("198.51.100.1"), netip.MustParseAddr("2001:db8:100::1")
	remote4 := netip.MustParsePrefix("172.16.1.0/24")
	remote6 := []netip.Prefix{netip.MustParsePrefix("fd00::/8"), netip.MustParsePrefix("2001:db8::/32")}
	pols := tunnelPolicies(vip, peer, netip.MustParsePrefix("10.0.0.0/16"), remote4, 1)
	for i, r := range remote6 {
		pols = append(pols, tunnelPolicies(vip6, peer6, netip.MustParsePrefix("::/0"), r, 2+i)...)
	}
	for _, p := range pols {
		if err := node.Handle().XfrmPolicyAdd(p); err != nil {
			t.Fatalf("add policy %v: %v", p, err)
		}
	}
	// Every add arrives as an event, decoded with its family.
	var seen []xfrm.Policy
	for len(seen) < len(pols) {
		e := waitEvent(t, events, "policy adds", func(e xfrm.Event) bool { return e.Kind == xfrm.EventPolicy })
		seen = append(seen, e.Policy)
	}
	snap, err := k.Read()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(snap.Local, vip) || !slices.Contains(snap.Local, vip6) {
		t.Fatalf("local addresses %v lack the VIPs", snap.Local)
	}
	if len(snap.Policies) != len(pols) || len(snap.States) != 0 {
		t.Fatalf("read %d policies and %d states, want %d and 0", len(snap.Policies), len(snap.States), len(pols))
	}
	remotes, locals := map[netip.Prefix]int{}, map[netip.Prefix]int{}
	for _, p := range snap.Policies {
		r, lo := p.Src, p.Dst
		if p.Dir == xfrm.DirOut {
			r, lo = p.Dst, p.Src
		}
		remotes[r]++
		locals[lo]++
		if p.Index == 0 || len(p.Tmpls) != 1 || p.Tmpls[0].Mode != xfrm.ModeTunnel {
			t.Errorf("policy read back as %+v", p)
		}
		if !slices.ContainsFunc(seen, func(s xfrm.Policy) bool { return s.Index == p.Index && s.Src == p.Src && s.Dst == p.Dst }) {
			t.Errorf("dumped policy %+v differs from its add event", p)
		}
	}
	for _, r := range append(remote6, remote4) {
		if remotes[r] != 3 {
			t.Errorf("remote selector %v: %d policies, want 3 (in, fwd, out); read %v", r, remotes[r], remotes)
		}
	}
	if locals[netip.MustParsePrefix("::/0")] != 6 {
		t.Errorf("local selector ::/0 read back as %v", locals)
	}
	// Without SAs no tunnel is reported, whatever the policies say.
	if f := xfrm.Group(xfrm.NewLocal(snap.Local...), snap.States, snap.Policies); len(f.Tunnels) != 0 {
		t.Fatalf("tunnels from policies alone: %+v", f.Tunnels)
	}

	// A delete carries the index; a flush asks for a full read.
	del := snap.Policies[0]
	if err := node.Handle().XfrmPolicyDel(&netlink.XfrmPolicy{Index: int(del.Index), Dir: netlink.Dir(del.Dir)}); err != nil {
		t.Fatalf("delete policy %d: %v", del.Index, err)
	}
	waitEvent(t, events, "policy delete", func(e xfrm.Event) bool {
		return e.Kind == xfrm.EventPolicyGone && e.Policy.Index == del.Index && e.Policy.Dir == del.Dir
	})
	if err := node.Handle().XfrmPolicyFlush(); err != nil {
		t.Fatal(err)
	}
	waitEvent(t, events, "flush", func(e xfrm.Event) bool { return e.Kind == xfrm.EventResync })
	cancel()
	select {
	case _, ok := <-events:
		for ok {
			_, ok = <-events
		}
	case <-time.After(3 * time.Second):
		t.Fatal("event channel not closed after the context ended")
	}
}

// BenchmarkReadPolicies compares the agent's full read with iproute2's
// dump of the same database, on the host kernel (policies only: it has no
// esp4): 10,000 tunnels' in, fwd and out policies (30,000) in a fresh
// namespace. Run as root:
//
//	go test -run '^$' -bench ReadPolicies ./xfrm/
func BenchmarkReadPolicies(b *testing.B) {
	l := netlab.New(b)
	node, err := l.AddNS("node")
	if err != nil {
		b.Fatal(err)
	}
	vip := netip.MustParseAddr("192.0.2.10")
	const tunnels = 10_000
	for i := 0; i < tunnels; i++ {
		peer := netip.AddrFrom4([4]byte{100, 64 + byte(i>>16), byte(i >> 8), byte(i)})
		v := uint32(10<<24|128<<16) + uint32(i)*32
		remote := netip.PrefixFrom(netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)}), 27)
		for _, p := range tunnelPolicies(vip, peer, netip.MustParsePrefix("10.0.0.0/16"), remote, i+1) {
			if err := node.Handle().XfrmPolicyAdd(p); err != nil {
				b.Fatal(err)
			}
		}
	}
	k, err := xfrm.New(xfrm.Options{Netns: node.NsHandle()})
	if err != nil {
		b.Fatal(err)
	}
	defer k.Close()
	b.Run("agent", func(b *testing.B) {
		for b.Loop() {
			s, err := k.Read()
			if err != nil || len(s.Policies) != 3*tunnels {
				b.Fatalf("read %d policies: %v", len(s.Policies), err)
			}
		}
	})
	b.Run("iproute2", func(b *testing.B) {
		if _, err := exec.LookPath("ip"); err != nil {
			b.Skip("no ip(8)")
		}
		for b.Loop() {
			out, err := node.Run(context.Background(), "ip", "xfrm", "policy", "list")
			if err != nil || bytes.Count(out, []byte("\nsrc ")) < 3*tunnels-1 {
				b.Fatalf("ip xfrm policy list: %v (%d bytes)", err, len(out))
			}
		}
	})
}
