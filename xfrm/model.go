package xfrm

import (
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
)

// Proto is an XFRM protocol number (the IP protocol of the transform).
type Proto uint8

// The protocols the agent distinguishes. Only ESP and AH states are SAs of
// a tunnel; IPComp and the IP-in-IP helper states that come with it are
// counted as ignored.
const (
	ProtoESP  Proto = 50
	ProtoAH   Proto = 51
	ProtoComp Proto = 108
)

func (p Proto) String() string {
	switch p {
	case ProtoESP:
		return "esp"
	case ProtoAH:
		return "ah"
	case ProtoComp:
		return "comp"
	}
	return netlink.Proto(p).String()
}

// Mode is an XFRM mode, with the kernel's numbering.
type Mode uint8

// Modes.
const (
	ModeTransport Mode = 0
	ModeTunnel    Mode = 1
)

// Dir is a policy direction, with the kernel's numbering. Socket policies
// (3 and above) never describe a tunnel.
type Dir uint8

// Policy directions.
const (
	DirIn  Dir = 0
	DirOut Dir = 1
	DirFwd Dir = 2
)

func (d Dir) String() string { return netlink.Dir(d).String() }

// Mark is an XFRM mark and mask; part of a state's and a policy's identity.
type Mark struct {
	Value, Mask uint32
}

// Encap is a state's UDP encapsulation (NAT-T). Type 0 means none.
type Encap struct {
	Type             uint16 // 2: ESP in UDP (RFC 3948), 1: the old non-IKE marker form
	SrcPort, DstPort uint16
	// OriginalAddress is the NAT-OA the IKE daemon gave, if any (strongSwan
	// leaves it zero: the kernel ignores it in tunnel mode).
	OriginalAddress netip.Addr
}

// SA is one XFRM state, reduced to what grouping and reporting need.
type SA struct {
	Src, Dst netip.Addr
	Proto    Proto
	SPI      uint32
	Reqid    uint32
	Mode     Mode
	Mark     Mark
	Ifid     uint32
	Encap    Encap
	// Larval is a state without any algorithm: an SPI reserved by the IKE
	// daemon (XFRM_MSG_ALLOCSPI) for a negotiation not finished yet.
	Larval bool
	// Counters from the kernel's current lifetime: bytes and packets
	// through the SA, when it was added, and when it was used (Unix
	// seconds, 0 when never): the newest of the lifetime's first use and
	// the XFRMA_LASTUSED time, where the kernel keeps one.
	Bytes, Packets   uint64
	AddTime, UseTime uint64
}

// stateKey is a state's identity in the kernel (xfrm_state_lookup by SPI):
// no two states share one.
type stateKey struct {
	dst   netip.Addr
	spi   uint32
	proto Proto
	mark  Mark
	ifid  uint32
}

func (s *SA) key() stateKey {
	return stateKey{dst: s.Dst, spi: s.SPI, proto: s.Proto, mark: s.Mark, ifid: s.Ifid}
}

// Template is one transform of a policy: which SA the kernel must find or
// ask the IKE daemon for.
type Template struct {
	Src, Dst netip.Addr
	Proto    Proto
	Mode     Mode
	Reqid    uint32
	SPI      uint32
}

// Policy is one XFRM policy, reduced to what grouping needs.
type Policy struct {
	Index    uint32
	Dir      Dir
	Src, Dst netip.Prefix // the selector
	Action   uint8        // 0 allow, 1 block
	Mark     Mark
	Ifid     uint32
	Tmpls    []Template
}

// policyKey is a policy's identity: the kernel gives every policy a unique
// index (with the direction in its low bits) and keeps it on update.
type policyKey struct {
	index uint32
	dir   Dir
}

func (p *Policy) key() policyKey { return policyKey{index: p.Index, dir: p.Dir} }

// Snapshot is a full read of a node: its states, its policies and its own
// addresses (which say which end of an SA is the peer).
type Snapshot struct {
	Local    []netip.Addr
	States   []SA
	Policies []Policy
}

// addrFrom converts a netlink address; IPv4 comes back as IPv4 even when
// the slice holds the 16-byte form.
func addrFrom(ip net.IP) netip.Addr {
	a, ok := netip.AddrFromSlice(ip)
	if !ok {
		return netip.Addr{}
	}
	return a.Unmap()
}
