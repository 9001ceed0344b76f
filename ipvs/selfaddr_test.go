package ipvs

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/internal/netlab"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// TestNSDirectorOwnAddressNotSteered sends real packets to an address
// inside a protected subnet: steered to the subnet's node while no host
// has it, delivered to the director itself once the director holds it
// (as a sync link or management address inside a protected subnet would
// be), and steered again when the address goes, with no Sync in between:
// the classifier follows the director's addresses as they change.
func TestNSDirectorOwnAddressNotSteered(t *testing.T) {
	l := newLab(t, Config{})
	ctx := context.Background()
	if _, err := l.dp.Sync(ctx, l.des); err != nil {
		t.Fatal(err)
	}
	tg := l.top.Target
	for _, sub := range []netip.Prefix{subnet4, subnet6} {
		v6 := sub.Addr().Is6()
		own := sub.Addr()
		for i := 0; i < 5; i++ {
			own = own.Next()
		}
		owner := map[bool]int{false: 1, true: 2}[v6] // node index of mark 2 / 3
		src := tg.If(netlab.IfTarget).Addr(v6)
		sendTo := func(dst netip.Addr, tag string) {
			t.Helper()
			if err := tg.SendUDP(netip.AddrPortFrom(src, 40000), netip.AddrPortFrom(dst, 9000), []byte(tag)); err != nil {
				t.Fatal(err)
			}
		}
		sendTo(own, fmt.Sprintf("before-%v", v6))
		l.expectAt(t, owner, fmt.Sprintf("before-%v", v6))

		bits := own.BitLen()
		if err := l.dir.AddAddr("lo", netip.PrefixFrom(own, bits)); err != nil {
			t.Fatal(err)
		}
		// IPv6 installs an address's local route from a work queue, a
		// little after the address: until then the kernel itself does
		// not treat it as local.
		waitLocal(t, l.dir, own)
		c, err := l.dir.UDPSocket(netip.AddrPortFrom(own, 9000))
		if err != nil {
			t.Fatal(err)
		}
		tag := fmt.Sprintf("own-%v", v6)
		sendTo(own, tag)
		if err := c.SetReadDeadline(time.Now().Add(2 * time.Second)); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 64)
		n, err := c.Read(buf)
		c.Close()
		for i, cp := range l.caps {
			if cp.Count(netlab.Tagged(tag)) > 0 {
				t.Fatalf("packet to the director's own address %s was steered to %s", own, l.top.Nodes[i].Name)
			}
		}
		if err != nil || string(buf[:n]) != tag {
			t.Fatalf("packet to the director's own address %s in protected subnet %s did not reach the director (read %q, %v)", own, sub, buf[:n], err)
		}
		// The rest of the subnet is still steered.
		other := sub.Addr().Next().Next()
		sendTo(other, fmt.Sprintf("other-%v", v6))
		l.expectAt(t, owner, fmt.Sprintf("other-%v", v6))

		a := &netlink.Addr{IPNet: &net.IPNet{IP: own.AsSlice(), Mask: net.CIDRMask(bits, bits)}}
		lo, err := l.dir.Link("lo")
		if err != nil {
			t.Fatal(err)
		}
		if err := l.dir.Handle().AddrDel(lo, a); err != nil {
			t.Fatalf("remove %s from the director: %v", own, err)
		}
		sendTo(own, fmt.Sprintf("after-%v", v6))
		l.expectAt(t, owner, fmt.Sprintf("after-%v", v6))
	}
}

// waitLocal waits until the kernel of h routes a as a local address.
func waitLocal(t *testing.T, h *netlab.Host, a netip.Addr) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		rs, err := h.Handle().RouteGet(a.AsSlice())
		if err == nil && len(rs) > 0 && rs[0].Type == unix.RTN_LOCAL {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %s is not routed as local after 5 s (%v, %v)", h.Name, a, rs, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
