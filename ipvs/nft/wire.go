package nft

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/userdata"
	mdnl "github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// transport carries google/nftables batches to the kernel and back.
//
// It exists for two reasons. First, google/nftables v0.3.0 cannot tag a
// map's data byte order: without NFTNL_UDATA_SET_DATABYTEORDER=host in a
// set's user data, nft(8) prints host-endian marks byte-swapped (the kernel
// uses them correctly either way). The transport adds that tag to the
// NEWSET of every map whose data is a mark. Second, google/nftables' Flush
// can miss an error reply in the middle of a batch when all replies arrive
// in one read; the transport reads every reply itself and fails the batch
// on any error, naming the message.
type transport struct {
	c *mdnl.Conn
	// tail, set by flush, goes at the end of the next batch, before its
	// NFNL_MSG_BATCH_END (elemWriter's messages).
	tail []mdnl.Message
	// interrupted is set when a dump message carried NLM_F_DUMP_INTR (a
	// transaction committed while the dump ran). The set dumps of 6.18
	// were not seen to set it although they can skip elements then: the
	// dataplane does not rely on it alone.
	interrupted bool
	// seq is the last sequence number send gave a message.
	seq uint32
}

const (
	udataByteorderHost = 1 // nft's BYTEORDER_HOST_ENDIAN
	ackTimeout         = 60 * time.Second
)

var newSetType = mdnl.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_NEWSET)

// markDataMaps are the fixed maps whose data is a host-endian mark; the
// per-length subnet maps (isMarkMap) are too.
var markDataMaps = map[string]bool{peerSetName(false): true, peerSetName(true): true, hashMapName: true}

func isMarkMap(name string) bool {
	if markDataMaps[name] {
		return true
	}
	_, ok := parseLen(name)
	return ok
}

func dialTransport(nsfd int) (*transport, error) {
	c, err := mdnl.Dial(unix.NETLINK_NETFILTER, &mdnl.Config{NetNS: nsfd})
	if err != nil {
		return nil, fmt.Errorf("dial netfilter netlink: %w", err)
	}
	if err := forceBuffers(c); err != nil {
		c.Close()
		return nil, err
	}
	// The kernel reports errors of the whole batch; ask it for extended
	// error text too.
	_ = c.SetOption(mdnl.ExtendedAcknowledge, true)
	return &transport{c: c}, nil
}

// conn returns a google/nftables connection whose batches go through t.
func (t *transport) conn() (*nftables.Conn, error) {
	return nftables.New(nftables.WithTestDial(t.roundTrip))
}

func (t *transport) close() error { return t.c.Close() }

// tagDataByteorder adds the data byte order to a NEWSET of a mark map.
func tagDataByteorder(m mdnl.Message) (mdnl.Message, error) {
	if m.Header.Type != newSetType || len(m.Data) < 4 {
		return m, nil
	}
	attrs, err := mdnl.UnmarshalAttributes(m.Data[4:])
	if err != nil {
		return m, fmt.Errorf("decode NEWSET: %w", err)
	}
	name := ""
	ud := -1
	for i, a := range attrs {
		switch a.Type {
		case unix.NFTA_SET_NAME:
			name = string(a.Data[:max(0, len(a.Data)-1)])
		case unix.NFTA_SET_USERDATA:
			ud = i
		}
	}
	if !isMarkMap(name) {
		return m, nil
	}
	if ud < 0 {
		attrs = append(attrs, mdnl.Attribute{Type: unix.NFTA_SET_USERDATA})
		ud = len(attrs) - 1
	}
	attrs[ud].Data = userdata.AppendUint32(attrs[ud].Data, userdata.NFTNL_UDATA_SET_DATABYTEORDER, udataByteorderHost)
	// Decoded attributes keep their old length, which marshalling trusts.
	attrs[ud].Length = uint16(4 + len(attrs[ud].Data))
	b, err := mdnl.MarshalAttributes(attrs)
	if err != nil {
		return m, fmt.Errorf("encode NEWSET: %w", err)
	}
	m.Data = append(m.Data[:4:4], b...)
	// Let the socket recompute the length of the grown message.
	m.Header.Length = 0
	return m, nil
}

// flush sends c's queued messages and then tail as one transaction.
// google/nftables sends nothing when it queued nothing (a plan of
// element changes only): the batch is then tail's alone.
func (t *transport) flush(c *nftables.Conn, tail []mdnl.Message) error {
	if len(tail) == 0 {
		return c.Flush()
	}
	t.tail = tail
	defer func() { t.tail = nil }()
	if err := c.Flush(); err != nil || t.tail == nil {
		return err
	}
	// Nothing was sent: no structure in this transaction.
	begin := mdnl.Message{Header: mdnl.Header{Type: mdnl.HeaderType(unix.NFNL_MSG_BATCH_BEGIN), Flags: mdnl.Request},
		Data: []byte{unix.AF_UNSPEC, unix.NFNETLINK_V0, 0, unix.NFNL_SUBSYS_NFTABLES}}
	end := begin
	end.Header.Type = mdnl.HeaderType(unix.NFNL_MSG_BATCH_END)
	_, err := t.roundTrip([]mdnl.Message{begin, end})
	return err
}

// spliceTail puts tail at the end of batch req, before its
// NFNL_MSG_BATCH_END; a request that is not a batch is left alone.
func spliceTail(req, tail []mdnl.Message) ([]mdnl.Message, bool) {
	n := len(req)
	if n < 2 || req[0].Header.Type != mdnl.HeaderType(unix.NFNL_MSG_BATCH_BEGIN) {
		return req, false
	}
	return append(append(req[:n-1:n-1], tail...), req[n-1]), true
}

// roundTrip is an nltest.Func: it sends req for real and returns all
// replies; nil req is google/nftables polling for more, answered with EOF.
func (t *transport) roundTrip(req []mdnl.Message) ([]mdnl.Message, error) {
	if req == nil {
		return nil, io.EOF
	}
	if t.tail != nil {
		var spliced bool
		if req, spliced = spliceTail(req, t.tail); spliced {
			t.tail = nil
		}
	}
	want := 0
	dump := false
	for i := range req {
		m, err := tagDataByteorder(req[i])
		if err != nil {
			return nil, err
		}
		req[i] = m
		if m.Header.Flags&mdnl.Dump == mdnl.Dump {
			dump = true
		} else if m.Header.Flags&mdnl.Acknowledge != 0 {
			want++
		}
	}
	if err := t.send(req); err != nil {
		return nil, fmt.Errorf("send nftables batch of %d messages: %w", len(req), err)
	}
	if dump {
		return t.c.Receive()
	}
	if err := t.c.SetReadDeadline(time.Now().Add(ackTimeout)); err != nil {
		return nil, err
	}
	defer t.c.SetReadDeadline(time.Time{})
	var replies []mdnl.Message
	var errs []error
	got := 0
	for got < want {
		msgs, err := t.c.Receive()
		if err != nil {
			var oe *mdnl.OpError
			if errors.As(err, &oe) && oe.Err != nil && len(msgs) == 0 {
				// mdlayher returns a reply carrying an errno as an
				// error; it is still one reply.
				got++
				errs = append(errs, fmt.Errorf("message %d: %w", got, err))
				if errors.Is(err, syscall.ENOBUFS) || errors.Is(err, syscall.EAGAIN) || errors.Is(err, syscall.ETIMEDOUT) || errors.Is(err, io.EOF) {
					return nil, errors.Join(errs...)
				}
				continue
			}
			return nil, errors.Join(append(errs, fmt.Errorf("read nftables replies (%d of %d): %w", got, want, err))...)
		}
		for _, m := range msgs {
			if m.Header.Type == mdnl.Error {
				got++
			}
		}
		replies = append(replies, msgs...)
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	// google/nftables expects the last reply to be the ack of its first
	// read; hand it one success ack and swallow the rest (all checked).
	for _, m := range replies {
		if m.Header.Type == mdnl.Error {
			return []mdnl.Message{m}, nil
		}
	}
	return replies, nil
}

// send writes req to the socket in one sendmsg, as mdlayher/netlink's
// SendMessages does, but encoded straight into one buffer of the batch's
// size: SendMessages copies every message into a buffer of its own and
// then all of them into a growing one, which cost a node failure's batch
// at a million tunnels (tens of MB) about a third of a second. It writes
// past mdlayher's Conn, and so past the lock that keeps its own sends
// apart: a transport serves one goroutine (the dataplane's; a background
// read dials a connection of its own).
func (t *transport) send(req []mdnl.Message) error {
	n := 0
	for i := range req {
		n += nlmsgAlign(unix.NLMSG_HDRLEN + len(req[i].Data))
	}
	var buf []byte
	buf, t.seq = appendMessages(make([]byte, 0, n), req, t.seq)
	rc, err := t.c.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	err = rc.Write(func(fd uintptr) bool {
		for {
			serr = unix.Sendmsg(int(fd), buf, nil, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}, 0)
			if serr != unix.EINTR {
				return serr != unix.EAGAIN
			}
		}
	})
	if err == nil && serr != nil {
		err = os.NewSyscallError("sendmsg", serr)
	}
	return err
}

// appendMessages appends the netlink encoding of msgs to b, as
// mdlayher/netlink's Message.MarshalBinary would after its Conn filled in
// the header: the length (the data's, aligned), and a sequence number
// (the next after seq) where a message has none. It returns b and the last
// sequence number used. The replies carry these numbers; the transport
// counts them, it does not match them.
func appendMessages(b []byte, msgs []mdnl.Message, seq uint32) ([]byte, uint32) {
	for i := range msgs {
		m := &msgs[i]
		l := nlmsgAlign(unix.NLMSG_HDRLEN + len(m.Data))
		s := m.Header.Sequence
		if s == 0 {
			seq++
			s = seq
		}
		b = binary.NativeEndian.AppendUint32(b, uint32(l))
		b = binary.NativeEndian.AppendUint16(b, uint16(m.Header.Type))
		b = binary.NativeEndian.AppendUint16(b, uint16(m.Header.Flags))
		b = binary.NativeEndian.AppendUint32(b, s)
		b = binary.NativeEndian.AppendUint32(b, m.Header.PID)
		b = append(b, m.Data...)
		b = append(b, make([]byte, l-unix.NLMSG_HDRLEN-len(m.Data))...)
	}
	return b, seq
}

func nlmsgAlign(n int) int { return (n + unix.NLMSG_ALIGNTO - 1) &^ (unix.NLMSG_ALIGNTO - 1) }

// dumpBuf is the receive buffer for element dumps. The kernel sizes each
// dump skb after the largest buffer the reader has offered (up to 32 KiB);
// mdlayher/netlink offers a page, and because the kernel re-walks a set
// from the start for every dump skb, 4 KiB chunks made a 200,000-element
// interval dump take about 9 s.
const dumpBuf = 1 << 20

// dumpElems returns the elements of set name in table, decoded by
// decodeElems.
func (t *transport) dumpElems(table, name string) ([]nftables.SetElement, error) {
	b, err := mdnl.MarshalAttributes([]mdnl.Attribute{
		{Type: unix.NFTA_SET_ELEM_LIST_TABLE, Data: []byte(table + "\x00")},
		{Type: unix.NFTA_SET_ELEM_LIST_SET, Data: []byte(name + "\x00")},
	})
	if err != nil {
		return nil, err
	}
	req := mdnl.Message{
		Header: mdnl.Header{Type: mdnl.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_GETSETELEM), Flags: mdnl.Request | mdnl.Dump},
		Data:   append([]byte{unix.NFPROTO_INET, unix.NFNETLINK_V0, 0, 0}, b...),
	}
	sent, err := t.c.Send(req)
	if err != nil {
		return nil, fmt.Errorf("request dump of set %s: %w", name, err)
	}
	buf := make([]byte, dumpBuf)
	var out []nftables.SetElement
	for {
		msgs, err := t.recv(buf)
		if err != nil {
			return nil, fmt.Errorf("read dump of set %s: %w", name, err)
		}
		for _, m := range msgs {
			if m.Header.Seq != sent.Header.Sequence {
				continue // a stray reply of an earlier request
			}
			if m.Header.Flags&unix.NLM_F_DUMP_INTR != 0 {
				t.interrupted = true
			}
			switch m.Header.Type {
			case unix.NLMSG_DONE:
				return out, nil
			case unix.NLMSG_ERROR:
				if len(m.Data) >= 4 {
					if errno := int32(nativeUint32(m.Data[:4])); errno != 0 {
						return nil, fmt.Errorf("dump of set %s: %w", name, syscall.Errno(-errno))
					}
				}
				return out, nil
			}
			if len(m.Data) < 4 {
				continue
			}
			els, err := decodeElems(m.Data[4:])
			if err != nil {
				return nil, fmt.Errorf("decode dump of set %s: %w", name, err)
			}
			out = append(out, els...)
		}
	}
}

// getElems asks for each key of set name in table alone (a request that
// names several stops at the first one missing) and returns the found
// keys' data by key.
func (t *transport) getElems(table, name string, keys [][]byte) (map[string][]byte, error) {
	found := map[string][]byte{}
	for len(keys) > 0 {
		n := min(len(keys), 512)
		if err := t.getChunk(table, name, keys[:n], found); err != nil {
			return nil, err
		}
		keys = keys[n:]
	}
	return found, nil
}

func (t *transport) getChunk(table, name string, keys [][]byte, found map[string][]byte) error {
	msgs := make([]mdnl.Message, 0, len(keys))
	for _, k := range keys {
		key, err := mdnl.MarshalAttributes([]mdnl.Attribute{{Type: unix.NFTA_DATA_VALUE, Data: k}})
		if err != nil {
			return err
		}
		el, err := mdnl.MarshalAttributes([]mdnl.Attribute{{Type: unix.NLA_F_NESTED | unix.NFTA_SET_ELEM_KEY, Data: key}})
		if err != nil {
			return err
		}
		list, err := mdnl.MarshalAttributes([]mdnl.Attribute{{Type: unix.NLA_F_NESTED | unix.NFTA_LIST_ELEM, Data: el}})
		if err != nil {
			return err
		}
		b, err := mdnl.MarshalAttributes([]mdnl.Attribute{
			{Type: unix.NFTA_SET_ELEM_LIST_TABLE, Data: []byte(table + "\x00")},
			{Type: unix.NFTA_SET_ELEM_LIST_SET, Data: []byte(name + "\x00")},
			{Type: unix.NLA_F_NESTED | unix.NFTA_SET_ELEM_LIST_ELEMENTS, Data: list},
		})
		if err != nil {
			return err
		}
		msgs = append(msgs, mdnl.Message{
			Header: mdnl.Header{Type: mdnl.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_GETSETELEM), Flags: mdnl.Request},
			Data:   append([]byte{unix.NFPROTO_INET, unix.NFNETLINK_V0, 0, 0}, b...),
		})
	}
	sent, err := t.c.SendMessages(msgs)
	if err != nil {
		return fmt.Errorf("request elements of set %s: %w", name, err)
	}
	want := make(map[uint32]bool, len(sent))
	for _, m := range sent {
		want[m.Header.Sequence] = true
	}
	buf := make([]byte, 1<<16)
	for len(want) > 0 {
		replies, err := t.recv(buf)
		if err != nil {
			return fmt.Errorf("read elements of set %s: %w", name, err)
		}
		for _, m := range replies {
			if !want[m.Header.Seq] {
				continue
			}
			delete(want, m.Header.Seq)
			if m.Header.Type == unix.NLMSG_ERROR {
				// A key the set does not hold answers ENOENT.
				if len(m.Data) >= 4 {
					if errno := syscall.Errno(-int32(nativeUint32(m.Data[:4]))); errno != 0 && errno != unix.ENOENT {
						return fmt.Errorf("get element of set %s: %w", name, errno)
					}
				}
				continue
			}
			if len(m.Data) < 4 {
				continue
			}
			els, err := decodeElems(m.Data[4:])
			if err != nil {
				return fmt.Errorf("decode elements of set %s: %w", name, err)
			}
			for _, e := range els {
				found[string(e.Key)] = e.Val
			}
		}
	}
	return nil
}

// recv reads one datagram of replies into buf (large enough for the
// kernel's dump messages: mdlayher/netlink's Receive would offer a page)
// and parses its messages.
func (t *transport) recv(buf []byte) ([]syscall.NetlinkMessage, error) {
	rc, err := t.c.SyscallConn()
	if err != nil {
		return nil, err
	}
	var n int
	var rerr error
	err = rc.Read(func(fd uintptr) bool {
		n, _, rerr = unix.Recvfrom(int(fd), buf, 0)
		return rerr != unix.EAGAIN
	})
	if err == nil {
		err = rerr
	}
	if err != nil {
		return nil, err
	}
	return syscall.ParseNetlinkMessage(buf[:n])
}

func nativeUint32(b []byte) uint32 {
	return uint32(b[0]) | uint32(b[1])<<8 | uint32(b[2])<<16 | uint32(b[3])<<24
}

// decodeElems decodes the element list of one NEWSETELEM message: keys,
// data values and the interval-end flag.
func decodeElems(b []byte) ([]nftables.SetElement, error) {
	var out []nftables.SetElement
	ad, err := mdnl.NewAttributeDecoder(b)
	if err != nil {
		return nil, err
	}
	for ad.Next() {
		if ad.Type() != unix.NFTA_SET_ELEM_LIST_ELEMENTS {
			continue
		}
		ad.Nested(func(list *mdnl.AttributeDecoder) error {
			for list.Next() {
				if list.Type() != unix.NFTA_LIST_ELEM {
					continue
				}
				var e nftables.SetElement
				list.Nested(func(el *mdnl.AttributeDecoder) error {
					for el.Next() {
						switch el.Type() {
						case unix.NFTA_SET_ELEM_KEY:
							el.Nested(dataValue(&e.Key))
						case unix.NFTA_SET_ELEM_DATA:
							el.Nested(dataValue(&e.Val))
						case unix.NFTA_SET_ELEM_FLAGS:
							el.ByteOrder = binary.BigEndian
							e.IntervalEnd = el.Uint32()&unix.NFT_SET_ELEM_INTERVAL_END != 0
						}
					}
					return nil
				})
				out = append(out, e)
			}
			return nil
		})
	}
	return out, ad.Err()
}

// dataValue reads the value of a nested nft_data (an element's key or
// data) into *dst.
func dataValue(dst *[]byte) func(*mdnl.AttributeDecoder) error {
	return func(v *mdnl.AttributeDecoder) error {
		for v.Next() {
			if v.Type() == unix.NFTA_DATA_VALUE {
				*dst = v.Bytes()
			}
		}
		return nil
	}
}

// gen asks for the ruleset generation.
func (t *transport) gen() (uint32, error) {
	req := mdnl.Message{
		Header: mdnl.Header{Type: mdnl.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_GETGEN), Flags: mdnl.Request},
		// nfgenmsg: family AF_UNSPEC, version 0, resource id 0.
		Data: []byte{unix.AF_UNSPEC, unix.NFNETLINK_V0, 0, 0},
	}
	msgs, err := t.c.Execute(req)
	if err != nil {
		return 0, fmt.Errorf("ask for the nftables ruleset generation: %w", err)
	}
	for _, m := range msgs {
		if len(m.Data) < 4 {
			continue
		}
		ad, err := mdnl.NewAttributeDecoder(m.Data[4:])
		if err != nil {
			return 0, fmt.Errorf("nftables ruleset generation: %w", err)
		}
		ad.ByteOrder = binary.BigEndian
		for ad.Next() {
			if ad.Type() == unix.NFTA_GEN_ID {
				return ad.Uint32(), nil
			}
		}
		if err := ad.Err(); err != nil {
			return 0, fmt.Errorf("nftables ruleset generation: %w", err)
		}
	}
	return 0, errors.New("nftables ruleset generation: no NFTA_GEN_ID in the reply")
}
