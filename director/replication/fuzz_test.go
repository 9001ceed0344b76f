package replication

import (
	"encoding/binary"
	"path/filepath"
	"testing"
	"time"
)

// FuzzDecode feeds arbitrary datagrams to the decoder: it must never panic
// and must refuse everything not sealed with the key.
func FuzzDecode(f *testing.F) {
	c := newCodec(testKey)
	var w builder
	w.start(nil, Header{Type: MsgStatus, Sender: 1, Epoch: 1, Seq: 1})
	w.u8(tRole, 1)
	w.u64(tRev, 7)
	f.Add(w.seal(c))
	f.Add([]byte("TDR1"))
	f.Add(make([]byte, HeaderLen+TagLen))
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := c.decode(b)
		if err != nil {
			return
		}
		// Whatever decodes was sealed with the key: re-encoding its
		// fields gives back the same datagram.
		var w builder
		w.start(nil, p.Header)
		for _, v := range p.Fields {
			w.bytes(v.Type, v.Value)
		}
		if out := w.seal(c); string(out) != string(b) {
			t.Fatalf("decode/encode round trip differs")
		}
	})
}

// FuzzMessages seals arbitrary TLV bodies with the right key, so the
// fuzzer gets past authentication into every message handler, on a
// master and on a backup.
func FuzzMessages(f *testing.F) {
	dir := f.TempDir()
	clk := NewFakeClock(epoch0)
	_, e0, e1 := NewFakeNetwork(FakeConfig{Drop: 1}, clk)
	var reps [2]*Replicator
	for i := range 2 {
		st := openStore(f, filepath.Join(dir, []string{"m.db", "b.db"}[i]), 0)
		r, err := New(Config{ID: uint32(10 + i), Key: testKey, Store: st, Transport: []Transport{e0, e1}[i], Clock: clk})
		if err != nil {
			f.Fatal(err)
		}
		reps[i] = r
	}
	reps[0].SetRole(RoleMaster)
	c := newCodec(testKey)
	seq := uint64(1)
	seed := func(t MsgType, body func(w *builder)) {
		var w builder
		body(&w)
		f.Add(byte(t), w.b)
	}
	seed(MsgData, func(w *builder) {
		w.u64(tRev, 2)
		w.u64(tPrev, 1)
		w.u32(tPart, 0)
		w.u32(tParts, 1)
		w.bytes(tBlob, []byte{1, 0})
	})
	seed(MsgNack, func(w *builder) {
		w.u64(tFrom, 0)
		w.bytes(tPartial, binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint64(nil, 3), 1))
	})
	seed(MsgDigest, func(w *builder) {
		w.u64(tRev, 0)
		w.u64(tNodesHash, 0)
		w.bytes(tBuckets, make([]byte, 2+4*16))
	})
	seed(MsgChunk, func(w *builder) {
		w.u64(tXferID, 9)
		w.u8(tKind, 1)
		w.u64(tRev, 5)
		w.u32(tChunk, 0)
		w.u32(tChunks, 1)
		w.bytes(tBitmap, make([]byte, 32))
		w.bytes(tBlob, []byte{2, 3, 1, 1, 0})
	})
	seed(MsgXferReq, func(w *builder) {
		w.u64(tXferID, 0)
		w.u8(tKind, 3)
		w.bytes(tRange, make([]byte, 8))
	})
	seed(MsgStatus, func(w *builder) {
		w.u8(tRole, 1)
		w.u64(tRev, 3)
		w.u64(tRevEpoch, 1)
	})
	f.Fuzz(func(t *testing.T, typ byte, body []byte) {
		var tg target
		_ = decodeTarget(&tg, body)
		for i, r := range reps {
			seq++
			var w builder
			w.start(nil, Header{Type: MsgType(typ & 7), Sender: uint32(11 - i), Epoch: 1, Seq: seq})
			w.raw(body)
			r.HandleDatagram(w.seal(c))
			clk.Advance(time.Millisecond)
			r.Tick()
		}
	})
}
