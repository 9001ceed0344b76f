package replication

import (
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/tunneldirector/tunneldirector/director/replication/wire"
)

// The conntrack stream runs beside the table stream on the same
// authenticated, session-bound, replay-protected link. Its records are
// opaque here (director/ctsync encodes them: a record is self-delimiting
// and whole records go into a datagram); this file sequences, paces,
// NACKs and resends them. The master's records go to the backup, which
// hands each datagram's records to its CTHandler in stream order.
//
// A stream is (stream id, datagram sequence from 1). The id is random per
// start of streaming (a director becoming master), so a backup tells a
// new stream from a resent old one. The master keeps the datagrams it
// sent in a bounded window (CTWindowBytes); the backup buffers ones that
// arrive ahead of a gap, NACKs the gap after NackInterval, and learns of
// a lost tail from the master's status (TCTNext). A gap the window no
// longer holds is answered with a reset (TCTReset: the sequence the
// stream goes on from) and the master's handler is asked for a full
// resync; the backup counts the datagrams skipped as lost.

// CTHandler is the conntrack side of a director (director/ctsync): it
// receives the stream on a backup and is asked for resyncs on a master.
// Its methods run with the replicator's lock held: they must not call
// back into the Replicator's locking methods (CTPush, CTRoom and
// CTStatus are safe: they take only the stream's own lock).
type CTHandler interface {
	// CTRecords hands over the records of one datagram, in stream
	// order, on a backup. An error (a record that does not decode)
	// is counted as malformed; the records before it stay applied.
	CTRecords(records []byte) error
	// CTReset says records were lost for good (the master's window
	// moved past them): a full resync follows from the master.
	CTReset()
	// CTResyncAsked asks a master for everything (the backup asked, or
	// it lost records the window no longer holds).
	CTResyncAsked()
}

// CTStreamCounters count the conntrack stream's datagrams.
type CTStreamCounters struct {
	DatagramsSent     uint64 `json:"datagrams_sent"`
	DatagramsReceived uint64 `json:"datagrams_received"`
	BytesSent         uint64 `json:"bytes_sent"`
	RecordBytesSent   uint64 `json:"record_bytes_sent"`
	Resent            uint64 `json:"resent"`
	Nacks             uint64 `json:"nacks"`
	// Lost counts datagrams a backup never got: skipped by a reset.
	Lost uint64 `json:"lost"`
	// QueueDropped counts records refused because the send queue was
	// full (the link slower than the events): a resync repairs them.
	QueueDropped uint64 `json:"queue_dropped"`
	Resets       uint64 `json:"resets"`
	ResyncAsks   uint64 `json:"resync_asks"`
	Malformed    uint64 `json:"malformed"`
}

// ctSent is a datagram kept for resends.
type ctSent struct {
	seq     uint64
	records []byte
}

// ctOut is the master's side: the queue of records not yet sent, the
// window of datagrams sent, and the pacing. It has its own lock so that
// ctsync's event reader never waits for the replicator's (held for
// seconds while a large revision is applied or streamed).
type ctOut struct {
	mu     sync.Mutex
	stream uint64
	next   uint64 // sequence of the next datagram
	pend   []byte
	ends   []int // end offset of each queued record in pend
	pendAt time.Time
	maxQ   int
	room   chan struct{}
	wake   chan struct{}

	win      []ctSent
	winBytes int
	maxWin   int

	tokens float64
	refill time.Time
	c      CTStreamCounters
}

func newCTOut(queue, window int) *ctOut {
	return &ctOut{maxQ: queue, maxWin: window, room: make(chan struct{}), wake: make(chan struct{}, 1), next: 1}
}

// restart begins a new stream: a director becoming master.
func (o *ctOut) restart() {
	o.mu.Lock()
	defer o.mu.Unlock()
	var b [8]byte
	rand.Read(b[:])
	o.stream = binary.BigEndian.Uint64(b[:]) | 1
	o.next = 1
	o.pend, o.ends, o.win, o.winBytes = o.pend[:0], o.ends[:0], nil, 0
	o.signalRoom()
}

// signalRoom wakes whoever waits for queue room. Called with mu held.
func (o *ctOut) signalRoom() {
	close(o.room)
	o.room = make(chan struct{})
}

// ctRecordsRoom is what a CT_DATA datagram has for records.
func (r *Replicator) ctRecordsRoom() int {
	return r.cfg.MTU - (wire.HeaderLen + wire.TagLen + sessionOverhead + 2*(wire.TLVHead+8) + wire.TLVHead)
}

// CTPush queues one record for the peer. It does not block: it reports
// false (and counts the record dropped) when the queue is full, as a
// kernel event socket would overflow; the caller then resyncs.
func (r *Replicator) CTPush(rec []byte) bool {
	o := r.ct
	o.mu.Lock()
	defer o.mu.Unlock()
	if len(rec) > r.ctRecordsRoom() || len(o.pend)+len(rec) > o.maxQ {
		o.c.QueueDropped++
		return false
	}
	if len(o.pend) == 0 {
		o.pendAt = r.clk.Now()
	}
	o.pend = append(o.pend, rec...)
	o.ends = append(o.ends, len(o.pend))
	if len(o.pend) >= r.ctRecordsRoom() {
		select {
		case o.wake <- struct{}{}:
		default:
		}
	}
	return true
}

// CTRoom returns a channel closed when the queue has drained below half,
// for a sender that waits instead of dropping (a dump).
func (r *Replicator) CTRoom() (<-chan struct{}, bool) {
	o := r.ct
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.room, len(o.pend) < o.maxQ/2
}

// CTStatus returns the stream's counters.
func (r *Replicator) CTStatus() CTStreamCounters {
	o := r.ct
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.c
}

// CTRequestResync asks the master for a full resync of the conntrack
// state (a backup starting, becoming backup, or asked by the operator).
func (r *Replicator) CTRequestResync() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.ct.mu.Lock()
	r.ct.c.ResyncAsks++
	r.ct.mu.Unlock()
	r.send(wire.MsgCTResync, nil)
}

// pumpCT sends queued records as datagrams, as far as the rate allows:
// full datagrams at once, a partial one after CTFlushDelay. The
// datagrams are cut under the stream's lock and sent after it is
// released, so the event reader's CTPush never waits for system calls.
func (r *Replicator) pumpCT(now time.Time) {
	if r.cfg.CT == nil || r.role != RoleMaster {
		return
	}
	o := r.ct
	o.mu.Lock()
	rate := float64(r.cfg.CTRate)
	burst := max(rate/100, float64(16*r.cfg.MTU))
	if o.refill.IsZero() {
		o.tokens = burst
	}
	o.tokens = min(burst, o.tokens+now.Sub(o.refill).Seconds()*rate)
	o.refill = now
	room := r.ctRecordsRoom()
	var out []ctSent
	for len(o.pend) > 0 && o.tokens >= 0 {
		if len(o.pend) < room && now.Sub(o.pendAt) < r.cfg.CTFlushDelay {
			break
		}
		// The longest run of whole records that fits.
		k := 0
		for k < len(o.ends) && o.ends[k] <= room {
			k++
		}
		n := o.ends[k-1]
		recs := slices.Clone(o.pend[:n])
		o.pend = append(o.pend[:0], o.pend[n:]...)
		o.ends = o.ends[:copy(o.ends, o.ends[k:])]
		for i := range o.ends {
			o.ends[i] -= n
		}
		o.pendAt = now
		s := ctSent{o.next, recs}
		o.next++
		o.keep(s)
		out = append(out, s)
		o.tokens -= float64(len(recs) + 100)
	}
	if len(out) > 0 && len(o.pend) < o.maxQ/2 {
		o.signalRoom()
	}
	stream := o.stream
	o.mu.Unlock()
	for _, s := range out {
		r.sendCTData(stream, s.seq, s.records, 0)
	}
}

// keep puts a sent datagram in the window, dropping the oldest beyond its
// bound.
func (o *ctOut) keep(s ctSent) {
	o.win = append(o.win, s)
	o.winBytes += len(s.records)
	drop := 0
	for o.winBytes > o.maxWin && drop < len(o.win)-1 {
		o.winBytes -= len(o.win[drop].records)
		drop++
	}
	if drop > 0 {
		o.win = append(o.win[:0], o.win[drop:]...)
	}
}

// sendCTData sends one datagram of the stream (reset, when not zero, says
// the stream goes on from that sequence). Called with r.mu held, not the
// stream's lock.
func (r *Replicator) sendCTData(stream, seq uint64, recs []byte, reset uint64) {
	var w wire.Builder
	w.U64(wire.TCTStream, stream)
	w.U64(wire.TCTSeq, seq)
	if reset != 0 {
		w.U64(wire.TCTReset, reset)
	}
	w.Bytes(wire.TCTRecords, recs)
	before := r.c.DatagramsSent
	r.send(wire.MsgCTData, w.B)
	if r.c.DatagramsSent > before {
		o := r.ct
		o.mu.Lock()
		o.c.DatagramsSent++
		o.c.BytesSent += uint64(len(w.B) + wire.HeaderLen + wire.TagLen + sessionOverhead)
		o.c.RecordBytesSent += uint64(len(recs))
		o.mu.Unlock()
	}
}

// onCTNack resends what the backup lacks from the window; what the window
// no longer holds is skipped by a reset, and the handler asked for a
// resync.
func (r *Replicator) onCTNack(p *wire.Packet) error {
	f := wire.Fields{P: p}
	f.Need(wire.TCTStream, wire.TCTSeq)
	stream, from := f.U64(wire.TCTStream), f.U64(wire.TCTSeq)
	if f.Err != nil {
		return f.Err
	}
	var ranges [][2]uint64
	for _, v := range p.Fields {
		if v.Type == wire.TCTRange {
			if len(v.Value) != 16 {
				return fmt.Errorf("%w: conntrack nack range of %d bytes", wire.ErrMalformed, len(v.Value))
			}
			a, b := binary.BigEndian.Uint64(v.Value), binary.BigEndian.Uint64(v.Value[8:])
			if a >= b {
				return fmt.Errorf("%w: conntrack nack range %d..%d", wire.ErrMalformed, a, b)
			}
			ranges = append(ranges, [2]uint64{a, b})
		}
	}
	if r.role != RoleMaster || r.cfg.CT == nil {
		return nil
	}
	if r.ctResend(stream, from, ranges) {
		// Outside the window: ask for a resync, with the stream's lock
		// released (the handler pushes records).
		r.cfg.CT.CTResyncAsked()
	}
	return nil
}

// ctResend resends the ranges a NACK asks for and reports whether some
// were gone from the window (a reset was sent).
func (r *Replicator) ctResend(stream, from uint64, ranges [][2]uint64) (reset bool) {
	o := r.ct
	o.mu.Lock()
	if stream != o.stream || from >= o.next {
		o.mu.Unlock()
		return false
	}
	o.c.Nacks++
	if len(ranges) == 0 {
		ranges = [][2]uint64{{from, o.next}}
	}
	oldest := o.next
	if len(o.win) > 0 {
		oldest = o.win[0].seq
	}
	if from < oldest {
		// Gone from the window: the backup goes on from the oldest
		// datagram kept, and a resync restores what it lost.
		o.c.Resets++
		reset = true
	}
	var out []ctSent
	budget := r.cfg.ResendBudget
	for _, rg := range ranges {
		a, b := max(rg[0], oldest), min(rg[1], o.next, oldest+uint64(len(o.win)))
		for seq := a; seq < b && budget > 0; seq++ {
			i := int(seq - oldest)
			if i < 0 || i >= len(o.win) || o.win[i].seq != seq {
				continue
			}
			out = append(out, o.win[i])
			budget--
		}
	}
	o.c.Resent += uint64(len(out))
	o.mu.Unlock()
	if reset {
		r.sendCTData(stream, oldest, nil, oldest)
	}
	for _, s := range out {
		r.sendCTData(stream, s.seq, s.records, 0)
	}
	return reset
}

func (r *Replicator) onCTResync(p *wire.Packet) error {
	if r.role != RoleMaster || r.cfg.CT == nil {
		return nil
	}
	r.cfg.CT.CTResyncAsked()
	return nil
}

// ctIn is the backup's side: the stream it follows, the next sequence it
// delivers, and the datagrams buffered ahead of a gap.
type ctIn struct {
	stream     uint64
	expect     uint64
	buf        map[uint64][]byte
	bufBytes   int
	masterNext uint64
	gapSince   time.Time
	lastNack   time.Time
}

// maxCTBuffered bounds the datagrams a backup holds ahead of a gap
// (besides MaxPendingBytes for their bytes).
const maxCTBuffered = 1 << 16

func (r *Replicator) onCTData(p *wire.Packet) error {
	f := wire.Fields{P: p}
	f.Need(wire.TCTStream, wire.TCTSeq, wire.TCTRecords)
	stream, seq, reset := f.U64(wire.TCTStream), f.U64(wire.TCTSeq), f.U64(wire.TCTReset)
	recs := f.Get(wire.TCTRecords)
	if f.Err != nil {
		return f.Err
	}
	if seq == 0 || stream == 0 {
		return fmt.Errorf("%w: conntrack data %d of stream %d", wire.ErrMalformed, seq, stream)
	}
	if r.role != RoleBackup || r.cfg.CT == nil || p.Epoch < r.masterEpoch {
		return nil
	}
	in := &r.cti
	r.ct.mu.Lock()
	r.ct.c.DatagramsReceived++
	r.ct.mu.Unlock()
	if stream != in.stream {
		r.ctFollow(stream)
	}
	if reset != 0 {
		r.ctSkipTo(reset)
		return nil
	}
	if seq < in.expect || in.buf[seq] != nil {
		return nil // a duplicate or a resend already delivered
	}
	if seq > in.expect {
		if len(in.buf) >= maxCTBuffered || in.bufBytes+len(recs) > r.cfg.MaxPendingBytes {
			return nil // dropped: NACKed again later
		}
		in.buf[seq] = recs
		in.bufBytes += len(recs)
		if in.gapSince.IsZero() {
			in.gapSince = r.clk.Now()
		}
		return nil
	}
	err := r.ctDeliver(recs)
	r.ctDrain()
	return err
}

// ctFollow starts following a new stream from its beginning.
func (r *Replicator) ctFollow(stream uint64) {
	r.cti = ctIn{stream: stream, expect: 1, buf: map[uint64][]byte{}}
}

// ctSkipTo gives up the datagrams before seq: the master no longer holds
// them.
func (r *Replicator) ctSkipTo(seq uint64) {
	in := &r.cti
	if seq <= in.expect {
		return
	}
	r.ct.mu.Lock()
	r.ct.c.Lost += seq - in.expect
	r.ct.c.Resets++
	r.ct.mu.Unlock()
	for s, b := range in.buf {
		if s < seq {
			in.bufBytes -= len(b)
			delete(in.buf, s)
		}
	}
	in.expect = seq
	r.log.Warn("conntrack stream: records lost beyond the master's resend window; a resync follows", "resume_at", seq)
	r.cfg.CT.CTReset()
	r.ctDrain()
}

func (r *Replicator) ctDeliver(recs []byte) error {
	r.cti.expect++
	if err := r.cfg.CT.CTRecords(recs); err != nil {
		r.ct.mu.Lock()
		r.ct.c.Malformed++
		r.ct.mu.Unlock()
		return fmt.Errorf("conntrack records: %w", err)
	}
	return nil
}

// ctDrain delivers buffered datagrams that now follow in order.
func (r *Replicator) ctDrain() {
	in := &r.cti
	for {
		b, ok := in.buf[in.expect]
		if !ok {
			break
		}
		delete(in.buf, in.expect)
		in.bufBytes -= len(b)
		if err := r.ctDeliver(b); err != nil {
			r.lastErr = err.Error()
		}
	}
	if len(in.buf) == 0 && in.masterNext <= in.expect {
		in.gapSince = time.Time{}
	}
}

// ctBackupTimers NACKs a gap that lasted NackInterval: the datagrams
// missing before the ones buffered, and a lost tail the master's status
// revealed.
func (r *Replicator) ctBackupTimers(now time.Time) {
	in := &r.cti
	if r.cfg.CT == nil || in.stream == 0 {
		return
	}
	if in.masterNext > in.expect && in.gapSince.IsZero() {
		in.gapSince = now
	}
	if in.gapSince.IsZero() || now.Sub(in.gapSince) < r.cfg.NackInterval || now.Sub(in.lastNack) < r.cfg.NackInterval {
		return
	}
	in.lastNack = now
	// The gaps: before each buffered datagram, and after the last one up
	// to the master's next (a lost tail).
	held := make([]uint64, 0, len(in.buf))
	for s := range in.buf {
		held = append(held, s)
	}
	slices.Sort(held)
	var w wire.Builder
	w.U64(wire.TCTStream, in.stream)
	w.U64(wire.TCTSeq, in.expect)
	room := r.cfg.MTU - wire.HeaderLen - wire.TagLen - sessionOverhead - 64
	gap := func(a, b uint64) {
		if a < b && len(w.B)+wire.TLVHead+16 <= room {
			w.Bytes(wire.TCTRange, binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint64(nil, a), b))
		}
	}
	next := in.expect
	for _, s := range held {
		gap(next, s)
		next = s + 1
	}
	gap(next, in.masterNext)
	r.ct.mu.Lock()
	r.ct.c.Nacks++
	r.ct.mu.Unlock()
	r.send(wire.MsgCTNack, w.B)
}

// ctStatusTLVs adds the stream's position to a status datagram: the
// master's next sequence, or the backup's next expected one.
func (r *Replicator) ctStatusTLVs(w *wire.Builder) {
	if r.cfg.CT == nil {
		return
	}
	switch r.role {
	case RoleMaster:
		r.ct.mu.Lock()
		w.U64(wire.TCTStream, r.ct.stream)
		w.U64(wire.TCTNext, r.ct.next)
		r.ct.mu.Unlock()
	case RoleBackup:
		if r.cti.stream != 0 {
			w.U64(wire.TCTStream, r.cti.stream)
			w.U64(wire.TCTAck, r.cti.expect)
		}
	}
}

// ctHearsMaster notes the master's stream position from its status: a
// lost tail becomes a gap to NACK; a new stream is followed.
func (r *Replicator) ctHearsMaster(f *wire.Fields) {
	if r.cfg.CT == nil || !f.Has(wire.TCTStream) {
		return
	}
	stream, next := f.U64(wire.TCTStream), f.U64(wire.TCTNext)
	if stream == 0 || next == 0 {
		return
	}
	if stream != r.cti.stream {
		r.ctFollow(stream)
	}
	r.cti.masterNext = next
}
