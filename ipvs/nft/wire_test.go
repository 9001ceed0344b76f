package nft

import (
	"bytes"
	"testing"

	mdnl "github.com/mdlayher/netlink"
)

// TestAppendMessagesAsMdlayher: the transport's encoding of a batch is
// mdlayher/netlink's, message by message, with the header its Conn fills
// in (the aligned length, a sequence number where none was set).
func TestAppendMessagesAsMdlayher(t *testing.T) {
	msgs := []mdnl.Message{
		{Header: mdnl.Header{Type: 0x10, Flags: mdnl.Request}, Data: []byte{0, 0, 0, 10}},
		{Header: mdnl.Header{Type: 0xa0d, Flags: mdnl.Request | mdnl.Acknowledge | mdnl.Create, PID: 7}, Data: []byte{1, 2, 3, 4, 5}}, // padded
		{Header: mdnl.Header{Type: 0xa0e, Flags: mdnl.Request, Sequence: 99}, Data: nil},
		{Header: mdnl.Header{Type: 0x11, Flags: mdnl.Request}, Data: bytes.Repeat([]byte{9}, 70)},
	}
	got, last := appendMessages([]byte("x"), msgs, 41)
	want := []byte("x")
	seq := uint32(41)
	for _, m := range msgs {
		if m.Header.Sequence == 0 {
			seq++
			m.Header.Sequence = seq
		}
		m.Header.Length = uint32(nlmsgAlign(16 + len(m.Data)))
		b, err := m.MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		want = append(want, b...)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("appendMessages:\n got %x\nwant %x", got, want)
	}
	if last != 44 {
		t.Errorf("last sequence number %d, want 44 (three messages numbered after 41)", last)
	}
}
