package xfrm

import (
	"net/netip"
	"reflect"
	"slices"
	"testing"
)

// The sets below are written the way strongSwan (kernel-netlink) installs
// a CHILD_SA on a responder whose local address is the VIP: an inbound
// and an outbound ESP state with the same reqid, and in, fwd and out
// tunnel-mode policies whose templates carry the outer addresses.

var (
	vip  = netip.MustParseAddr("192.0.2.10")
	vip6 = netip.MustParseAddr("2001:db8:f::10")
	lan  = netip.MustParsePrefix("10.0.0.0/16")
	lan6 = netip.MustParsePrefix("2001:db8:aaaa::/48")
)

type child struct {
	local, peer netip.Addr
	reqid       uint32
	spiIn       uint32
	spiOut      uint32
	natPort     uint16 // 0: no NAT-T
	remote      []netip.Prefix
	localNet    netip.Prefix
}

// states returns the inbound and outbound SA of a child.
func (c child) states() []SA {
	in := SA{Src: c.peer, Dst: c.local, Proto: ProtoESP, SPI: c.spiIn, Reqid: c.reqid, Mode: ModeTunnel}
	out := SA{Src: c.local, Dst: c.peer, Proto: ProtoESP, SPI: c.spiOut, Reqid: c.reqid, Mode: ModeTunnel}
	if c.natPort != 0 {
		in.Encap = Encap{Type: 2, SrcPort: c.natPort, DstPort: 4500}
		out.Encap = Encap{Type: 2, SrcPort: 4500, DstPort: c.natPort}
	}
	return []SA{in, out}
}

// policies returns the in, fwd and out policies of a child, one set per
// remote subnet, indexes from base.
func (c child) policies(base uint32) []Policy {
	var ps []Policy
	for i, r := range c.remote {
		inT := []Template{{Src: c.peer, Dst: c.local, Proto: ProtoESP, Mode: ModeTunnel, Reqid: c.reqid}}
		outT := []Template{{Src: c.local, Dst: c.peer, Proto: ProtoESP, Mode: ModeTunnel, Reqid: c.reqid}}
		idx := base + uint32(i)*8
		ps = append(ps,
			Policy{Index: idx, Dir: DirIn, Src: r, Dst: c.localNet, Tmpls: inT},
			Policy{Index: idx + 2, Dir: DirFwd, Src: r, Dst: c.localNet, Tmpls: inT},
			Policy{Index: idx + 1, Dir: DirOut, Src: c.localNet, Dst: r, Tmpls: outT},
		)
	}
	return ps
}

func pfx(s ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, x := range s {
		out = append(out, netip.MustParsePrefix(x))
	}
	return out
}

func addr4(s string) netip.Addr { return netip.MustParseAddr(s) }

func build(local []netip.Addr, children ...child) ([]SA, []Policy) {
	var sas []SA
	var pols []Policy
	for i, c := range children {
		sas = append(sas, c.states()...)
		pols = append(pols, c.policies(uint32(i+1)*1000)...)
	}
	return sas, pols
}

func TestGroupIPv4OneChild(t *testing.T) {
	peer := addr4("198.51.100.1")
	sas, pols := build(nil, child{local: vip, peer: peer, reqid: 1, spiIn: 0xc0000001, spiOut: 0x0000a001,
		remote: pfx("172.16.1.0/24"), localNet: lan})
	sas[0].Bytes, sas[0].Packets, sas[0].UseTime = 1000, 10, 1700000000
	sas[1].Bytes, sas[1].Packets, sas[1].UseTime = 500, 5, 1700000100
	f := Group(NewLocal(vip, addr4("10.0.0.1")), sas, pols)
	want := Facts{
		Tunnels: []Tunnel{{
			Peer: peer, Subnets: pfx("172.16.1.0/24"), SAs: 2, Bytes: 1500, Packets: 15, LastUse: 1700000100,
			SPIs: []SPI{{SPI: 0xc0000001, Reqid: 1, Dir: In, Proto: "esp"}, {SPI: 0xa001, Reqid: 1, Dir: Out, Proto: "esp"}},
		}},
		Summary: Summary{SAs: 2, Tunnels: 1},
	}
	if !reflect.DeepEqual(f, want) {
		t.Fatalf("got  %+v\nwant %+v", f, want)
	}
}

func TestGroupIPv6(t *testing.T) {
	peer := netip.MustParseAddr("2001:db8:100::1")
	// fd00::/8 and 2001:db8::/32 are the selectors vishvananda/netlink's own
	// parser turns into IPv4 (decode_test.go checks the decoder keeps them).
	sas, pols := build(nil, child{local: vip6, peer: peer, reqid: 7, spiIn: 0x100, spiOut: 0x200,
		remote: pfx("fd00::/8", "2001:db8::/32"), localNet: lan6})
	f := Group(NewLocal(vip6), sas, pols)
	if len(f.Tunnels) != 1 {
		t.Fatalf("want 1 tunnel, got %+v", f)
	}
	tn := f.Tunnels[0]
	if tn.Peer != peer || tn.SAs != 2 || !slices.Equal(tn.Subnets, pfx("2001:db8::/32", "fd00::/8")) {
		t.Fatalf("got %+v", tn)
	}
}

func TestGroupNATT(t *testing.T) {
	peer := addr4("203.0.113.5")
	sas, pols := build(nil, child{local: vip, peer: peer, reqid: 3, spiIn: 1, spiOut: 2, natPort: 31337,
		remote: pfx("192.168.7.0/24"), localNet: lan})
	f := Group(NewLocal(vip), sas, pols)
	if len(f.Tunnels) != 1 {
		t.Fatalf("got %+v", f)
	}
	if got, want := f.Tunnels[0].NATT, []NATT{{Port: 31337, LocalPort: 4500}}; !slices.Equal(got, want) {
		t.Fatalf("NATT = %+v, want %+v (both directions give one port pair)", got, want)
	}
}

func TestGroupSeveralChildrenAndRekeyOverlap(t *testing.T) {
	peer := addr4("198.51.100.2")
	c1 := child{local: vip, peer: peer, reqid: 1, spiIn: 0x11, spiOut: 0x12, remote: pfx("172.16.2.0/24"), localNet: lan}
	c2 := child{local: vip, peer: peer, reqid: 2, spiIn: 0x21, spiOut: 0x22, remote: pfx("172.16.3.0/25", "172.16.3.128/25"), localNet: lan}
	sas, pols := build(nil, c1, c2)
	// Rekey of c1: the new SAs exist beside the old ones until the old
	// ones are deleted; same reqid, same policies.
	rekeyed := c1
	rekeyed.spiIn, rekeyed.spiOut = 0x13, 0x14
	sas = append(sas, rekeyed.states()...)
	f := Group(NewLocal(vip), sas, pols)
	if len(f.Tunnels) != 1 {
		t.Fatalf("got %+v", f)
	}
	tn := f.Tunnels[0]
	if tn.SAs != 6 || len(tn.SPIs) != 6 {
		t.Fatalf("SAs = %d (%d SPIs), want 6: two CHILD_SAs, one of them in rekey overlap", tn.SAs, len(tn.SPIs))
	}
	if want := pfx("172.16.2.0/24", "172.16.3.0/25", "172.16.3.128/25"); !slices.Equal(tn.Subnets, want) {
		t.Fatalf("subnets %v, want %v", tn.Subnets, want)
	}
	var reqids []uint32
	for _, s := range tn.SPIs {
		reqids = append(reqids, s.Reqid)
	}
	if !slices.Equal(reqids, []uint32{1, 1, 1, 1, 2, 2}) {
		t.Fatalf("SPIs not sorted by reqid: %+v", tn.SPIs)
	}
	if f.Summary != (Summary{SAs: 6, Tunnels: 1}) {
		t.Fatalf("summary %+v", f.Summary)
	}
}

func TestGroupAttribution(t *testing.T) {
	a, b, c := addr4("198.51.100.3"), addr4("198.51.100.4"), addr4("198.51.100.5")
	ca := child{local: vip, peer: a, reqid: 1, spiIn: 1, spiOut: 2, remote: pfx("172.16.10.0/24"), localNet: lan}
	cb := child{local: vip, peer: b, reqid: 2, spiIn: 3, spiOut: 4, remote: pfx("172.16.11.0/24"), localNet: lan}
	// c has a trap policy but no SA: not a tunnel, and its subnet must not
	// land anywhere.
	cc := child{local: vip, peer: c, reqid: 3, remote: pfx("172.16.12.0/24"), localNet: lan}
	sas, pols := build(nil, ca, cb)
	pols = append(pols, cc.policies(9000)...)
	// A transport-mode policy to a: no protected subnet.
	pols = append(pols, Policy{Index: 7001, Dir: DirOut, Src: netip.PrefixFrom(vip, 32), Dst: netip.PrefixFrom(a, 32),
		Tmpls: []Template{{Src: vip, Dst: a, Proto: ProtoESP, Mode: ModeTransport, Reqid: 1}}})
	// A block policy and a socket policy naming a in a template.
	pols = append(pols,
		Policy{Index: 7009, Dir: DirOut, Action: 1, Dst: netip.MustParsePrefix("172.16.99.0/24"),
			Tmpls: []Template{{Src: vip, Dst: a, Proto: ProtoESP, Mode: ModeTunnel}}},
		Policy{Index: 7011, Dir: 3, Dst: netip.MustParsePrefix("172.16.98.0/24"),
			Tmpls: []Template{{Src: a, Dst: vip, Proto: ProtoESP, Mode: ModeTunnel}}})
	// Larval (SPI reserved), IPComp, and an SA between two foreign
	// addresses.
	sas = append(sas,
		SA{Src: c, Dst: vip, Proto: ProtoESP, SPI: 99, Reqid: 3, Larval: true},
		SA{Src: a, Dst: vip, Proto: ProtoComp, SPI: 0x4001, Reqid: 1},
		SA{Src: b, Dst: c, Proto: ProtoESP, SPI: 77},
		SA{Src: vip, Dst: vip, Proto: ProtoESP, SPI: 78},
	)
	f := Group(NewLocal(vip), sas, pols)
	if f.Summary != (Summary{SAs: 4, Tunnels: 2, Unattributed: 2, Ignored: 2}) {
		t.Fatalf("summary %+v", f.Summary)
	}
	if len(f.Tunnels) != 2 || f.Tunnels[0].Peer != a || f.Tunnels[1].Peer != b {
		t.Fatalf("tunnels %+v", f.Tunnels)
	}
	if !slices.Equal(f.Tunnels[0].Subnets, pfx("172.16.10.0/24")) || !slices.Equal(f.Tunnels[1].Subnets, pfx("172.16.11.0/24")) {
		t.Fatalf("subnets a=%v b=%v", f.Tunnels[0].Subnets, f.Tunnels[1].Subnets)
	}
}

// TestMirrorFollowsEvents steps a mirror through the life of a tunnel and
// checks after every event that it equals Group on the same content and
// that Changed names exactly the peers that changed.
func TestMirrorFollowsEvents(t *testing.T) {
	peer, other := addr4("198.51.100.6"), addr4("198.51.100.7")
	c := child{local: vip, peer: peer, reqid: 1, spiIn: 0x31, spiOut: 0x32, remote: pfx("172.16.20.0/24"), localNet: lan}
	o := child{local: vip, peer: other, reqid: 2, spiIn: 0x41, spiOut: 0x42, remote: pfx("172.16.21.0/24"), localNet: lan}
	oSAs, oPols := build(nil, o)
	m := NewMirror()
	m.Reset(Snapshot{Local: []netip.Addr{vip}, States: oSAs, Policies: oPols})
	if got := m.Changed(); !slices.Equal(got, []netip.Addr{other}) {
		t.Fatalf("after reset: changed %v", got)
	}
	states, pols := slices.Clone(oSAs), slices.Clone(oPols)
	step := func(name string, e Event, wantChanged ...netip.Addr) {
		t.Helper()
		if !m.Apply(e) {
			t.Fatalf("%s: Apply refused %+v", name, e)
		}
		switch e.Kind {
		case EventState:
			states = slices.DeleteFunc(states, func(s SA) bool { return s.key() == e.SA.key() })
			states = append(states, e.SA)
		case EventStateGone:
			states = slices.DeleteFunc(states, func(s SA) bool { return s.key() == e.SA.key() })
		case EventPolicy:
			pols = slices.DeleteFunc(pols, func(p Policy) bool { return p.key() == e.Policy.key() })
			pols = append(pols, e.Policy)
		case EventPolicyGone:
			pols = slices.DeleteFunc(pols, func(p Policy) bool { return p.key() == e.Policy.key() })
		}
		if got := m.Changed(); !slices.Equal(got, wantChanged) {
			t.Fatalf("%s: changed %v, want %v", name, got, wantChanged)
		}
		if got, want := m.Facts(), Group(NewLocal(vip), states, pols); !reflect.DeepEqual(got, want) {
			t.Fatalf("%s: mirror\n %+v\nGroup\n %+v", name, got, want)
		}
	}
	cp := c.policies(100)
	cs := c.states()
	// strongSwan's order as responder: policies may come first (no tunnel
	// yet), then the inbound SA, then the outbound one.
	step("policy in", Event{Kind: EventPolicy, Policy: cp[0]})
	step("policy fwd", Event{Kind: EventPolicy, Policy: cp[1]})
	step("policy out", Event{Kind: EventPolicy, Policy: cp[2]})
	step("sa in", Event{Kind: EventState, SA: cs[0]}, peer)
	step("sa out", Event{Kind: EventState, SA: cs[1]}, peer)
	step("sa out again (no change)", Event{Kind: EventState, SA: cs[1]})
	counted := cs[1]
	counted.Bytes = 4242
	step("counters", Event{Kind: EventState, SA: counted}, peer)
	r := c
	r.spiIn, r.spiOut = 0x33, 0x34
	rs := r.states()
	step("rekey in", Event{Kind: EventState, SA: rs[0]}, peer)
	step("rekey out", Event{Kind: EventState, SA: rs[1]}, peer)
	step("old in gone", Event{Kind: EventStateGone, SA: SA{Dst: cs[0].Dst, SPI: cs[0].SPI, Proto: ProtoESP}}, peer)
	step("old out gone", Event{Kind: EventStateGone, SA: SA{Dst: cs[1].Dst, SPI: cs[1].SPI, Proto: ProtoESP}}, peer)
	// The subnet stays while any of the three policies names it.
	step("policy out gone", Event{Kind: EventPolicyGone, Policy: Policy{Index: cp[2].Index, Dir: DirOut}})
	step("gone twice", Event{Kind: EventPolicyGone, Policy: Policy{Index: cp[2].Index, Dir: DirOut}})
	step("policy in gone", Event{Kind: EventPolicyGone, Policy: Policy{Index: cp[0].Index, Dir: DirIn}})
	step("policy fwd gone", Event{Kind: EventPolicyGone, Policy: Policy{Index: cp[1].Index, Dir: DirFwd}}, peer)
	if tn, _ := m.Tunnel(peer); len(tn.Subnets) != 0 {
		t.Fatalf("subnets %v without policies", tn.Subnets)
	}
	step("new in gone", Event{Kind: EventStateGone, SA: rs[0]}, peer)
	step("new out gone", Event{Kind: EventStateGone, SA: rs[1]}, peer)
	if _, ok := m.Tunnel(peer); ok {
		t.Fatal("peer without SAs still has a tunnel")
	}
	if m.Apply(Event{Kind: EventResync, Reason: "flush"}) {
		t.Fatal("Apply accepted a resync")
	}
	// A full read that lost other's out SA (a missed event) heals it.
	m.Reset(Snapshot{Local: []netip.Addr{vip}, States: oSAs[:1], Policies: oPols})
	if got := m.Changed(); !slices.Equal(got, []netip.Addr{other}) {
		t.Fatalf("after healing reset: changed %v", got)
	}
}
