package replication

import (
	"encoding/binary"
	"fmt"
	"time"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/director/replication/wire"
	"github.com/tunneldirector/tunneldirector/store"
)

// masterSide is what only a master keeps. The revisions it streams and
// resends are not kept here: they are read from the store's change log.
type masterSide struct {
	peerBehind  time.Time // since when the backup has been behind
	merged      [2]uint64 // (rev, epoch) of the backup history merged last
	pullAsked   time.Time
	pullFor     [2]uint64
	deliveredAt time.Time // last snapshot the backup confirmed
	// resendable caches canResend's answer for (backup revision, log
	// position): a lagging backup asks the same at every status and NACK.
	resendable struct {
		rb, at uint64
		ok     bool
	}
}

// dataOverhead is what a DATA datagram spends besides its blob slice.
const dataOverhead = wire.HeaderLen + wire.TagLen + sessionOverhead + 5*(wire.TLVHead+8) + 2*(wire.TLVHead+4) + wire.TLVHead

// parts says how many DATA datagrams carry a batch.
func (r *Replicator) parts(b *store.Batch) int {
	room := r.cfg.MTU - dataOverhead
	return max(1, (len(b.Encoded)+room-1)/room)
}

// sendPart sends part i of n of one committed batch: a slice of its
// encoding, built from the change log when it is sent (a resend builds
// just the parts asked for).
func (r *Replicator) sendPart(b *store.Batch, i, n int) {
	blob, room := b.Encoded, r.cfg.MTU-dataOverhead
	var w wire.Builder
	w.U64(wire.TRev, b.Revision)
	w.U64(wire.TPrev, b.Prev)
	w.U64(wire.TRevEpoch, r.epochAt(b.Revision))
	w.U64(wire.TPrevEpoch, r.epochAt(b.Prev))
	w.U64(wire.TTime, uint64(r.clk.Now().UnixNano()))
	w.U32(wire.TPart, uint32(i))
	w.U32(wire.TParts, uint32(n))
	w.Bytes(wire.TBlob, blob[min(len(blob), i*room):min(len(blob), (i+1)*room)])
	r.send(wire.MsgData, w.B)
}

// stream sends one committed batch as it is read from the change log.
func (r *Replicator) stream(b *store.Batch) {
	if b.Reset() {
		return // a reset is not a revision the backup can follow: it asks
	}
	if b.Encoded == nil {
		// Too large for the journal (a million-tunnel import): the
		// backup's NACK finds it outside the resend window and gets
		// a snapshot, the same size but applied in one go.
		return
	}
	n := r.parts(b)
	for i := range n {
		r.sendPart(b, i, n)
	}
}

// masterSeesBackup decides how the backup catches up: live stream, NACKs,
// a snapshot, or (when its history is not a prefix of ours) a merge.
func (r *Replicator) masterSeesBackup(rb, eb uint64, now time.Time) {
	m := &r.m
	if rb >= r.rev {
		m.peerBehind = time.Time{}
	} else if m.peerBehind.IsZero() {
		m.peerBehind = now
	}
	prefix := rb == 0 || (rb <= r.rev && epochsAgree(r.epochAt(rb), eb))
	if !prefix && m.merged != [2]uint64{rb, eb} {
		r.askPull(rb, eb, now)
		return
	}
	if rb == r.rev && prefix {
		return
	}
	if !prefix || !r.canResend(rb) {
		r.startOut(xSnapshot, allBuckets(), "backup at revision "+fmt.Sprint(rb)+" is outside the resend window")
	}
}

// canResend reports whether a backup at rb is caught up by resending:
// the change log holds every batch after rb, and they are one batch
// (however large) or at most WindowChanges changes. Further behind, a
// snapshot is cheaper.
func (r *Replicator) canResend(rb uint64) bool {
	c := &r.m.resendable
	if c.rb == rb && c.at == r.logAt && c.at != 0 {
		return c.ok
	}
	c.rb, c.at, c.ok = rb, r.logAt, r.resendable(rb)
	return c.ok
}

func (r *Replicator) resendable(rb uint64) bool {
	cur, err := r.st.Changes(rb)
	if err != nil {
		return false
	}
	defer cur.Close()
	n, batches := 0, 0
	for {
		b, ok, err := cur.Next()
		if err != nil {
			return false
		}
		if !ok {
			return true
		}
		if b.Encoded == nil && !b.Reset() {
			return false // not journaled: only a snapshot carries it
		}
		n += b.Len()
		batches++
		if batches > 1 && n > r.cfg.WindowChanges {
			return false
		}
		if b.Revision == r.logAt {
			return true
		}
	}
}

func (r *Replicator) onNack(p *wire.Packet) error {
	f := wire.Fields{P: p}
	f.Need(wire.TFrom)
	from := f.U64(wire.TFrom)
	if f.Err != nil {
		return f.Err
	}
	have := map[uint64]bool{}
	partial := map[uint64][]uint32{}
	for _, v := range p.Fields {
		switch v.Type {
		case wire.THave:
			if len(v.Value) != 8 {
				return fmt.Errorf("%w: nack have of %d bytes", wire.ErrMalformed, len(v.Value))
			}
			have[binary.BigEndian.Uint64(v.Value)] = true
		case wire.TPartial:
			if len(v.Value) < 8 || (len(v.Value)-8)%4 != 0 {
				return fmt.Errorf("%w: nack partial of %d bytes", wire.ErrMalformed, len(v.Value))
			}
			rev := binary.BigEndian.Uint64(v.Value)
			for b := v.Value[8:]; len(b) >= 4; b = b[4:] {
				partial[rev] = append(partial[rev], binary.BigEndian.Uint32(b))
			}
		}
	}
	if r.role != RoleMaster || from >= r.rev {
		return nil
	}
	if !r.canResend(from) {
		if r.out == nil || r.out.kind != xSnapshot {
			r.startOut(xSnapshot, allBuckets(), fmt.Sprintf("backup asks for revisions after %d, older than the resend window", from))
		}
		return nil
	}
	cur, err := r.st.Changes(from)
	if err != nil {
		return nil // checked just now; compacted since: the next NACK snapshots
	}
	defer cur.Close()
	budget := r.cfg.ResendBudget
	for budget > 0 {
		b, ok, err := cur.Next()
		if err != nil || !ok || b.Reset() {
			break
		}
		if have[b.Revision] {
			continue
		}
		n := r.parts(&b)
		if miss, ok := partial[b.Revision]; ok {
			for _, i := range miss {
				if int(i) < n && budget > 0 {
					r.sendPart(&b, int(i), n)
					r.c.Resends++
					budget--
				}
			}
		} else {
			for i := 0; i < n && budget > 0; i++ {
				r.sendPart(&b, i, n)
				r.c.Resends++
				budget--
			}
		}
		if b.Revision == r.logAt {
			break // what follows is streamed when the log is drained
		}
	}
	return nil
}

// ---- anti-entropy ----

func (r *Replicator) onDigest(p *wire.Packet) error {
	f := wire.Fields{P: p}
	f.Need(wire.TRev, wire.TNodesHash, wire.TBuckets)
	rev, nodes := f.U64(wire.TRev), f.U64(wire.TNodesHash)
	bk := f.Get(wire.TBuckets)
	if f.Err != nil {
		return f.Err
	}
	if len(bk) < 2 || (len(bk)-2)%4 != 0 {
		return fmt.Errorf("%w: digest buckets of %d bytes", wire.ErrMalformed, len(bk))
	}
	first := int(binary.BigEndian.Uint16(bk))
	sums := bk[2:]
	if first+len(sums)/4 > NumBuckets {
		return fmt.Errorf("%w: digest buckets %d+%d beyond %d", wire.ErrMalformed, first, len(sums)/4, NumBuckets)
	}
	if r.role != RoleMaster {
		return nil
	}
	mine, ok := r.digestAt(rev)
	if !ok {
		return nil // the log no longer reaches that revision: the next digest will do
	}
	var bad bucketSet
	for i := 0; i < len(sums)/4; i++ {
		if uint32(mine.sums[first+i]) != binary.BigEndian.Uint32(sums[4*i:]) {
			bad.add(first + i)
		}
	}
	nodesBad := nodes != mine.nodes
	var w wire.Builder
	w.U64(wire.TRev, rev)
	match := bad.count() == 0 && !nodesBad
	if match {
		w.U8(wire.TMatch, 1)
		r.c.DigestMatches++
		if first+len(sums)/4 == NumBuckets {
			r.lastMatch, r.matchRev = r.clk.Now(), rev
			r.tablesEqual = true
		}
	} else {
		w.U8(wire.TMatch, 0)
		w.Bytes(wire.TBitmap, bad[:])
		r.c.DigestMismatches++
		r.tablesEqual = false
		if nodesBad && bad.count() == 0 {
			bad.add(0) // nodes travel with any repair
		}
		if r.out == nil {
			r.startOut(xRepair, bad, fmt.Sprintf("digest at revision %d differs in %d bucket(s)", rev, bad.count()))
		}
	}
	r.send(wire.MsgVerdict, w.B)
	return nil
}

// digestAt returns this director's digest at an earlier revision: the
// current one with the batches after rev undone, read back from the
// store's change log (each resolved change carries the records it
// replaced). It fails when the log no longer reaches rev, holds batches
// read back from disk (without the old records), or would take more than
// WindowChanges changes.
func (r *Replicator) digestAt(rev uint64) (digestSums, bool) {
	if !r.digestReady() {
		return digestSums{}, false // the worker holds it: the next digest will do
	}
	d := digestSums{nodes: r.dig.nodes, sums: r.dig.sums}
	if rev == r.rev || rev == r.logAt {
		return d, true
	}
	cur, err := r.st.Changes(rev)
	if err != nil {
		return d, false
	}
	defer cur.Close()
	n := 0
	for {
		b, ok, err := cur.Next()
		if err != nil || !ok || !b.Resolved {
			return d, false
		}
		if n += b.Len(); n > r.cfg.WindowChanges {
			return d, false
		}
		for i := range b.Changes {
			if !undo(&d, &b.Changes[i]) {
				return d, false
			}
		}
		if b.Revision == r.logAt {
			return d, true
		}
	}
}

// undo takes one resolved change back out of digest sums; false when it
// cannot (a resize of the unknown-peer buckets: the change does not
// carry the old assignment).
func undo(d *digestSums, c *affinity.Change) bool {
	switch c.Kind {
	case affinity.PutTunnel:
		d.sums[bucketOf(c.Tunnel.ID)] -= tunnelHash(c.Tunnel)
		if c.Old != nil {
			d.sums[bucketOf(c.Old.ID)] += tunnelHash(c.Old)
		}
	case affinity.DeleteTunnel:
		if c.Old != nil {
			d.sums[bucketOf(c.Old.ID)] += tunnelHash(c.Old)
		}
	case affinity.PutNode:
		d.nodes -= nodeHash(c.Node)
		if c.OldNode != nil {
			d.nodes += nodeHash(c.OldNode)
		}
	case affinity.DeleteNode:
		if c.OldNode != nil {
			d.nodes += nodeHash(c.OldNode)
		}
	case affinity.PutBucket:
		o := c.OldBucket
		if o == nil || o.Count != c.Bucket.Count {
			return false
		}
		d.nodes += unknownHash(o.Index, o.Mark) - unknownHash(c.Bucket.Index, c.Bucket.Mark)
	}
	return true
}
