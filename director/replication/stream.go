package replication

import (
	"encoding/binary"
	"fmt"
	"slices"
	"time"

	"github.com/tunneldirector/tunneldirector/affinity"
)

// winEntry is one revision in the master's resend window: the bodies of
// its parts, re-sealed under a fresh sequence number when resent.
type winEntry struct {
	rev, prev, epoch, prevEpoch uint64
	parts                       [][]byte
	changes                     int
}

// dataOverhead is what a DATA datagram spends besides its blob slice.
const dataOverhead = HeaderLen + TagLen + 5*(tlvHead+8) + 2*(tlvHead+4) + tlvHead

// stream sends one committed revision and keeps it for resending.
func (r *Replicator) stream(a *affinity.Applied, prev uint64) {
	blob := affinity.MarshalChanges(a.Changes)
	room := r.cfg.MTU - dataOverhead
	n := (len(blob) + room - 1) / room
	e := &winEntry{rev: a.Revision, prev: prev, epoch: r.epoch, prevEpoch: r.epochAt(prev), changes: len(a.Changes), parts: make([][]byte, n)}
	for i := range n {
		var w builder
		w.u64(tRev, e.rev)
		w.u64(tPrev, e.prev)
		w.u64(tRevEpoch, e.epoch)
		w.u64(tPrevEpoch, e.prevEpoch)
		w.u64(tTime, uint64(r.clk.Now().UnixNano()))
		w.u32(tPart, uint32(i))
		w.u32(tParts, uint32(n))
		w.bytes(tBlob, blob[i*room:min(len(blob), (i+1)*room)])
		e.parts[i] = w.b
	}
	r.window = append(r.window, e)
	r.winByPrev[e.prev] = e
	r.windowChanges += e.changes
	for len(r.window) > 1 && r.windowChanges > r.cfg.WindowChanges {
		old := r.window[0]
		r.window = r.window[1:]
		r.windowChanges -= old.changes
		if r.winByPrev[old.prev] == old {
			delete(r.winByPrev, old.prev)
		}
	}
	for _, b := range e.parts {
		r.send(MsgData, b)
	}
}

// pendRev is a revision the backup is assembling or holds complete, not
// yet applied.
type pendRev struct {
	rev, prev, epoch, prevEpoch uint64
	parts                       [][]byte
	got                         int
	size                        int
}

func (p *pendRev) complete() bool { return p.got == len(p.parts) }

func (r *Replicator) dropPending() {
	clear(r.pending)
	clear(r.pendByPrev)
	r.pendBytes = 0
}

func (r *Replicator) forget(p *pendRev) {
	delete(r.pending, p.rev)
	if r.pendByPrev[p.prev] == p {
		delete(r.pendByPrev, p.prev)
	}
	r.pendBytes -= p.size
}

// base is the revision the backup's next live revision must follow: its
// own, or that of a full snapshot waiting to be applied below it.
func (r *Replicator) base() uint64 {
	if r.ready != nil && r.ready.full && r.ready.rev <= r.rev {
		return r.ready.rev
	}
	return r.rev
}

const maxParts = 1 << 20

func (r *Replicator) onData(p *Packet) error {
	f := fields{p: p}
	f.need(tRev, tPrev, tPart, tParts, tBlob)
	rev, prev, epoch, prevEpoch := f.u64(tRev), f.u64(tPrev), f.u64(tRevEpoch), f.u64(tPrevEpoch)
	part, parts := f.u32(tPart), f.u32(tParts)
	blob := f.get(tBlob)
	if f.err != nil {
		return f.err
	}
	if parts == 0 || parts > maxParts || part >= parts || prev >= rev {
		return fmt.Errorf("%w: data part %d/%d of revision %d after %d", ErrMalformed, part, parts, rev, prev)
	}
	if r.role != RoleBackup || p.Epoch < r.masterEpoch {
		return nil
	}
	if rev > r.masterRev {
		r.masterRev = rev
		r.noteBehind(r.clk.Now())
	}
	if rev <= r.base() {
		return nil // applied already: a resend or duplicate
	}
	pr := r.pending[rev]
	if pr != nil && (pr.prev != prev || pr.prevEpoch != prevEpoch || pr.epoch != epoch || len(pr.parts) != int(parts)) {
		r.forget(pr) // a new master's revision of the same number
		pr = nil
	}
	if pr == nil {
		if r.pendBytes+len(blob) > r.cfg.MaxPendingBytes {
			r.c.PendingDropped++
			return nil
		}
		pr = &pendRev{rev: rev, prev: prev, epoch: epoch, prevEpoch: prevEpoch, parts: make([][]byte, parts)}
		r.pending[rev] = pr
		r.pendByPrev[prev] = pr
	}
	if pr.parts[part] != nil {
		return nil
	}
	pr.parts[part] = blob
	pr.got++
	pr.size += len(blob)
	r.pendBytes += len(blob)
	if pr.complete() {
		r.tryApply()
	}
	return nil
}

// tryApply commits every revision that can be: the complete ones that
// follow the applied revision, coalesced into one store commit (the
// tunnels keep their own revisions, so the table equals the master's), and
// a waiting snapshot or repair together with the revisions after it.
func (r *Replicator) tryApply() {
	for {
		var rep *target
		start := r.rev
		if t := r.ready; t != nil {
			switch {
			case t.full && t.rev > r.rev:
				r.applyTarget(t)
				continue
			case !t.full && t.rev < r.rev:
				r.ready = nil // stale repair: the next digest asks again
				continue
			case r.pendByPrev[t.rev] == nil || !r.pendByPrev[t.rev].complete():
				// Nothing follows it yet: apply it at its own revision
				// now rather than wait for the master's next change.
				r.applyTargetReset(t)
				continue
			case t.full || t.rev == r.rev:
				rep, start = t, t.rev
			}
		}
		var chain []*pendRev
		changes := 0
		curEpoch := r.epochAt(start)
		if rep != nil {
			curEpoch = rep.revEpoch
		}
		for cur := start; ; {
			pr := r.pendByPrev[cur]
			// A revision follows ours only if it follows the same
			// history: after a split brain both sides have numbers
			// alike that mean different tables.
			if pr == nil || !pr.complete() || (cur != 0 && !epochsAgree(pr.prevEpoch, curEpoch)) {
				break
			}
			curEpoch = pr.epoch
			if rep == nil && r.ready != nil && pr.rev > r.ready.rev {
				break // stop at a partial repair's revision, to apply it there
			}
			chain = append(chain, pr)
			changes += pr.changesHint()
			cur = pr.rev
			if changes >= r.cfg.MaxApplyChanges && cur > r.rev {
				break
			}
		}
		if len(chain) == 0 || chain[len(chain)-1].rev <= r.rev {
			return
		}
		if !r.applyChain(rep, chain) {
			return
		}
	}
}

func (p *pendRev) changesHint() int { return p.size / 64 }

func (r *Replicator) applyChain(rep *target, chain []*pendRev) bool {
	var batch []affinity.Change
	if rep != nil {
		batch = r.targetOps(rep)
	}
	for _, pr := range chain {
		cs, err := affinity.UnmarshalChanges(slices.Concat(pr.parts...))
		if err != nil {
			r.forget(pr)
			r.applyFailed(pr.rev, err)
			return false
		}
		if r.testDrop != nil {
			cs = r.testDrop(pr.rev, cs)
		}
		batch = append(batch, cs...)
	}
	last := chain[len(chain)-1].rev
	a, err := r.st.CommitAt(last, batch)
	if err != nil {
		for _, pr := range chain {
			r.forget(pr)
		}
		r.applyFailed(last, err)
		return false
	}
	r.drain(a)
	if len(a.Changes) == 0 || r.rev != last {
		// Nothing changed: the store kept its revision; the digest
		// still describes the table, so follow the master's number.
		r.rev = max(r.rev, last)
		r.pushRing()
	}
	if rep != nil {
		r.appliedTarget(rep)
	}
	for _, pr := range chain {
		r.noteEpoch(pr.epoch, pr.rev)
		r.forget(pr)
		r.c.RevisionsApplied++
	}
	r.c.ChangesApplied += uint64(len(batch))
	r.synced = true
	r.gcPending()
	r.noteBehind(r.clk.Now())
	return true
}

// gcPending forgets buffered revisions the table has passed.
func (r *Replicator) gcPending() {
	b := r.base()
	for rev, pr := range r.pending {
		if rev <= b {
			r.forget(pr)
		}
	}
}

func (r *Replicator) applyFailed(rev uint64, err error) {
	r.c.ApplyFailures++
	r.lastErr = err.Error()
	r.ready = nil
	r.setOOS(fmt.Sprintf("cannot apply revision %d: %v; snapshot requested", rev, err))
	r.requestXfer(xSnapshot, allBuckets())
}

func (r *Replicator) backupTimers(now time.Time) {
	if !r.masterHeard.IsZero() && now.Sub(r.masterHeard) > r.cfg.PeerTimeout {
		if r.oos == "" || r.masterSilent {
			r.masterSilent = true
			r.setOOS(fmt.Sprintf("no word from the master for %s", now.Sub(r.masterHeard).Round(time.Millisecond)))
		}
	} else if r.masterSilent {
		r.masterSilent = false
		r.oos = ""
	}
	b := r.base()
	behind := r.masterRev > b || len(r.pending) > 0
	if behind && now.Sub(r.lastNack) >= r.cfg.NackInterval && !r.behindSince.IsZero() && now.Sub(r.behindSince) >= r.cfg.NackInterval {
		r.sendNack(b)
		r.lastNack = now
	}
	if !behind && r.ready == nil && r.in == nil && r.masterRev == r.rev && !r.masterHeard.IsZero() &&
		(r.lastDigest.IsZero() || now.Sub(r.lastDigest) >= r.cfg.DigestInterval) {
		r.sendDigest()
		r.lastDigest = now
	}
}

func (r *Replicator) sendNack(from uint64) {
	var w builder
	w.u64(tFrom, from)
	room := r.cfg.MTU - HeaderLen - TagLen - 64
	revs := make([]uint64, 0, len(r.pending))
	for rev := range r.pending {
		revs = append(revs, rev)
	}
	slices.Sort(revs)
	for _, rev := range revs {
		pr := r.pending[rev]
		if len(w.b) > room-64 {
			break
		}
		if pr.complete() {
			w.u64(tHave, rev)
			continue
		}
		v := binary.BigEndian.AppendUint64(nil, rev)
		for i, b := range pr.parts {
			if b == nil && len(v) < 4*32 {
				v = binary.BigEndian.AppendUint32(v, uint32(i))
			}
		}
		w.bytes(tPartial, v)
	}
	r.c.Nacks++
	r.send(MsgNack, w.b)
}

func (r *Replicator) onNack(p *Packet) error {
	f := fields{p: p}
	f.need(tFrom)
	from := f.u64(tFrom)
	if f.err != nil {
		return f.err
	}
	have := map[uint64]bool{}
	partial := map[uint64][]uint32{}
	for _, v := range p.Fields {
		switch v.Type {
		case tHave:
			if len(v.Value) != 8 {
				return fmt.Errorf("%w: nack have of %d bytes", ErrMalformed, len(v.Value))
			}
			have[binary.BigEndian.Uint64(v.Value)] = true
		case tPartial:
			if len(v.Value) < 8 || (len(v.Value)-8)%4 != 0 {
				return fmt.Errorf("%w: nack partial of %d bytes", ErrMalformed, len(v.Value))
			}
			rev := binary.BigEndian.Uint64(v.Value)
			for b := v.Value[8:]; len(b) >= 4; b = b[4:] {
				partial[rev] = append(partial[rev], binary.BigEndian.Uint32(b))
			}
		}
	}
	if r.role != RoleMaster {
		return nil
	}
	if from >= r.rev {
		return nil
	}
	e := r.winByPrev[from]
	if e == nil {
		if r.out == nil || r.out.kind != xSnapshot {
			r.startOut(xSnapshot, allBuckets(), fmt.Sprintf("backup asks for revisions after %d, older than the resend window", from))
		}
		return nil
	}
	budget := r.cfg.ResendBudget
	for ; e != nil && budget > 0; e = r.winByPrev[e.rev] {
		if have[e.rev] {
			continue
		}
		if miss, ok := partial[e.rev]; ok {
			for _, i := range miss {
				if int(i) < len(e.parts) {
					r.send(MsgData, e.parts[i])
					r.c.Resends++
					budget--
				}
			}
			continue
		}
		for _, b := range e.parts {
			r.send(MsgData, b)
			r.c.Resends++
			budget--
		}
	}
	return nil
}

// ---- anti-entropy ----

func (r *Replicator) sendDigest() {
	per := (r.cfg.MTU - HeaderLen - TagLen - 3*(tlvHead+8) - tlvHead - 2) / 4
	for first := 0; first < NumBuckets; first += per {
		n := min(per, NumBuckets-first)
		var w builder
		w.u64(tRev, r.rev)
		w.u64(tRevEpoch, r.epochAt(r.rev))
		w.u64(tNodesHash, r.dig.nodes)
		v := binary.BigEndian.AppendUint16(nil, uint16(first))
		for b := first; b < first+n; b++ {
			v = binary.BigEndian.AppendUint32(v, uint32(r.dig.sums[b]))
		}
		w.bytes(tBuckets, v)
		r.send(MsgDigest, w.b)
	}
}

func (r *Replicator) onDigest(p *Packet) error {
	f := fields{p: p}
	f.need(tRev, tNodesHash, tBuckets)
	rev, nodes := f.u64(tRev), f.u64(tNodesHash)
	bk := f.get(tBuckets)
	if f.err != nil {
		return f.err
	}
	if len(bk) < 2 || (len(bk)-2)%4 != 0 {
		return fmt.Errorf("%w: digest buckets of %d bytes", ErrMalformed, len(bk))
	}
	first := int(binary.BigEndian.Uint16(bk))
	sums := bk[2:]
	if first+len(sums)/4 > NumBuckets {
		return fmt.Errorf("%w: digest buckets %d+%d beyond %d", ErrMalformed, first, len(sums)/4, NumBuckets)
	}
	if r.role != RoleMaster {
		return nil
	}
	mine := r.ringAt(rev)
	if mine == nil {
		return nil // that revision is gone from the ring: the next digest will do
	}
	var bad bucketSet
	for i := 0; i < len(sums)/4; i++ {
		if uint32(mine.sums[first+i]) != binary.BigEndian.Uint32(sums[4*i:]) {
			bad.add(first + i)
		}
	}
	nodesBad := nodes != mine.nodes
	var w builder
	w.u64(tRev, rev)
	match := bad.count() == 0 && !nodesBad
	if match {
		w.u8(tMatch, 1)
		r.c.DigestMatches++
		if first+len(sums)/4 == NumBuckets {
			r.lastMatch, r.matchRev = r.clk.Now(), rev
			r.tablesEqual = true
		}
	} else {
		w.u8(tMatch, 0)
		w.bytes(tBitmap, bad[:])
		r.c.DigestMismatches++
		r.tablesEqual = false
		if nodesBad && bad.count() == 0 {
			bad.add(0) // nodes travel with any repair
		}
		if r.out == nil {
			r.startOut(xRepair, bad, fmt.Sprintf("digest at revision %d differs in %d bucket(s)", rev, bad.count()))
		}
	}
	r.send(MsgVerdict, w.b)
	return nil
}

func (r *Replicator) onVerdict(p *Packet) error {
	f := fields{p: p}
	f.need(tRev, tMatch)
	rev, match := f.u64(tRev), f.u8(tMatch)
	if f.err != nil {
		return f.err
	}
	if r.role != RoleBackup {
		return nil
	}
	if match == 1 {
		r.c.DigestMatches++
		if rev == r.rev {
			r.lastMatch, r.matchRev = r.clk.Now(), rev
			r.tablesEqual = true
			r.synced = true
			if len(r.oos) > 6 && r.oos[:6] == "digest" {
				r.oos = ""
			}
		}
		return nil
	}
	var bad bucketSet
	copy(bad[:], f.get(tBitmap))
	r.c.DigestMismatches++
	r.tablesEqual = false
	r.setOOS(fmt.Sprintf("digest at revision %d differs from the master's in %d bucket(s); repair under way", rev, bad.count()))
	return nil
}
