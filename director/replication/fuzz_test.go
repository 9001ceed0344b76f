package replication

import (
	"encoding/binary"
	"path/filepath"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/director/replication/wire"
	"github.com/tunneldirector/tunneldirector/internal/clock"
)

// FuzzMessages seals arbitrary TLV bodies with the right key, so the
// fuzzer gets past authentication into every message handler, on a
// master and on a backup.
func FuzzMessages(f *testing.F) {
	dir := f.TempDir()
	clk := clock.NewManual(epoch0)
	_, e0, e1 := NewFakeNetwork(FakeConfig{Drop: 1}, clk)
	var reps [2]*Replicator
	for i := range 2 {
		st := openStore(f, filepath.Join(dir, []string{"m.db", "b.db"}[i]), 0)
		r, err := New(Config{ID: uint32(10 + i), Key: testKey, Store: st, Transport: []Transport{e0, e1}[i], Clock: clk, CT: &stubCT{}})
		if err != nil {
			f.Fatal(err)
		}
		reps[i] = r
	}
	reps[0].SetRole(RoleMaster)
	seq := uint64(1)
	seed := func(t wire.MsgType, body func(w *wire.Builder)) {
		var w wire.Builder
		body(&w)
		f.Add(byte(t), w.B)
	}
	seed(wire.MsgData, func(w *wire.Builder) {
		w.U64(wire.TRev, 2)
		w.U64(wire.TPrev, 1)
		w.U32(wire.TPart, 0)
		w.U32(wire.TParts, 1)
		w.Bytes(wire.TBlob, []byte{1, 0})
	})
	seed(wire.MsgNack, func(w *wire.Builder) {
		w.U64(wire.TFrom, 0)
		w.Bytes(wire.TPartial, binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint64(nil, 3), 1))
	})
	seed(wire.MsgDigest, func(w *wire.Builder) {
		w.U64(wire.TRev, 0)
		w.U64(wire.TNodesHash, 0)
		w.Bytes(wire.TBuckets, make([]byte, 2+4*16))
	})
	seed(wire.MsgChunk, func(w *wire.Builder) {
		w.U64(wire.TXferID, 9)
		w.U8(wire.TKind, 1)
		w.U64(wire.TRev, 5)
		w.U32(wire.TChunk, 0)
		w.U32(wire.TChunks, 1)
		w.Bytes(wire.TBitmap, make([]byte, 32))
		w.Bytes(wire.TBlob, []byte{2, 3, 1, 1, 0})
	})
	seed(wire.MsgXferReq, func(w *wire.Builder) {
		w.U64(wire.TXferID, 0)
		w.U8(wire.TKind, 3)
		w.Bytes(wire.TRange, make([]byte, 8))
	})
	seed(wire.MsgStatus, func(w *wire.Builder) {
		w.U8(wire.TRole, 1)
		w.U64(wire.TRev, 3)
		w.U64(wire.TRevEpoch, 1)
		w.U64(wire.TCTStream, 5)
		w.U64(wire.TCTNext, 9)
	})
	seed(wire.MsgCTData, func(w *wire.Builder) {
		w.U64(wire.TCTStream, 5)
		w.U64(wire.TCTSeq, 2)
		w.Bytes(wire.TCTRecords, []byte{3, 1})
	})
	seed(wire.MsgCTData, func(w *wire.Builder) {
		w.U64(wire.TCTStream, 5)
		w.U64(wire.TCTSeq, 7)
		w.U64(wire.TCTReset, 7)
		w.Bytes(wire.TCTRecords, nil)
	})
	seed(wire.MsgCTNack, func(w *wire.Builder) {
		w.U64(wire.TCTStream, 5)
		w.U64(wire.TCTSeq, 1)
		w.Bytes(wire.TCTRange, binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint64(nil, 1), 4))
	})
	seed(wire.MsgCTResync, func(w *wire.Builder) {})
	f.Fuzz(func(t *testing.T, typ byte, body []byte) {
		for i, r := range reps {
			seq++
			r.HandleDatagram(seal(r, testKey, wire.Header{Type: wire.MsgType(typ & 15), Sender: uint32(11 - i), Epoch: 1, Seq: seq}, func(w *wire.Builder) {
				w.Raw(body)
			}))
			clk.Advance(time.Millisecond)
			r.Tick()
		}
	})
}

// stubCT takes the conntrack stream's records and resync requests (the
// fuzzer reaches the stream's handlers with it; ctsync decodes records).
type stubCT struct{ records, resets, resyncs int }

func (s *stubCT) CTRecords(b []byte) error { s.records++; return nil }
func (s *stubCT) CTReset()                 { s.resets++ }
func (s *stubCT) CTResyncAsked()           { s.resyncs++ }

// FuzzDecodeTarget feeds arbitrary transfer blobs (the records of a
// snapshot, repair or pull) to their decoder: it must never panic, and a
// repair must never carry a tunnel outside its buckets.
func FuzzDecodeTarget(f *testing.F) {
	f.Add(false, []byte{2, 3, 1, 1, 0})
	f.Add(true, []byte{3, 16, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1})
	f.Fuzz(func(t *testing.T, full bool, blob []byte) {
		tg := target{full: full}
		tg.buckets.add(7)
		if err := decodeTarget(&tg, blob); err != nil {
			return
		}
		for _, tu := range tg.tunnels {
			if !full && !tg.buckets.has(bucketOf(tu.ID)) {
				t.Fatalf("repair decoded tunnel %s outside its buckets", tu.ID)
			}
		}
	})
}
