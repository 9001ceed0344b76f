package replication

import (
	"encoding/binary"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/director/replication/wire"
)

// TestCTPeerNumbersBounded: stream positions and NACK ranges come from
// the peer (authenticated, but a buggy or compromised master): a status
// announcing a next sequence of 2^62 and a NACK for 1..2^63 cost a
// bounded NACK and a bounded resend, not a loop over the numbers (found
// by FuzzMessages).
func TestCTPeerNumbersBounded(t *testing.T) {
	p := newPair(t, lossy(0, 31), func(i int, c *Config) { c.CT = &stubCT{} })
	p.startBoth()
	p.steps(50)
	b, m := p.r[1], p.r[0]
	done := make(chan struct{})
	go func() {
		defer close(done)
		b.HandleDatagram(seal(b, testKey, wire.Header{Type: wire.MsgStatus, Sender: 1, Epoch: m.Epoch(), Seq: uint64(time.Now().UnixNano())}, func(w *wire.Builder) {
			w.U8(wire.TRole, uint8(RoleMaster))
			w.U64(wire.TRev, 0)
			w.U64(wire.TCTStream, 77)
			w.U64(wire.TCTNext, 1<<62)
		}))
		for range 3 { // the gap is NACKed once it lasted NackInterval
			p.clk.Advance(100 * time.Millisecond)
			b.Tick()
		}
		m.HandleDatagram(seal(m, testKey, wire.Header{Type: wire.MsgCTNack, Sender: 2, Epoch: 0, Seq: uint64(time.Now().UnixNano())}, func(w *wire.Builder) {
			w.U64(wire.TCTStream, m.ct.stream)
			w.U64(wire.TCTSeq, 0)
			w.Bytes(wire.TCTRange, binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint64(nil, 1), 1<<63))
		}))
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("a peer's stream numbers made the replicator loop")
	}
	if b.CTStatus().Nacks == 0 {
		t.Fatal("the lost tail was not NACKed")
	}
}
