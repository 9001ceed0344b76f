package conntrack

import (
	"fmt"
	"net/netip"

	"github.com/tunneldirector/tunneldirector/internal/enum"
)

// Tuple is one direction of a conntrack entry: addresses, protocol and
// ports. It holds no pointer (addresses are 16-byte arrays, IPv4 mapped
// into IPv6 as netip does), so a map of a million tuples costs the
// garbage collector nothing to scan, and it is comparable: a map key.
//
// For ICMP and ICMPv6, SrcPort holds the echo id and DstPort the type
// (high byte) and code (low byte), as the kernel's tuple does. Protocols
// without ports (ESP, AH and every other protocol conntrack tracks
// generically) leave both ports zero.
type Tuple struct {
	Src, Dst         [16]byte
	SrcPort, DstPort uint16
	Proto            uint8
	// V6 says whether the addresses are IPv6 (else IPv4-mapped IPv4).
	V6 bool
}

// MakeTuple builds a tuple from netip addresses (both of one family).
func MakeTuple(proto uint8, src, dst netip.Addr, sport, dport uint16) Tuple {
	return Tuple{Src: src.As16(), Dst: dst.As16(), SrcPort: sport, DstPort: dport, Proto: proto, V6: src.Is6() && !src.Is4In6()}
}

// SrcAddr returns the source address.
func (t *Tuple) SrcAddr() netip.Addr { return addrOf(t.Src, t.V6) }

// DstAddr returns the destination address.
func (t *Tuple) DstAddr() netip.Addr { return addrOf(t.Dst, t.V6) }

func addrOf(a [16]byte, v6 bool) netip.Addr {
	if v6 {
		return netip.AddrFrom16(a)
	}
	return netip.AddrFrom16(a).Unmap()
}

// Inverse returns the tuple a reply without NAT would carry: addresses
// and ports swapped (for ICMP echo: the reply type).
func (t Tuple) Inverse() Tuple {
	r := t
	r.Src, r.Dst = t.Dst, t.Src
	switch t.Proto {
	case ProtoICMP, ProtoICMPv6:
		typ, code := uint8(t.DstPort>>8), uint8(t.DstPort)
		r.DstPort = uint16(icmpInverse(t.Proto, typ))<<8 | uint16(code)
	default:
		r.SrcPort, r.DstPort = t.DstPort, t.SrcPort
	}
	return r
}

// icmpInverse maps an ICMP query type to its reply type, as the kernel's
// icmp_invert_tuple does; other types map to themselves.
func icmpInverse(proto, typ uint8) uint8 {
	if proto == ProtoICMP {
		switch typ {
		case 8:
			return 0 // echo request -> reply
		case 0:
			return 8
		case 13:
			return 14 // timestamp
		case 14:
			return 13
		case 15:
			return 16 // information
		case 16:
			return 15
		case 17:
			return 18 // address mask
		case 18:
			return 17
		}
		return typ
	}
	switch typ {
	case 128:
		return 129 // echo request -> reply
	case 129:
		return 128
	case 139:
		return 140 // node information
	case 140:
		return 139
	}
	return typ
}

// String writes the tuple as conntrack(8) would: "tcp 10.0.0.1:1234 ->
// 10.0.0.2:80".
func (t Tuple) String() string {
	s, d := t.SrcAddr(), t.DstAddr()
	switch {
	case hasPorts(t.Proto):
		return fmt.Sprintf("%s %s -> %s", ProtoName(t.Proto), netip.AddrPortFrom(s, t.SrcPort), netip.AddrPortFrom(d, t.DstPort))
	case t.Proto == ProtoICMP || t.Proto == ProtoICMPv6:
		return fmt.Sprintf("%s %s -> %s type %d code %d id %d", ProtoName(t.Proto), s, d, t.DstPort>>8, t.DstPort&0xff, t.SrcPort)
	}
	return fmt.Sprintf("%s %s -> %s", ProtoName(t.Proto), s, d)
}

// Protocol numbers the codec treats specially.
const (
	ProtoICMP    = 1
	ProtoTCP     = 6
	ProtoUDP     = 17
	ProtoDCCP    = 33
	ProtoGRE     = 47
	ProtoESP     = 50
	ProtoAH      = 51
	ProtoICMPv6  = 58
	ProtoSCTP    = 132
	ProtoUDPLite = 136
)

// hasPorts says whether the kernel's tuple of a protocol carries two
// 16-bit ports (GRE's are its keys): the kernel refuses a tuple of these
// protocols without both.
func hasPorts(proto uint8) bool {
	switch proto {
	case ProtoTCP, ProtoUDP, ProtoDCCP, ProtoGRE, ProtoSCTP, ProtoUDPLite:
		return true
	}
	return false
}

var protoNames = map[uint8]string{ProtoICMP: "icmp", ProtoTCP: "tcp", ProtoUDP: "udp", ProtoDCCP: "dccp", ProtoGRE: "gre",
	ProtoESP: "esp", ProtoAH: "ah", ProtoICMPv6: "icmpv6", ProtoSCTP: "sctp", ProtoUDPLite: "udplite"}

// ProtoName names a protocol number ("tcp"), or gives it as a number.
func ProtoName(p uint8) string {
	if n, ok := protoNames[p]; ok {
		return n
	}
	return fmt.Sprint(p)
}

// ParseProto parses a protocol name or number.
func ParseProto(s string) (uint8, error) {
	for p, n := range protoNames {
		if n == s {
			return p, nil
		}
	}
	var v uint8
	if _, err := fmt.Sscanf(s, "%d", &v); err != nil || fmt.Sprint(v) != s {
		return 0, fmt.Errorf("unknown protocol %q (want a name such as tcp, udp, icmp, esp, or a number 0-255)", s)
	}
	return v, nil
}

// Status bits of a conntrack entry (enum ip_conntrack_status).
const (
	StatusExpected     = 1 << 0
	StatusSeenReply    = 1 << 1
	StatusAssured      = 1 << 2
	StatusConfirmed    = 1 << 3
	StatusSrcNAT       = 1 << 4
	StatusDstNAT       = 1 << 5
	StatusSeqAdjust    = 1 << 6
	StatusSrcNATDone   = 1 << 7
	StatusDstNATDone   = 1 << 8
	StatusDying        = 1 << 9
	StatusFixedTimeout = 1 << 10
)

// commitStatus is what a commit may set: the kernel refuses (EBUSY) a
// create or update that would change EXPECTED, CONFIRMED or DYING, and
// ignores the NAT, sequence-adjust and offload bits (NAT is set up from
// CTA_NAT_SRC/DST instead). CONFIRMED must be set: every entry in the
// table is confirmed, and libnetfilter_conntrack sets it the same way.
const commitStatus = StatusSeenReply | StatusAssured | StatusFixedTimeout

// TCP connection tracking states (enum tcp_conntrack).
const (
	TCPNone        = 0
	TCPSynSent     = 1
	TCPSynRecv     = 2
	TCPEstablished = 3
	TCPFinWait     = 4
	TCPCloseWait   = 5
	TCPLastAck     = 6
	TCPTimeWait    = 7
	TCPClose       = 8
	TCPSynSent2    = 9
	tcpStates      = 10
)

var tcpStateNames = [tcpStates]string{"none", "syn_sent", "syn_recv", "established", "fin_wait", "close_wait", "last_ack", "time_wait", "close", "syn_sent2"}

// TCPStateName names a TCP state ("established").
func TCPStateName(s uint8) string {
	if int(s) < len(tcpStateNames) {
		return tcpStateNames[s]
	}
	return fmt.Sprintf("state%d", s)
}

// ParseTCPState parses a state name as TCPStateName writes it.
func ParseTCPState(s string) (uint8, error) {
	for i, n := range tcpStateNames {
		if n == s {
			return uint8(i), nil
		}
	}
	return 0, fmt.Errorf("unknown TCP state %q (want one of %v)", s, tcpStateNames)
}

// TCP window-tracking flags (IP_CT_TCP_FLAG_*).
const (
	TCPFlagWindowScale = 0x01
	TCPFlagSackPerm    = 0x02
	TCPFlagCloseInit   = 0x04
	TCPFlagBeLiberal   = 0x08
)

// TCPInfo is the TCP tracking state of an entry (CTA_PROTOINFO_TCP).
type TCPInfo struct {
	State                   uint8
	WScaleOrig, WScaleReply uint8
	FlagsOrig, FlagsReply   uint8
	// Set says whether the entry carried TCP protocol information.
	Set bool
}

// Flow is one conntrack entry: its two tuples and the state a commit
// restores. Like Tuple it holds no pointer.
type Flow struct {
	Orig, Reply Tuple
	Status      uint32
	// Timeout is the seconds left before the kernel expires the entry.
	Timeout uint32
	Mark    uint32
	Zone    uint16
	TCP     TCPInfo
}

// NAT reports whether the reply tuple is not the original one inverted:
// the director translates the flow (SNAT, DNAT, masquerade).
func (f *Flow) NAT() bool { return f.Reply != f.Orig.Inverse() }

// String writes the flow for logs and the CLI.
func (f *Flow) String() string {
	s := f.Orig.String()
	if f.NAT() {
		s += " reply " + f.Reply.String()
	}
	if f.TCP.Set {
		s += " " + TCPStateName(f.TCP.State)
	}
	return s + fmt.Sprintf(" timeout %ds", f.Timeout)
}

// EventType says what happened to an entry.
type EventType uint8

// Event types. EventLost is not the kernel's: the socket's buffer
// overflowed and events were dropped, so whoever mirrors the table must
// read it again.
const (
	EventNew EventType = iota + 1
	EventUpdate
	EventDestroy
	EventLost
)

var eventNames = [...]string{"", "new", "update", "destroy", "lost"}

// String names the event type.
func (e EventType) String() string { return enum.String(eventNames[:], "EventType", e) }

// Event is one conntrack event.
type Event struct {
	Type EventType
	Flow Flow
}

// TupleHasPorts says whether a protocol's tuple uses the two 16-bit
// fields: ports (GRE: keys), or ICMP's echo id and type/code.
func TupleHasPorts(proto uint8) bool {
	return hasPorts(proto) || proto == ProtoICMP || proto == ProtoICMPv6
}
