package ipvs

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"time"

	mdnl "github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// NewFlow is a new conntrack entry as the kernel announced it: the
// original direction's addresses and protocol, and the entry's ct mark
// (the classifier copies its node mark there).
type NewFlow struct {
	Src, Dst         netip.Addr
	Proto            uint8
	SrcPort, DstPort uint16 // UDP, TCP, SCTP, UDP-Lite
	Mark             uint32
}

// ctnetlink wire constants (include/uapi/linux/netfilter/nfnetlink_conntrack.h).
const (
	nfnlgrpConntrackNew = 1
	ctaTupleOrig        = 1
	ctaMark             = 8
	ctaTupleIP          = 1
	ctaTupleProto       = 2
	ctaIPv4Src          = 1
	ctaIPv4Dst          = 2
	ctaIPv6Src          = 3
	ctaIPv6Dst          = 4
	ctaProtoNum         = 1
	ctaProtoSrcPort     = 2
	ctaProtoDstPort     = 3
	ipctnlMsgCtNew      = 0
	nlaTypeMask         = 0x3fff // drops NLA_F_NESTED and NLA_F_NET_BYTEORDER
)

var errShortAttr = errors.New("truncated netlink attribute")

// walkAttrs calls fn for each netlink attribute in b.
func walkAttrs(b []byte, fn func(typ uint16, data []byte) error) error {
	for len(b) > 0 {
		if len(b) < 4 {
			return errShortAttr
		}
		l := int(binary.NativeEndian.Uint16(b[0:2]))
		typ := binary.NativeEndian.Uint16(b[2:4]) & nlaTypeMask
		if l < 4 || l > len(b) {
			return fmt.Errorf("attribute type %d: length %d of %d bytes: %w", typ, l, len(b), errShortAttr)
		}
		if err := fn(typ, b[4:l]); err != nil {
			return err
		}
		next := (l + 3) &^ 3
		if next > len(b) {
			next = len(b)
		}
		b = b[next:]
	}
	return nil
}

// decodeCTNew decodes the payload (nfgenmsg + attributes) of a ctnetlink
// IPCTNL_MSG_CT_NEW message.
func decodeCTNew(b []byte) (NewFlow, error) {
	var f NewFlow
	if len(b) < 4 {
		return f, errors.New("ctnetlink message shorter than its nfgenmsg header")
	}
	err := walkAttrs(b[4:], func(typ uint16, d []byte) error {
		switch typ {
		case ctaMark:
			if len(d) != 4 {
				return fmt.Errorf("CTA_MARK of %d bytes", len(d))
			}
			f.Mark = binary.BigEndian.Uint32(d)
		case ctaTupleOrig:
			return walkAttrs(d, func(typ uint16, d []byte) error {
				switch typ {
				case ctaTupleIP:
					return walkAttrs(d, func(typ uint16, d []byte) error {
						var a netip.Addr
						var ok bool
						switch typ {
						case ctaIPv4Src, ctaIPv4Dst, ctaIPv6Src, ctaIPv6Dst:
							a, ok = netip.AddrFromSlice(d)
							v4 := typ == ctaIPv4Src || typ == ctaIPv4Dst
							if !ok || a.Is4() != v4 {
								return fmt.Errorf("tuple address type %d of %d bytes", typ, len(d))
							}
						default:
							return nil
						}
						if typ == ctaIPv4Src || typ == ctaIPv6Src {
							f.Src = a
						} else {
							f.Dst = a
						}
						return nil
					})
				case ctaTupleProto:
					return walkAttrs(d, func(typ uint16, d []byte) error {
						switch typ {
						case ctaProtoNum:
							if len(d) < 1 {
								return errors.New("empty CTA_PROTO_NUM")
							}
							f.Proto = d[0]
						case ctaProtoSrcPort, ctaProtoDstPort:
							if len(d) != 2 {
								return fmt.Errorf("port attribute of %d bytes", len(d))
							}
							if typ == ctaProtoSrcPort {
								f.SrcPort = binary.BigEndian.Uint16(d)
							} else {
								f.DstPort = binary.BigEndian.Uint16(d)
							}
						}
						return nil
					})
				}
				return nil
			})
		}
		return nil
	})
	if err != nil {
		return f, err
	}
	if !f.Src.IsValid() || !f.Dst.IsValid() {
		return f, errors.New("ctnetlink message without an original tuple")
	}
	return f, nil
}

// WatchNew calls fn for every new conntrack entry in the current network
// namespace until ctx ends; it returns ctx's error then, or the socket's.
// Entries exist only when conntrack is active for the traffic: the
// director's table has a ct rule for that reason. Events lost because fn
// was too slow (ENOBUFS) are skipped, not fatal: the director learns a
// peer from its next flow.
func WatchNew(ctx context.Context, fn func(NewFlow)) error { return watchNew(ctx, 0, fn) }

func watchNew(ctx context.Context, nsfd int, fn func(NewFlow)) error {
	c, err := mdnl.Dial(unix.NETLINK_NETFILTER, &mdnl.Config{Groups: 1 << (nfnlgrpConntrackNew - 1), NetNS: nsfd})
	if err != nil {
		return fmt.Errorf("subscribe to conntrack NEW events: %w", err)
	}
	defer c.Close()
	_ = c.SetReadBuffer(8 << 20)
	stop := context.AfterFunc(ctx, func() { _ = c.SetReadDeadline(time.Unix(1, 0)) })
	defer stop()
	want := mdnl.HeaderType(unix.NFNL_SUBSYS_CTNETLINK<<8 | ipctnlMsgCtNew)
	for {
		msgs, err := c.Receive()
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if err != nil {
			if errors.Is(err, unix.ENOBUFS) {
				continue
			}
			return fmt.Errorf("read conntrack events: %w", err)
		}
		for _, m := range msgs {
			if m.Header.Type != want {
				continue
			}
			f, err := decodeCTNew(m.Data)
			if err != nil {
				continue // not a flow the director can use
			}
			fn(f)
		}
	}
}
