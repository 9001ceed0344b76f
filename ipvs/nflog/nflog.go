// Package nflog receives packets that nftables rules log to an NFLOG group
// (`log group N`): the kernel sends each over nfnetlink (subsystem ULOG)
// with its mark and the first bytes of the packet. The director's
// classifier logs the first IKE, NAT-T, ESP or AH packet of a peer it does
// not know, so the daemon can pin the node the kernel's hash chose, in
// route-only and IPVS mode alike.
//
// Message framing is github.com/ti-mo/netfilter's; only the NFLOG
// attributes (include/uapi/linux/netfilter/nfnetlink_log.h) are decoded
// here.
package nflog

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"github.com/mdlayher/netlink"
	"github.com/ti-mo/netfilter"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/tunneldirector/tunneldirector/ipvs/internal/nsdo"
)

// NFLOG message types and attributes.
const (
	msgPacket = 0 // NFULNL_MSG_PACKET
	msgConfig = 1 // NFULNL_MSG_CONFIG

	attrPacketHdr = 1  // NFULA_PACKET_HDR
	attrMark      = 2  // NFULA_MARK
	attrPayload   = 9  // NFULA_PAYLOAD
	attrPrefix    = 10 // NFULA_PREFIX

	cfgCmd  = 1 // NFULA_CFG_CMD
	cfgMode = 2 // NFULA_CFG_MODE

	cmdBind   = 1 // NFULNL_CFG_CMD_BIND
	cmdUnbind = 2 // NFULNL_CFG_CMD_UNBIND

	copyPacket = 2 // NFULNL_COPY_PACKET
)

// Packet is one logged packet.
type Packet struct {
	// HWProtocol is the packet's ethertype (0x0800 IPv4, 0x86dd IPv6).
	HWProtocol uint16
	Mark       uint32
	Prefix     string
	// Payload is the start of the packet from its network header, as
	// long as the rule's snaplen allowed.
	Payload []byte
}

// Decode decodes one NFULNL_MSG_PACKET message (its nfgenmsg header and
// attributes).
func Decode(m netlink.Message) (Packet, error) {
	var p Packet
	h, attrs, err := netfilter.UnmarshalNetlink(m)
	if err != nil {
		return p, fmt.Errorf("nflog message: %w", err)
	}
	if h.SubsystemID != netfilter.NFSubsysULOG || h.MessageType != msgPacket {
		return p, fmt.Errorf("nflog message: subsystem %d type %d is not a logged packet", h.SubsystemID, h.MessageType)
	}
	for _, a := range attrs {
		switch a.Type {
		case attrPacketHdr:
			if len(a.Data) < 2 {
				return p, fmt.Errorf("nflog packet header of %d bytes", len(a.Data))
			}
			p.HWProtocol = binary.BigEndian.Uint16(a.Data)
		case attrMark:
			if len(a.Data) != 4 {
				return p, fmt.Errorf("nflog mark of %d bytes", len(a.Data))
			}
			p.Mark = binary.BigEndian.Uint32(a.Data)
		case attrPrefix:
			b := a.Data
			for len(b) > 0 && b[len(b)-1] == 0 {
				b = b[:len(b)-1]
			}
			p.Prefix = string(b)
		case attrPayload:
			p.Payload = a.Data
		}
	}
	if p.Payload == nil {
		return p, errors.New("nflog packet without payload")
	}
	return p, nil
}

func config(group uint16, attrs []netfilter.Attribute) (netlink.Message, error) {
	return netfilter.MarshalNetlink(netfilter.Header{
		SubsystemID: netfilter.NFSubsysULOG,
		MessageType: msgConfig,
		Family:      netfilter.ProtoUnspec,
		ResourceID:  group,
		Flags:       netlink.Request | netlink.Acknowledge,
	}, attrs)
}

// Listen binds NFLOG group in network namespace ns (0: the caller's) and
// calls fn for every logged packet until ctx ends; it returns ctx's error
// then, or the socket's. snaplen is how many bytes of each packet to ask
// for. A group has one listener per namespace: binding one that another
// process holds fails (EBUSY). Packets lost because fn was too slow
// (ENOBUFS) are skipped.
func Listen(ctx context.Context, ns netns.NsHandle, group uint16, snaplen uint32, fn func(Packet)) error {
	var c *netfilter.Conn
	err := nsdo.Do(ns, func() (err error) {
		c, err = netfilter.Dial(nil)
		return err
	})
	if err != nil {
		return fmt.Errorf("nflog group %d: dial netfilter netlink: %w", group, err)
	}
	defer c.Close()
	mode := make([]byte, 6)
	binary.BigEndian.PutUint32(mode, snaplen)
	mode[4] = copyPacket
	bind, err := config(group, []netfilter.Attribute{{Type: cfgCmd, Data: []byte{cmdBind}}, {Type: cfgMode, Data: mode}})
	if err != nil {
		return err
	}
	if _, err := c.Query(bind); err != nil {
		return fmt.Errorf("nflog group %d: bind (is another listener on it, e.g. ulogd?): %w", group, err)
	}
	defer func() {
		if unbind, err := config(group, []netfilter.Attribute{{Type: cfgCmd, Data: []byte{cmdUnbind}}}); err == nil {
			_ = c.SetDeadline(time.Now().Add(time.Second))
			_, _ = c.Query(unbind)
		}
	}()
	_ = c.SetReadBuffer(4 << 20)
	stop := context.AfterFunc(ctx, func() { _ = c.SetReadDeadline(time.Unix(1, 0)) })
	defer stop()
	for {
		msgs, err := c.Receive()
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if err != nil {
			if errors.Is(err, unix.ENOBUFS) {
				continue
			}
			return fmt.Errorf("nflog group %d: receive: %w", group, err)
		}
		for _, m := range msgs {
			p, err := Decode(m)
			if err != nil {
				continue // not a logged packet
			}
			fn(p)
		}
	}
}
