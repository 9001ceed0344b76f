package nflog

import (
	"encoding/binary"
	"testing"

	"github.com/mdlayher/netlink"
	"github.com/ti-mo/netfilter"
)

func packetMsg(t testing.TB, mark uint32, payload []byte) netlink.Message {
	hdr := []byte{0x08, 0x00, 0, 0}
	m := make([]byte, 4)
	binary.BigEndian.PutUint32(m, mark)
	msg, err := netfilter.MarshalNetlink(netfilter.Header{SubsystemID: netfilter.NFSubsysULOG, MessageType: msgPacket, ResourceID: 7},
		[]netfilter.Attribute{{Type: attrPacketHdr, Data: hdr}, {Type: attrMark, Data: m}, {Type: attrPrefix, Data: []byte("td\x00")}, {Type: attrPayload, Data: payload}})
	if err != nil {
		t.Fatal(err)
	}
	return msg
}

func TestDecode(t *testing.T) {
	p, err := Decode(packetMsg(t, 0x7d001002, []byte{0x45, 1, 2}))
	if err != nil || p.Mark != 0x7d001002 || p.HWProtocol != 0x0800 || p.Prefix != "td" || len(p.Payload) != 3 {
		t.Fatalf("%+v %v", p, err)
	}
	bad := packetMsg(t, 1, nil)
	bad.Data = bad.Data[:4] // no attributes
	if _, err := Decode(bad); err == nil {
		t.Fatal("accepted a packet without payload")
	}
}

func FuzzDecode(f *testing.F) {
	f.Add(packetMsg(f, 5, []byte{0x45, 0, 0, 20}).Data)
	f.Add([]byte{0, 0, 0, 7})
	f.Fuzz(func(t *testing.T, b []byte) {
		m := netlink.Message{Header: netlink.Header{Type: netlink.HeaderType(uint16(netfilter.NFSubsysULOG) << 8)}, Data: b}
		p, err := Decode(m)
		if err == nil && p.Payload == nil {
			t.Fatal("accepted a packet without payload")
		}
	})
}
