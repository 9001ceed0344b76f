package replication

import (
	"encoding/binary"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/director/replication/wire"
)

// xferKind says what a transfer carries and who applies it.
type xferKind uint8

const (
	// xSnapshot: master to backup, every bucket.
	xSnapshot xferKind = 1
	// xRepair: master to backup, the buckets a digest found different.
	xRepair xferKind = 2
	// xPull: backup to master, the backup's whole table, to merge after
	// a split brain.
	xPull xferKind = 3
)

func (k xferKind) String() string {
	switch k {
	case xSnapshot:
		return "snapshot"
	case xRepair:
		return "repair"
	case xPull:
		return "pull"
	}
	return fmt.Sprintf("xferKind(%d)", uint8(k))
}

// chunkOverhead is what a CHUNK datagram spends besides its blob slice.
const chunkOverhead = wire.HeaderLen + wire.TagLen + sessionOverhead + 4*(wire.TLVHead+8) + wire.TLVHead + 1 + 2*(wire.TLVHead+4) + wire.TLVHead + 32 + wire.TLVHead

// maxChunks bounds the chunks a transfer may announce; a receiver also
// refuses a transfer whose chunks could not fit MaxPendingBytes x 16
// (the whole table of the largest farm, encoded).
const maxChunks = 1 << 20

// Blob records of a transfer: kind byte, uvarint length, record.
const (
	recNode    = 1
	recTunnel  = 2
	recHistory = 3
	// recBuckets is the unknown-peer bucket assignment
	// (affinity.MarshalBuckets), in every transfer: a director that does
	// not know it skips it.
	recBuckets = 4
)

// target is a decoded transfer: the sender's table (or some of its
// buckets) at one revision.
type target struct {
	kind     xferKind
	full     bool
	rev      uint64
	revEpoch uint64
	buckets  bucketSet
	history  []epochStart
	nodes    []affinity.Node
	tunnels  []affinity.Tunnel
	// unknown is the sender's unknown-peer bucket assignment.
	unknown []uint16
}

// encodeTarget encodes the table's nodes and the tunnels of the buckets
// (all with full) and returns the revision they belong to. It streams the
// tunnels under the table's read lock instead of copying and sorting a
// snapshot, and starts over if a commit landed between the reads.
func encodeTarget(h []epochStart, tab *affinity.Table, buckets bucketSet, full bool) ([]byte, uint64) {
	var b []byte
	rec := func(kind byte, v []byte) {
		b = append(b, kind)
		b = binary.AppendUvarint(b, uint64(len(v)))
		b = append(b, v...)
	}
	for {
		b = b[:0]
		rev := tab.Revision()
		for _, e := range h {
			rec(recHistory, binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint64(nil, e.epoch), e.first))
		}
		for _, n := range tab.Nodes() {
			rec(recNode, affinity.MarshalNode(&n))
		}
		rec(recBuckets, affinity.MarshalBuckets(tab.Buckets()))
		tab.EachTunnel(func(t *affinity.Tunnel) {
			if full || buckets.has(bucketOf(t.ID)) {
				rec(recTunnel, affinity.MarshalTunnel(t))
			}
		})
		if tab.Revision() == rev {
			return b, rev
		}
	}
}

func decodeTarget(t *target, b []byte) error {
	// A first pass counts the tunnel records, so a million of them are
	// decoded into one slice instead of one grown by doubling (each
	// growth copying every tunnel decoded so far).
	if n := countRecords(b, recTunnel); n > 0 {
		t.tunnels = make([]affinity.Tunnel, 0, n)
	}
	for len(b) > 0 {
		kind := b[0]
		n, k := binary.Uvarint(b[1:])
		if k <= 0 || n > uint64(len(b)-1-k) {
			return fmt.Errorf("%w: transfer record truncated", wire.ErrMalformed)
		}
		v := b[1+k : 1+k+int(n)]
		b = b[1+k+int(n):]
		switch kind {
		case recHistory:
			if len(v) != 16 {
				return fmt.Errorf("%w: history record of %d bytes", wire.ErrMalformed, len(v))
			}
			t.history = append(t.history, epochStart{binary.BigEndian.Uint64(v), binary.BigEndian.Uint64(v[8:])})
		case recNode:
			nd, err := affinity.UnmarshalNode(v)
			if err != nil {
				return fmt.Errorf("transfer node: %w", err)
			}
			t.nodes = append(t.nodes, nd)
		case recBuckets:
			marks, err := affinity.UnmarshalBuckets(v)
			if err != nil {
				return fmt.Errorf("transfer buckets: %w", err)
			}
			t.unknown = marks
		case recTunnel:
			tu, err := affinity.UnmarshalTunnel(v)
			if err != nil {
				return fmt.Errorf("transfer tunnel: %w", err)
			}
			if !t.full && !t.buckets.has(bucketOf(tu.ID)) {
				return fmt.Errorf("%w: repair carries tunnel %s outside its buckets", wire.ErrMalformed, tu.ID)
			}
			t.tunnels = append(t.tunnels, tu)
		default:
			// A newer director's record: skipped.
		}
	}
	// The sender streams its tunnels in its map's order; in id order,
	// the changes made of them reach the store in its key order, so its
	// sort before writing has nothing to move (a million records in
	// random order cost it seconds of comparisons).
	if !slices.IsSortedFunc(t.tunnels, byID) {
		slices.SortFunc(t.tunnels, byID)
	}
	return nil
}

func byID(a, b affinity.Tunnel) int { return strings.Compare(a.ID, b.ID) }

// countRecords counts the records of one kind in a transfer blob, stopping
// at the first malformed one (decodeTarget then reports it).
func countRecords(b []byte, kind byte) int {
	n := 0
	for len(b) > 0 {
		l, k := binary.Uvarint(b[1:])
		if k <= 0 || l > uint64(len(b)-1-k) {
			break
		}
		if b[0] == kind {
			n++
		}
		b = b[1+k+int(l):]
	}
	return n
}

// outXfer is a transfer being sent, paced by a token bucket.
type outXfer struct {
	id        uint64
	kind      xferKind
	rev       uint64
	revEpoch  uint64
	buckets   bucketSet
	blob      []byte
	room      int
	n         int
	queue     []uint32
	queued    []bool
	tokens    float64
	refill    time.Time
	lastHeard time.Time
	started   time.Time
	why       string
	// enc receives the encoding made off the event loop (work.go); nil
	// once the transfer is encoded.
	enc chan encoded
}

func (o *outXfer) enqueue(i uint32) {
	if int(i) < o.n && !o.queued[i] {
		o.queued[i] = true
		o.queue = append(o.queue, i)
	}
}

// startOut begins sending a snapshot, a repair or a pull. A snapshot
// replaces a repair in progress; otherwise one transfer runs at a time.
func (r *Replicator) startOut(kind xferKind, buckets bucketSet, why string) {
	if o := r.out; o != nil && (o.kind == kind || kind == xRepair) {
		return
	}
	now := r.clk.Now()
	if kind == xSnapshot && !r.m.deliveredAt.IsZero() && now.Sub(r.m.deliveredAt) < 4*r.cfg.StatusInterval {
		return // the backup's word predates the snapshot it just took
	}
	full := kind != xRepair
	r.seq++
	o := &outXfer{id: r.seq, kind: kind, buckets: buckets, refill: now, lastHeard: now, started: now, why: why}
	r.out = o
	if r.st.Table().Len() >= r.bigWork {
		// Seconds of work at a million tunnels: off the event loop,
		// so that statuses keep flowing meanwhile.
		r.encodeLater(o, full)
		return
	}
	blob, rev := encodeTarget(r.history, r.st.Table(), buckets, full)
	r.encoded(o, blob, rev, now)
}

// encoded readies an encoded transfer for sending and starts it.
func (r *Replicator) encoded(o *outXfer, blob []byte, rev uint64, now time.Time) {
	o.rev, o.revEpoch, o.blob = rev, r.epochAt(rev), blob
	o.room = r.cfg.MTU - chunkOverhead
	o.n = max(1, (len(blob)+o.room-1)/o.room)
	o.queued = make([]bool, o.n)
	o.refill, o.lastHeard = now, now
	for i := range o.n {
		o.enqueue(uint32(i))
	}
	r.log.Info("transfer started", "kind", o.kind.String(), "id", o.id, "to", r.peer.ID, "revision", o.rev, "bytes", len(blob), "chunks", o.n,
		"why", o.why, "encoded_in", now.Sub(o.started).Round(time.Millisecond))
	r.pumpOut(now)
}

func (r *Replicator) sendChunk(o *outXfer, i uint32) {
	var w wire.Builder
	w.U64(wire.TXferID, o.id)
	w.U8(wire.TKind, uint8(o.kind))
	w.U64(wire.TRev, o.rev)
	w.U64(wire.TRevEpoch, o.revEpoch)
	w.U32(wire.TChunk, i)
	w.U32(wire.TChunks, uint32(o.n))
	w.Bytes(wire.TBitmap, o.buckets[:])
	w.Bytes(wire.TBlob, o.blob[int(i)*o.room:min(len(o.blob), (int(i)+1)*o.room)])
	r.send(wire.MsgChunk, w.B)
}

// pumpOut sends queued chunks as far as the rate allows. The burst is
// 10 ms of the rate, so live datagrams interleave with a snapshot.
func (r *Replicator) pumpOut(now time.Time) {
	o := r.out
	if o == nil || !r.takeEncoded(o, now) {
		return
	}
	rate := float64(r.cfg.SnapshotRate)
	burst := max(rate/100, float64(16*r.cfg.MTU))
	o.tokens = min(burst, o.tokens+now.Sub(o.refill).Seconds()*rate)
	o.refill = now
	for len(o.queue) > 0 && o.tokens >= 0 {
		i := o.queue[0]
		o.queue = o.queue[1:]
		o.queued[i] = false
		r.sendChunk(o, i)
		o.tokens -= float64(r.cfg.MTU)
	}
}

// inXfer is a transfer being received.
type inXfer struct {
	id       uint64
	kind     xferKind
	rev      uint64
	revEpoch uint64
	buckets  bucketSet
	n        int
	got      int
	chunks   [][]byte
	lastRecv time.Time
	lastReq  time.Time
}

func (r *Replicator) onChunk(p *wire.Packet) error {
	f := wire.Fields{P: p}
	f.Need(wire.TXferID, wire.TKind, wire.TRev, wire.TChunk, wire.TChunks, wire.TBitmap, wire.TBlob)
	id, kind := f.U64(wire.TXferID), xferKind(f.U8(wire.TKind))
	rev, revEpoch := f.U64(wire.TRev), f.U64(wire.TRevEpoch)
	i, n := f.U32(wire.TChunk), f.U32(wire.TChunks)
	bm, blob := f.Get(wire.TBitmap), f.Get(wire.TBlob)
	if f.Err != nil {
		return f.Err
	}
	if n == 0 || n > maxChunks || i >= n || len(bm) != len(bucketSet{}) ||
		int64(n)*int64(len(blob)) > 16*int64(r.cfg.MaxPendingBytes) {
		return fmt.Errorf("%w: chunk %d of %d (%d bytes)", wire.ErrMalformed, i, n, len(blob))
	}
	switch kind {
	case xSnapshot, xRepair:
		if r.role != RoleBackup {
			return nil
		}
	case xPull:
		if r.role != RoleMaster {
			return nil
		}
	default:
		return nil
	}
	now := r.clk.Now()
	if id == r.lastInID {
		r.sendXferReq(id, kind, nil, nil) // our "done" was lost
		return nil
	}
	in := r.in
	if in == nil || in.id != id {
		if in != nil && in.id > id {
			return nil // an older transfer than the one under way
		}
		in = &inXfer{id: id, kind: kind, rev: rev, revEpoch: revEpoch, n: int(n), chunks: make([][]byte, n)}
		copy(in.buckets[:], bm)
		r.in = in
	}
	if int(n) != in.n || in.chunks[i] != nil {
		return nil
	}
	in.chunks[i] = blob
	in.got++
	in.lastRecv = now
	if in.got < in.n {
		return nil
	}
	r.in = nil
	r.lastInID = id
	r.sendXferReq(id, kind, nil, nil)
	t := &target{kind: kind, full: kind != xRepair, rev: in.rev, revEpoch: in.revEpoch, buckets: in.buckets}
	if err := decodeTarget(t, slices.Concat(in.chunks...)); err != nil {
		r.setOOS(fmt.Sprintf("%s at revision %d undecodable: %v", kind, in.rev, err))
		return err
	}
	if kind == xPull {
		r.merge(t)
		return nil
	}
	r.b.ready = t
	r.noteBehind(now)
	r.tryApply()
	return nil
}

// sendXferReq asks for a transfer (id 0) or for the chunks of one still
// missing; no ranges means the transfer is complete.
func (r *Replicator) sendXferReq(id uint64, kind xferKind, buckets *bucketSet, missing [][2]uint32) {
	var w wire.Builder
	w.U64(wire.TXferID, id)
	w.U8(wire.TKind, uint8(kind))
	if buckets != nil {
		w.Bytes(wire.TBitmap, buckets[:])
	}
	for _, m := range missing {
		w.Bytes(wire.TRange, binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint32(nil, m[0]), m[1]))
	}
	r.send(wire.MsgXferReq, w.B)
}

// requestXfer asks the master for a snapshot or repair, at most once per
// XferIdle.
func (r *Replicator) requestXfer(kind xferKind, buckets bucketSet) {
	now := r.clk.Now()
	if !r.b.lastXReq.IsZero() && now.Sub(r.b.lastXReq) < r.cfg.XferIdle {
		return
	}
	r.b.lastXReq = now
	r.sendXferReq(0, kind, &buckets, nil)
}

func (r *Replicator) askPull(rb, eb uint64, now time.Time) {
	if r.in != nil && r.in.kind == xPull {
		return
	}
	if r.m.pullFor == [2]uint64{rb, eb} && now.Sub(r.m.pullAsked) < 4*r.cfg.XferIdle {
		return
	}
	r.m.pullFor, r.m.pullAsked = [2]uint64{rb, eb}, now
	r.log.Warn("backup is not on this master's history: pulling its table to merge", "backup_revision", rb, "backup_epoch", eb)
	all := allBuckets()
	r.sendXferReq(0, xPull, &all, nil)
}

func (r *Replicator) onXferReq(p *wire.Packet) error {
	f := wire.Fields{P: p}
	f.Need(wire.TXferID, wire.TKind)
	id, kind := f.U64(wire.TXferID), xferKind(f.U8(wire.TKind))
	if f.Err != nil {
		return f.Err
	}
	var ranges [][2]uint32
	for _, v := range p.Fields {
		if v.Type == wire.TRange {
			if len(v.Value) != 8 {
				return fmt.Errorf("%w: range of %d bytes", wire.ErrMalformed, len(v.Value))
			}
			ranges = append(ranges, [2]uint32{binary.BigEndian.Uint32(v.Value), binary.BigEndian.Uint32(v.Value[4:])})
		}
	}
	now := r.clk.Now()
	if id == 0 {
		var bs bucketSet
		copy(bs[:], f.Get(wire.TBitmap))
		switch {
		case kind == xPull && r.role == RoleBackup:
			r.startOut(xPull, allBuckets(), "master asks to merge")
		case (kind == xSnapshot || kind == xRepair) && r.role == RoleMaster:
			r.startOut(kind, bs, "backup asks")
		}
		return nil
	}
	o := r.out
	if o == nil || o.id != id {
		return nil
	}
	o.lastHeard = now
	if len(ranges) == 0 {
		switch o.kind {
		case xSnapshot:
			r.c.SnapshotsSent++
		case xRepair:
			r.c.RepairsSent++
		}
		r.log.Info("transfer delivered", "kind", o.kind.String(), "id", o.id, "took", now.Sub(o.started).Round(time.Millisecond))
		r.out = nil
		if o.kind == xSnapshot {
			r.m.deliveredAt = now
		}
		return nil
	}
	// One request queues each chunk at most once, however many
	// overlapping ranges it lists: the work is bounded by the transfer.
	work := o.n
	for _, rg := range ranges {
		for i := rg[0]; i < rg[1] && int(i) < o.n && work > 0; i++ {
			o.enqueue(i)
			work--
		}
	}
	r.pumpOut(now)
	return nil
}

func (r *Replicator) xferTimers(now time.Time) {
	if o := r.out; o != nil && r.takeEncoded(o, now) {
		r.pumpOut(now)
		idle := now.Sub(o.lastHeard)
		switch {
		case idle > 10*r.cfg.PeerTimeout:
			r.log.Warn("transfer abandoned: receiver silent", "kind", o.kind.String(), "id", o.id, "silent_for", idle)
			r.out = nil
		case len(o.queue) == 0 && idle > 4*r.cfg.XferIdle:
			// Everything sent, nothing heard: the receiver may have
			// lost every chunk. One chunk makes it ask for the rest.
			o.enqueue(0)
			o.lastHeard = now
		}
	}
	if in := r.in; in != nil && now.Sub(in.lastRecv) >= r.cfg.XferIdle && now.Sub(in.lastReq) >= r.cfg.XferIdle {
		var missing [][2]uint32
		for i := 0; i < in.n && len(missing) < 64; i++ {
			if in.chunks[i] != nil {
				continue
			}
			j := i
			for j < in.n && in.chunks[j] == nil {
				j++
			}
			missing = append(missing, [2]uint32{uint32(i), uint32(j)})
			i = j
		}
		in.lastReq = now
		r.sendXferReq(in.id, in.kind, nil, missing)
	}
}

// targetOps turns a snapshot or repair into the changes that make the
// table's nodes and unknown-peer buckets, and its tunnels in the target's
// hash ranges, equal to the target: the table's own DiffTo.
func (r *Replicator) targetOps(t *target) []affinity.Change {
	tab := r.st.Table()
	if t.full && tab.Len() == 0 && len(tab.Nodes()) == 0 {
		// A fresh backup: every record is new, so the changes are the
		// target itself, without the maps a diff builds to compare
		// (a million-tunnel snapshot spent seconds in them).
		ops := make([]affinity.Change, 0, len(t.nodes)+len(t.tunnels)+len(t.unknown))
		for i := range t.nodes {
			ops = append(ops, affinity.Change{Kind: affinity.PutNode, Node: &t.nodes[i], Reason: "snapshot"})
		}
		for i := range t.tunnels {
			ops = append(ops, affinity.Change{Kind: affinity.PutTunnel, Tunnel: &t.tunnels[i], Reason: "snapshot"})
		}
		return append(ops, affinity.BucketChanges(tab.Buckets(), t.unknown, "snapshot")...)
	}
	s := affinity.Snapshot{Revision: t.rev, Nodes: t.nodes, Tunnels: t.tunnels, Buckets: t.unknown}
	var in func(string) bool
	if !t.full {
		in = func(id string) bool { return t.buckets.has(bucketOf(id)) }
	}
	return r.st.Table().DiffTo(&s, in)
}

// applyTarget applies a snapshot or repair on its own. Above the table's
// revision it is committed at its revision; with reset (at or below the
// table's revision) the store ends at exactly the target's revision, and
// the digests of revisions above it, which belonged to a history the
// master does not share, are dropped.
func (r *Replicator) applyTarget(t *target, reset bool) {
	if r.testBigWork != nil {
		r.testBigWork("apply")
	}
	commit := r.st.CommitAt
	if reset {
		commit = r.st.CommitReset
	}
	a, err := commit(t.rev, r.targetOps(t))
	if err != nil {
		r.applyFailed(t.rev, err)
		return
	}
	r.snapDigest(t, a)
	r.committed(a)
	if reset {
		r.rev = t.rev
	} else {
		r.rev = max(r.rev, t.rev) // nothing differed: follow the master's number
	}
	r.finishTarget(t, a)
}

// finishTarget counts a committed snapshot or repair (inline or off the
// event loop, installLater) and ends the transfer state it answers.
func (r *Replicator) finishTarget(t *target, a *affinity.Applied) {
	r.c.ChangesApplied += uint64(len(a.Changes))
	r.appliedTarget(t)
	r.gcPending()
	r.noteBehind(r.clk.Now())
}

// snapDigest marks a large full snapshot's commit, so that drain makes
// the digest from the snapshot on the worker instead of hashing its
// changes one by one on the event loop.
func (r *Replicator) snapDigest(t *target, a *affinity.Applied) {
	if t.full && len(t.tunnels) >= r.bigWork && len(a.Changes) > 0 {
		r.ownSnap, r.ownSnapAt = t, [2]uint64{a.Previous(), a.Revision}
	}
}

func (r *Replicator) appliedTarget(t *target) {
	r.b.ready = nil
	r.b.synced = true
	switch t.kind {
	case xSnapshot:
		r.c.SnapshotsApplied++
		r.oos = ""
		if len(t.history) > 0 {
			r.history = nil
			for _, e := range t.history {
				if e.first <= t.rev {
					r.history = append(r.history, e)
				}
			}
		}
		r.noteEpoch(t.revEpoch, t.rev)
		r.saveState()
	case xRepair:
		r.c.RepairsApplied++
		r.c.BucketsRepaired += uint64(t.buckets.count())
		if strings.HasPrefix(r.oos, digestReason) {
			r.oos = ""
		}
	}
	r.log.Info("transfer applied", "kind", t.kind.String(), "at", t.rev, "revision", r.rev)
	r.b.lastDigest = time.Time{} // prove it at once
}
