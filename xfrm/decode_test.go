package xfrm

import (
	"encoding/binary"
	"net/netip"
	"reflect"
	"testing"

	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// The encoders below build messages the way the kernel lays them out,
// from nl's own wire structs, for round trips and fuzz seeds.

func family(a netip.Addr) uint16 {
	if a.Is4() {
		return unix.AF_INET
	}
	return unix.AF_INET6
}

func xaddr(a netip.Addr) (x nl.XfrmAddress) {
	copy(x[:], a.AsSlice())
	return x
}

func rtattr(typ int, data []byte) []byte { return nl.NewRtAttr(typ, data).Serialize() }

func u64(v uint64) []byte { return binary.NativeEndian.AppendUint64(nil, v) }
func u32(v uint32) []byte { return binary.NativeEndian.AppendUint32(nil, v) }

func encInfo(sa SA) nl.XfrmUsersaInfo {
	var info nl.XfrmUsersaInfo
	info.Family = family(sa.Dst)
	info.Id.Daddr, info.Saddr = xaddr(sa.Dst), xaddr(sa.Src)
	info.Id.Spi, info.Id.Proto = nl.Swap32(sa.SPI), uint8(sa.Proto)
	info.Reqid, info.Mode = sa.Reqid, uint8(sa.Mode)
	info.Curlft.Bytes, info.Curlft.Packets, info.Curlft.AddTime = sa.Bytes, sa.Packets, sa.AddTime
	return info
}

func encStateAttrs(sa SA) []byte {
	var b []byte
	if !sa.Larval {
		b = append(b, rtattr(nl.XFRMA_ALG_AEAD, make([]byte, 64+4+4+20))...)
	}
	if sa.Encap.Type != 0 {
		e := nl.XfrmEncapTmpl{EncapType: sa.Encap.Type, EncapSport: nl.Swap16(sa.Encap.SrcPort), EncapDport: nl.Swap16(sa.Encap.DstPort)}
		if sa.Encap.OriginalAddress.IsValid() {
			e.EncapOa = xaddr(sa.Encap.OriginalAddress)
		}
		b = append(b, rtattr(nl.XFRMA_ENCAP, e.Serialize())...)
	}
	if sa.Mark != (Mark{}) {
		m := nl.XfrmMark{Value: sa.Mark.Value, Mask: sa.Mark.Mask}
		b = append(b, rtattr(nl.XFRMA_MARK, m.Serialize())...)
	}
	if sa.Ifid != 0 {
		b = append(b, rtattr(nl.XFRMA_IF_ID, u32(sa.Ifid))...)
	}
	if sa.UseTime != 0 {
		b = append(b, rtattr(xfrmaLastUsed, u64(sa.UseTime))...)
	}
	return b
}

func encState(sa SA) []byte {
	info := encInfo(sa)
	return append(append([]byte(nil), info.Serialize()...), encStateAttrs(sa)...)
}

func encDelState(sa SA) []byte {
	id := nl.XfrmUsersaId{Daddr: xaddr(sa.Dst), Spi: nl.Swap32(sa.SPI), Family: family(sa.Dst), Proto: uint8(sa.Proto)}
	info := encInfo(sa)
	b := append([]byte(nil), id.Serialize()...)
	b = append(b, rtattr(nl.XFRMA_SA, info.Serialize())...)
	return append(b, encStateAttrs(sa)...)
}

func encExpire(sa SA, hard bool) []byte {
	info := encInfo(sa)
	b := append([]byte(nil), info.Serialize()...)
	pad := make([]byte, nl.SizeofXfrmUserExpire-nl.SizeofXfrmUsersaInfo)
	if hard {
		pad[0] = 1
	}
	return append(append(b, pad...), encStateAttrs(sa)...)
}

func encPolicyInfo(p Policy) nl.XfrmUserpolicyInfo {
	var info nl.XfrmUserpolicyInfo
	info.Sel.Family = family(p.Src.Addr())
	info.Sel.Saddr, info.Sel.Daddr = xaddr(p.Src.Addr()), xaddr(p.Dst.Addr())
	info.Sel.PrefixlenS, info.Sel.PrefixlenD = uint8(p.Src.Bits()), uint8(p.Dst.Bits())
	info.Index, info.Dir, info.Action = p.Index, uint8(p.Dir), p.Action
	return info
}

func encPolicyAttrs(p Policy) []byte {
	var b []byte
	if len(p.Tmpls) > 0 {
		var ts []byte
		for _, t := range p.Tmpls {
			ut := nl.XfrmUserTmpl{Family: family(t.Dst), Saddr: xaddr(t.Src), Reqid: t.Reqid, Mode: uint8(t.Mode)}
			ut.XfrmId.Daddr, ut.XfrmId.Proto, ut.XfrmId.Spi = xaddr(t.Dst), uint8(t.Proto), nl.Swap32(t.SPI)
			ts = append(ts, ut.Serialize()...)
		}
		b = append(b, rtattr(nl.XFRMA_TMPL, ts)...)
	}
	if p.Mark != (Mark{}) {
		m := nl.XfrmMark{Value: p.Mark.Value, Mask: p.Mark.Mask}
		b = append(b, rtattr(nl.XFRMA_MARK, m.Serialize())...)
	}
	return b
}

func encPolicy(p Policy) []byte {
	info := encPolicyInfo(p)
	return append(append([]byte(nil), info.Serialize()...), encPolicyAttrs(p)...)
}

func encDelPolicy(p Policy) []byte {
	info := encPolicyInfo(p)
	id := nl.XfrmUserpolicyId{Sel: info.Sel, Index: p.Index, Dir: uint8(p.Dir)}
	b := append([]byte(nil), id.Serialize()...)
	b = append(b, rtattr(nl.XFRMA_POLICY, info.Serialize())...)
	return append(b, encPolicyAttrs(p)...)
}

var (
	seedSA = SA{Src: netip.MustParseAddr("203.0.113.5"), Dst: vip, Proto: ProtoESP, SPI: 0xc0ffee01, Reqid: 9,
		Mode: ModeTunnel, Mark: Mark{Value: 7, Mask: 0xff}, Ifid: 3,
		Encap: Encap{Type: 2, SrcPort: 31337, DstPort: 4500},
		Bytes: 12345, Packets: 67, AddTime: 1700000000, UseTime: 1700000500}
	seedSA6 = SA{Src: vip6, Dst: netip.MustParseAddr("2001:db8::"), Proto: ProtoAH, SPI: 0x200, Reqid: 1, Mode: ModeTunnel, Larval: true}
	seedPol = Policy{Index: 0x1011, Dir: DirOut, Src: netip.MustParsePrefix("2001:db8::/32"), Dst: netip.MustParsePrefix("fd00::/8"),
		Mark: Mark{Value: 1, Mask: 1},
		Tmpls: []Template{
			{Src: vip6, Dst: netip.MustParseAddr("2001:db8:100::1"), Proto: ProtoComp, Mode: ModeTunnel, Reqid: 4},
			{Src: netip.MustParseAddr("::"), Dst: netip.MustParseAddr("::"), Proto: ProtoESP, Mode: ModeTransport, Reqid: 4},
		}}
	seedPol4 = Policy{Index: 0x20, Dir: DirFwd, Src: netip.MustParsePrefix("172.16.0.0/12"), Dst: netip.MustParsePrefix("0.0.0.0/0"),
		Tmpls: []Template{{Src: netip.MustParseAddr("198.51.100.1"), Dst: vip, Proto: ProtoESP, Mode: ModeTunnel, Reqid: 2}}}
)

func TestDecodeRoundTrip(t *testing.T) {
	for _, sa := range []SA{seedSA, seedSA6} {
		got, err := decodeState(encState(sa))
		if err != nil || !reflect.DeepEqual(got, sa) {
			t.Errorf("state round trip:\n got %+v (%v)\nwant %+v", got, err, sa)
		}
		ev, ok, err := decodeEvent(nl.XFRM_MSG_DELSA, encDelState(sa))
		if err != nil || !ok || ev.Kind != EventStateGone || ev.SA.key() != sa.key() {
			t.Errorf("DELSA: %+v ok=%v err=%v, want key %+v", ev, ok, err, sa.key())
		}
		ev, ok, err = decodeEvent(nl.XFRM_MSG_EXPIRE, encExpire(sa, true))
		if err != nil || !ok || ev.Kind != EventStateGone || ev.SA.key() != sa.key() {
			t.Errorf("hard EXPIRE: %+v ok=%v err=%v", ev, ok, err)
		}
		if _, ok, err := decodeEvent(nl.XFRM_MSG_EXPIRE, encExpire(sa, false)); ok || err != nil {
			t.Errorf("soft EXPIRE gave an event (ok=%v, err=%v)", ok, err)
		}
	}
	for _, p := range []Policy{seedPol, seedPol4} {
		got, err := decodePolicy(encPolicy(p))
		if err != nil || !reflect.DeepEqual(got, p) {
			t.Errorf("policy round trip:\n got %+v (%v)\nwant %+v", got, err, p)
		}
		ev, ok, err := decodeEvent(nl.XFRM_MSG_DELPOLICY, encDelPolicy(p))
		if err != nil || !ok || ev.Kind != EventPolicyGone || ev.Policy.key() != p.key() {
			t.Errorf("DELPOLICY: %+v ok=%v err=%v", ev, ok, err)
		}
	}
	for _, typ := range []uint16{nl.XFRM_MSG_FLUSHSA, nl.XFRM_MSG_FLUSHPOLICY, nl.XFRM_MSG_MIGRATE} {
		if ev, ok, _ := decodeEvent(typ, []byte{0}); !ok || ev.Kind != EventResync {
			t.Errorf("message %d: %+v, want a resync", typ, ev)
		}
	}
}

func TestDecodeRefusesTruncated(t *testing.T) {
	b := encState(seedSA)
	for _, n := range []int{0, 10, nl.SizeofXfrmUsersaInfo - 1, len(b) - 3} {
		if _, err := decodeState(b[:n]); err == nil {
			t.Errorf("state truncated to %d bytes decoded without error", n)
		}
	}
	bad := encInfo(seedSA)
	bad.Family = 99
	if _, err := decodeState(bad.Serialize()); err == nil {
		t.Error("state of address family 99 decoded without error")
	}
	p := encPolicyInfo(seedPol4)
	p.Sel.PrefixlenD = 33
	if _, err := decodePolicy(p.Serialize()); err == nil {
		t.Error("IPv4 selector /33 decoded without error")
	}
}

// FuzzDecodeEvent feeds arbitrary message bodies to the event decoder: it
// must never panic, and what it accepts must be well formed.
func FuzzDecodeEvent(f *testing.F) {
	f.Add(uint16(nl.XFRM_MSG_NEWSA), encState(seedSA))
	f.Add(uint16(nl.XFRM_MSG_UPDSA), encState(seedSA6))
	f.Add(uint16(nl.XFRM_MSG_DELSA), encDelState(seedSA))
	f.Add(uint16(nl.XFRM_MSG_EXPIRE), encExpire(seedSA6, true))
	f.Add(uint16(nl.XFRM_MSG_NEWPOLICY), encPolicy(seedPol))
	f.Add(uint16(nl.XFRM_MSG_DELPOLICY), encDelPolicy(seedPol4))
	f.Add(uint16(nl.XFRM_MSG_POLEXPIRE), append(encPolicy(seedPol4)[:nl.SizeofXfrmUserpolicyInfo], 1, 0, 0, 0, 0, 0, 0, 0))
	f.Fuzz(func(t *testing.T, typ uint16, b []byte) {
		ev, ok, err := decodeEvent(typ, b)
		if err != nil && ok {
			t.Fatalf("error %v with ok", err)
		}
		if !ok {
			return
		}
		switch ev.Kind {
		case EventState, EventStateGone:
			if !ev.SA.Dst.IsValid() || (ev.Kind == EventState && !ev.SA.Src.IsValid()) || ev.SA.Dst.Is4In6() {
				t.Fatalf("accepted state with bad addresses: %+v", ev.SA)
			}
		case EventPolicy:
			for _, pf := range []netip.Prefix{ev.Policy.Src, ev.Policy.Dst} {
				if pf.IsValid() && pf != pf.Masked() {
					t.Fatalf("accepted selector %v with host bits", pf)
				}
			}
		case EventPolicyGone, EventResync:
		default:
			t.Fatalf("unknown kind %d", ev.Kind)
		}
	})
}
