package vmtest

import (
	"bytes"
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/tunneldirector/tunneldirector/internal/netlab"
	"github.com/tunneldirector/tunneldirector/internal/vmlab"
)

func hostNet(a netip.Addr) *net.IPNet {
	return &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(a.BitLen(), a.BitLen())}
}

// TestGuestESPTransport installs ESP states and policies through
// vishvananda/netlink in two namespaces, reads them back, and sends UDP
// between them: on the wire (captured in the switch between them) only ESP
// with the chosen SPI appears, and the receiver gets the plaintext. IPv4
// uses AES-GCM (esp4, gcm), IPv6 AES-CBC with HMAC-SHA256 (esp6, authenc).
func TestGuestESPTransport(t *testing.T) {
	vmlab.RequireGuest(t)
	l := netlab.New(t)
	a, err := l.AddNS("a")
	if err != nil {
		t.Fatal(err)
	}
	b, err := l.AddNS("b")
	if err != nil {
		t.Fatal(err)
	}
	sw, err := l.AddSwitch("wire")
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range []*netlab.NS{a, b} {
		if err := sw.Attach(n, "eth0"); err != nil {
			t.Fatal(err)
		}
	}
	addrs := map[*netlab.NS][2]netip.Addr{
		a: {netip.MustParseAddr("198.51.100.1"), netip.MustParseAddr("2001:db8:100::1")},
		b: {netip.MustParseAddr("198.51.100.2"), netip.MustParseAddr("2001:db8:100::2")},
	}
	for n, as := range addrs {
		if err := n.AddAddr("eth0", netip.PrefixFrom(as[0], 24)); err != nil {
			t.Fatal(err)
		}
		if err := n.AddAddr("eth0", netip.PrefixFrom(as[1], 64)); err != nil {
			t.Fatal(err)
		}
	}
	wire, err := sw.NS.Capture("")
	if err != nil {
		t.Fatal(err)
	}
	defer wire.Close()
	gcm := &netlink.XfrmStateAlgo{Name: "rfc4106(gcm(aes))", Key: bytes.Repeat([]byte{0x11}, 20), ICVLen: 128}
	cbc := &netlink.XfrmStateAlgo{Name: "cbc(aes)", Key: bytes.Repeat([]byte{0x22}, 16)}
	hmac := &netlink.XfrmStateAlgo{Name: "hmac(sha256)", Key: bytes.Repeat([]byte{0x33}, 32), TruncateLen: 128}
	for fi, v6 := range []bool{false, true} {
		src, dst := addrs[a][fi], addrs[b][fi]
		spi := 0x1000 + fi
		st := &netlink.XfrmState{Src: src.AsSlice(), Dst: dst.AsSlice(), Proto: netlink.XFRM_PROTO_ESP,
			Mode: netlink.XFRM_MODE_TRANSPORT, Spi: spi, Reqid: 10 + fi}
		if v6 {
			st.Crypt, st.Auth = cbc, hmac
		} else {
			st.Aead = gcm
		}
		tmpl := netlink.XfrmPolicyTmpl{Src: src.AsSlice(), Dst: dst.AsSlice(), Proto: netlink.XFRM_PROTO_ESP,
			Mode: netlink.XFRM_MODE_TRANSPORT, Reqid: 10 + fi}
		for _, side := range []struct {
			ns  *netlab.NS
			dir netlink.Dir
		}{{a, netlink.XFRM_DIR_OUT}, {b, netlink.XFRM_DIR_IN}} {
			if err := side.ns.Handle().XfrmStateAdd(st); err != nil {
				t.Fatalf("%s: add ESP state spi %#x (v6=%v): %v", side.ns.Name, spi, v6, err)
			}
			pol := &netlink.XfrmPolicy{Src: hostNet(src), Dst: hostNet(dst), Proto: netlink.Proto(netlab.ProtoUDP),
				Dir: side.dir, Tmpls: []netlink.XfrmPolicyTmpl{tmpl}}
			if err := side.ns.Handle().XfrmPolicyAdd(pol); err != nil {
				t.Fatalf("%s: add policy (v6=%v): %v", side.ns.Name, v6, err)
			}
		}
	}
	for _, n := range []*netlab.NS{a, b} {
		states, err := n.Handle().XfrmStateList(netlink.FAMILY_ALL)
		if err != nil {
			t.Fatal(err)
		}
		pols, err := n.Handle().XfrmPolicyList(netlink.FAMILY_ALL)
		if err != nil {
			t.Fatal(err)
		}
		if len(states) != 2 || len(pols) != 2 {
			t.Fatalf("%s: read back %d states and %d policies, want 2 and 2", n.Name, len(states), len(pols))
		}
		for _, s := range states {
			if s.Proto != netlink.XFRM_PROTO_ESP || (s.Spi != 0x1000 && s.Spi != 0x1001) {
				t.Errorf("%s: unexpected state %v", n.Name, s)
			}
		}
	}
	for fi, v6 := range []bool{false, true} {
		src, dst := addrs[a][fi], addrs[b][fi]
		rx, err := b.UDPSocket(netip.AddrPortFrom(dst, 7000))
		if err != nil {
			t.Fatal(err)
		}
		tag := fmt.Sprintf("secret-v6=%v", v6)
		if err := a.SendUDP(netip.AddrPortFrom(src, 7001), netip.AddrPortFrom(dst, 7000), []byte(tag)); err != nil {
			t.Fatal(err)
		}
		rx.SetReadDeadline(time.Now().Add(3 * time.Second))
		buf := make([]byte, 256)
		k, _, err := rx.ReadFromUDPAddrPort(buf)
		rx.Close()
		if err != nil || string(buf[:k]) != tag {
			t.Fatalf("v6=%v: receiver got %q, %v; want %q", v6, buf[:k], err, tag)
		}
		spi := uint32(0x1000 + fi)
		if _, ok := wire.Wait(time.Second, func(p netlab.Packet) bool { return p.Proto == netlab.ProtoESP && p.SPI == spi && p.Dst == dst }); !ok {
			t.Errorf("v6=%v: no ESP with SPI %#x on the wire; saw %v", v6, spi, wire.Packets())
		}
		if n := wire.Count(netlab.Tagged(tag)); n != 0 {
			t.Errorf("v6=%v: plaintext %q crossed the wire %d times", v6, tag, n)
		}
	}
}
