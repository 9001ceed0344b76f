package ipvs

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"

	"github.com/vishvananda/netns"

	"github.com/tunneldirector/tunneldirector/ipvs/nflog"
	"github.com/tunneldirector/tunneldirector/ipvs/nft"
)

// LearnInterval is how often the classifier logs the same unknown peer.
const LearnInterval = nft.LearnInterval

// NewFlow is the first packet of a peer the classifier did not know: its
// addresses, protocol and ports, and the mark the kernel gave it (the node
// the hash chose, with IKEBit for IKE and NAT-T in IPVS mode).
type NewFlow struct {
	Src, Dst         netip.Addr
	Proto            uint8
	SrcPort, DstPort uint16 // UDP
	Mark             uint32
}

// FirstPackets returns the learner's source for the current network
// namespace: a watcher of the classifier's NFLOG group that calls fn with
// the first packet of every unknown peer (IKE, NAT-T, ESP or AH to a VIP),
// in route-only and IPVS mode alike, until ctx ends.
//
// Why NFLOG and not conntrack NEW events (ipvs/vmtest measures both): with
// IPVS forwarding and net.ipv4.vs.conntrack=0 (the default) IKE and NAT-T
// to a VIP never get a confirmed conntrack entry (0 NEW events for 50
// datagrams), so NEW events show a peer only at its first ESP packet.
// net.ipv4.vs.conntrack=1 gives one NEW event per flow, but it is a
// setting of every IPVS service on the machine, tracks every IKE and
// NAT-T flow of every known peer (events the daemon would filter, 100,000
// peers' worth), and reports a flow at its confirmation, not at its first
// packet. The classifier already knows which peers are unknown: it logs
// each once per LearnInterval, in route-only and IPVS mode alike.
func FirstPackets(cfg Config) func(ctx context.Context, fn func(NewFlow)) error {
	return firstPackets(cfg, 0)
}

func firstPackets(cfg Config, ns netns.NsHandle) func(ctx context.Context, fn func(NewFlow)) error {
	group := cfg.LogGroup
	if group == 0 {
		group = DefaultLogGroup
	}
	return func(ctx context.Context, fn func(NewFlow)) error {
		return nflog.Listen(ctx, ns, group, nft.LogSnaplen, func(p nflog.Packet) {
			if f, err := flowOf(p.Payload, p.Mark); err == nil {
				fn(f)
			}
		})
	}
}

// flowOf decodes the network header (and UDP ports) of a logged packet.
func flowOf(b []byte, mark uint32) (NewFlow, error) {
	f := NewFlow{Mark: mark}
	if len(b) < 1 {
		return f, errors.New("empty packet")
	}
	var l4 []byte
	switch b[0] >> 4 {
	case 4:
		ihl := int(b[0]&0x0f) * 4
		if len(b) < 20 || ihl < 20 {
			return f, fmt.Errorf("IPv4 header of %d bytes (IHL %d)", len(b), ihl)
		}
		f.Proto = b[9]
		f.Src = netip.AddrFrom4([4]byte(b[12:16]))
		f.Dst = netip.AddrFrom4([4]byte(b[16:20]))
		if len(b) >= ihl {
			l4 = b[ihl:]
		}
	case 6:
		if len(b) < 40 {
			return f, fmt.Errorf("IPv6 header of %d bytes", len(b))
		}
		f.Proto = b[6]
		f.Src = netip.AddrFrom16([16]byte(b[8:24]))
		f.Dst = netip.AddrFrom16([16]byte(b[24:40]))
		l4 = b[40:]
	default:
		return f, fmt.Errorf("IP version %d", b[0]>>4)
	}
	if f.Proto == 17 && len(l4) >= 4 {
		f.SrcPort = binary.BigEndian.Uint16(l4[0:2])
		f.DstPort = binary.BigEndian.Uint16(l4[2:4])
	}
	return f, nil
}
