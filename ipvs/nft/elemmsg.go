package nft

import (
	"encoding/binary"

	"github.com/google/nftables"
	mdnl "github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// elemWriter encodes set element changes as nftables netlink messages,
// the same bytes google/nftables' SetAddElements and SetDeleteElements
// queue (elemmsg_test.go compares them), written straight into each
// message's buffer. google/nftables builds every element from three
// attribute lists, each marshalled on its own and copied into the next:
// at a node down's 125,000 element changes that was a second of CPU and a
// third of the reconcile's garbage, more than the kernel took to apply
// them.
//
// The messages go after the ones google/nftables queued for the same
// transaction (transport.tail), so build writes the set flushes and
// deletions that follow the elements here too.
type elemWriter struct {
	msgs []mdnl.Message
	// The messages being filled, one per set, and the sets in the order
	// they were first written (the order end queues them in).
	open  map[*nftables.Set]*elemMsg
	order []*nftables.Set
}

// elemMsg is a message being filled: its type, data, the offset of its
// element list attribute and the elements in it.
type elemMsg struct {
	typ  mdnl.HeaderType
	buf  []byte
	list int
	n    int
}

var (
	newSetElemType = mdnl.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_NEWSETELEM)
	delSetElemType = mdnl.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_DELSETELEM)
	delSetType     = mdnl.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_DELSET)
)

// appendAttr appends one netlink attribute (header, payload, padding).
func appendAttr(b []byte, typ uint16, payload []byte) []byte {
	b = binary.NativeEndian.AppendUint16(b, uint16(4+len(payload)))
	b = binary.NativeEndian.AppendUint16(b, typ)
	b = append(b, payload...)
	return pad(b)
}

func pad(b []byte) []byte {
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

// nest opens a nested attribute and returns its offset for closeNest.
func nest(b []byte, typ uint16) ([]byte, int) {
	at := len(b)
	b = binary.NativeEndian.AppendUint16(b, 0)
	return binary.NativeEndian.AppendUint16(b, typ|unix.NLA_F_NESTED), at
}

func closeNest(b []byte, at int) []byte {
	binary.NativeEndian.PutUint16(b[at:], uint16(len(b)-at))
	return b
}

// header appends the nfgenmsg of a message about set s.
func header(b []byte, s *nftables.Set) []byte {
	return append(b, byte(s.Table.Family), unix.NFNETLINK_V0, 0, 0)
}

func cstr(s string) []byte { return append([]byte(s), 0) }

// begin starts a message of element changes to set s.
func begin(typ mdnl.HeaderType, s *nftables.Set) *elemMsg {
	// A page: a few elements (a VIP, the digest) fit, a full chunk
	// grows to about 40 KiB in four doublings.
	b := header(make([]byte, 0, 4096), s)
	b = appendAttr(b, unix.NFTA_SET_ELEM_LIST_SET, cstr(s.Name))
	b = appendAttr(b, unix.NFTA_SET_ELEM_LIST_SET_ID, binary.BigEndian.AppendUint32(nil, s.ID))
	b = appendAttr(b, unix.NFTA_SET_ELEM_LIST_TABLE, cstr(s.Table.Name))
	m := &elemMsg{typ: typ}
	m.buf, m.list = nest(b, unix.NFTA_SET_ELEM_LIST_ELEMENTS)
	return m
}

// elem adds one element change to set s, with data val when withVal (a
// map's element). A set's elements fill a message until elemChunk.
func (w *elemWriter) elem(typ mdnl.HeaderType, s *nftables.Set, key []byte, val uint32, withVal bool) {
	m := w.open[s]
	if m != nil && (m.typ != typ || m.n == elemChunk) {
		w.queue(m)
		m = nil
	}
	if m == nil {
		if w.open == nil {
			w.open = map[*nftables.Set]*elemMsg{}
		}
		if _, seen := w.open[s]; !seen {
			w.order = append(w.order, s)
		}
		m = begin(typ, s)
		w.open[s] = m
	}
	m.n++
	b, item := nest(m.buf, uint16(m.n))
	b, k := nest(b, unix.NFTA_SET_ELEM_KEY)
	b = closeNest(appendAttr(b, unix.NFTA_DATA_VALUE, key), k)
	if withVal {
		// A mark, as the kernel's meta mark register holds it:
		// host byte order.
		var v [4]byte
		binary.NativeEndian.PutUint32(v[:], val)
		var d int
		b, d = nest(b, unix.NFTA_SET_ELEM_DATA)
		b = closeNest(appendAttr(b, unix.NFTA_DATA_VALUE, v[:]), d)
	}
	m.buf = closeNest(b, item)
}

// queue closes m and appends it to the messages.
func (w *elemWriter) queue(m *elemMsg) {
	m.buf = closeNest(m.buf, m.list)
	w.msgs = append(w.msgs, mdnl.Message{Header: mdnl.Header{Type: m.typ, Flags: mdnl.Request | mdnl.Acknowledge | mdnl.Create}, Data: m.buf})
	m.buf = nil
}

// end queues every message being filled, in the order their sets were
// first written: what went before comes first in the transaction.
func (w *elemWriter) end() {
	for _, s := range w.order {
		if m := w.open[s]; m.buf != nil {
			w.queue(m)
		}
		delete(w.open, s)
	}
	w.order = w.order[:0]
}

// setOp queues a message naming only set s: a flush of its elements
// (delSetElemType) or its deletion (delSetType), as google/nftables'
// FlushSet and DelSet write them.
func (w *elemWriter) setOp(typ mdnl.HeaderType, s *nftables.Set) {
	w.end()
	b := header(nil, s)
	b = appendAttr(b, unix.NFTA_SET_TABLE, cstr(s.Table.Name))
	b = appendAttr(b, unix.NFTA_SET_NAME, cstr(s.Name))
	w.msgs = append(w.msgs, mdnl.Message{Header: mdnl.Header{Type: typ, Flags: mdnl.Request | mdnl.Acknowledge}, Data: b})
}

// done returns the queued messages.
func (w *elemWriter) done() []mdnl.Message {
	w.end()
	return w.msgs
}
