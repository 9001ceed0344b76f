package wire

import (
	"bytes"
	"encoding/binary"
	"errors"
	"strings"
	"testing"
)

var testKey = []byte("0123456789abcdef-test-key")

func sealed(t testing.TB, c *Codec, h Header, body func(*Builder)) []byte {
	var w Builder
	w.Start(nil, h)
	body(&w)
	b, err := w.Seal(c)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// FuzzOpen feeds arbitrary datagrams to the decoder: it must never panic
// and must refuse everything not sealed with the key.
func FuzzOpen(f *testing.F) {
	c := NewCodec(testKey)
	f.Add(sealed(f, c, Header{Type: MsgStatus, Sender: 1, Epoch: 1, Seq: 1}, func(w *Builder) {
		w.U8(TRole, 1)
		w.U64(TRev, 7)
	}))
	f.Add([]byte("TDR1"))
	f.Add(make([]byte, HeaderLen+TagLen))
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := c.Open(b)
		if err != nil {
			return
		}
		// Whatever opens was sealed with the key: re-encoding its
		// fields gives back the same datagram.
		var w Builder
		w.Start(nil, p.Header)
		for _, v := range p.Fields {
			w.Bytes(v.Type, v.Value)
		}
		if out, err := w.Seal(c); err != nil || !bytes.Equal(out, b) {
			t.Fatalf("open/seal round trip differs (%v)", err)
		}
		// The typed readers never panic on what opened.
		fl := Fields{P: &p}
		for _, v := range p.Fields {
			fl.U8(v.Type)
			fl.U32(v.Type)
			fl.U64(v.Type)
		}
		_ = CheckCritical(&p)
	})
}

// FuzzReplayWindow compares the window with a set of every sequence number
// seen: a number is new exactly when the set lacks it and it is not older
// than the window.
func FuzzReplayWindow(f *testing.F) {
	f.Add([]byte{1, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		var tab ReplayTable
		seen := map[uint64]bool{}
		top := uint64(0)
		for ; len(b) >= 8; b = b[8:] {
			seq := binary.LittleEndian.Uint64(b) % 5000
			want := seq != 0 && !seen[seq] && (seq > top || top-seq < WindowBits)
			if got := tab.Check(1, 1, seq); got != want {
				t.Fatalf("seq %d (top %d): window says new=%v, model %v", seq, top, got, want)
			}
			if want {
				seen[seq] = true
				top = max(top, seq)
			}
		}
	})
}

func TestCheckSize(t *testing.T) {
	for _, c := range []struct {
		mtu  int
		want string
	}{{100_000, "above 65507"}, {65_508, "above 65507"}, {10, "below 576"}, {65_507, ""}, {576, ""}, {1400, ""}} {
		err := CheckSize(c.mtu)
		if (err == nil) != (c.want == "") || (err != nil && !strings.Contains(err.Error(), c.want)) {
			t.Errorf("CheckSize(%d) = %v, want %q", c.mtu, err, c.want)
		}
	}
}

func TestBuilderRefusesOversizedTLV(t *testing.T) {
	var w Builder
	w.Start(nil, Header{Type: MsgData, Sender: 1, Epoch: 1, Seq: 1})
	w.Bytes(TBlob, make([]byte, MaxTLV+1))
	if _, err := w.Seal(NewCodec(testKey)); err == nil {
		t.Fatal("a TLV longer than its 16-bit length field was sealed")
	}
}

func TestOpenRefusesOversizedDatagram(t *testing.T) {
	c := NewCodec(testKey)
	b := sealed(t, c, Header{Type: MsgData, Sender: 1, Epoch: 1, Seq: 1}, func(w *Builder) {
		for range 2 {
			w.Bytes(TBlob, make([]byte, 40_000))
		}
	})
	if _, err := c.Open(b); !errors.Is(err, ErrMalformed) {
		t.Fatalf("a %d-byte datagram opened: %v", len(b), err)
	}
}
