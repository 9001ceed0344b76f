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

// backupSide is what only a backup keeps: the master as last heard, the
// revisions it is assembling, a transfer waiting to be applied, and its
// timers.
type backupSide struct {
	masterRev   uint64
	masterHeard time.Time
	behindSince time.Time
	pending     map[uint64]*pendRev
	pendByPrev  map[uint64]*pendRev
	pendBytes   int
	ready       *target // a complete snapshot or repair waiting to be applied
	installing  *install
	synced      bool
	lastNack    time.Time
	lastDigest  time.Time
	lastXReq    time.Time

	// masterSilent marks the out-of-sync reason "no word from the
	// master": the table is still the master's last, so still ready.
	// The silence is logged when it starts and then with backoff
	// (silentLog, doubling up to maxSilentLogEvery), not at every tick.
	masterSilent bool
	silentLogAt  time.Time
	silentEvery  time.Duration
	// deafUntil is when the event loop last came back from work that
	// kept it from hearing the master (see noteDeaf).
	deafUntil time.Time
}

// maxSilentLogEvery caps the backoff of the "master silent" reminder.
const maxSilentLogEvery = 10 * time.Minute

func newBackupSide() backupSide {
	return backupSide{pending: make(map[uint64]*pendRev), pendByPrev: make(map[uint64]*pendRev)}
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

func (p *pendRev) changesHint() int { return p.size / 64 }

func (r *Replicator) forget(p *pendRev) {
	b := &r.b
	delete(b.pending, p.rev)
	if b.pendByPrev[p.prev] == p {
		delete(b.pendByPrev, p.prev)
	}
	b.pendBytes -= p.size
}

// base is the revision the backup's next live revision must follow: its
// own, or that of a full snapshot waiting to be applied below it.
func (r *Replicator) base() uint64 {
	if in := r.b.installing; in != nil {
		return in.t.rev
	}
	if t := r.b.ready; t != nil && t.full && t.rev <= r.rev {
		return t.rev
	}
	return r.rev
}

// baseEpoch is the epoch that wrote base().
func (r *Replicator) baseEpoch() uint64 {
	if in := r.b.installing; in != nil {
		return in.t.revEpoch
	}
	return r.epochAt(r.base())
}

func (r *Replicator) backupHearsMaster(rev uint64, now time.Time) {
	r.b.masterHeard = now
	r.b.masterRev = rev
	r.noteBehind(now)
}

func (r *Replicator) noteBehind(now time.Time) {
	b := &r.b
	if b.masterRev > r.rev || b.ready != nil {
		if b.behindSince.IsZero() {
			b.behindSince = now
		}
	} else {
		b.behindSince = time.Time{}
	}
}

// maxParts bounds the parts of one revision a DATA datagram may announce;
// MaxPendingBytes bounds it further (see onData).
const maxParts = 1 << 20

// partOverhead is what the backup spends per announced part before any
// arrives (its slot in pendRev.parts), counted against MaxPendingBytes.
const partOverhead = 24

func (r *Replicator) onData(p *wire.Packet) error {
	f := wire.Fields{P: p}
	f.Need(wire.TRev, wire.TPrev, wire.TPart, wire.TParts, wire.TBlob)
	rev, prev, epoch, prevEpoch := f.U64(wire.TRev), f.U64(wire.TPrev), f.U64(wire.TRevEpoch), f.U64(wire.TPrevEpoch)
	part, parts := f.U32(wire.TPart), f.U32(wire.TParts)
	blob := f.Get(wire.TBlob)
	if f.Err != nil {
		return f.Err
	}
	if parts == 0 || parts > maxParts || part >= parts || prev >= rev {
		return fmt.Errorf("%w: data part %d/%d of revision %d after %d", wire.ErrMalformed, part, parts, rev, prev)
	}
	b := &r.b
	if r.role != RoleBackup || p.Epoch < r.masterEpoch {
		return nil
	}
	if rev > b.masterRev {
		b.masterRev = rev
		r.noteBehind(r.clk.Now())
	}
	if rev <= r.base() {
		return nil // applied already: a resend or duplicate
	}
	pr := b.pending[rev]
	if pr != nil && (pr.prev != prev || pr.prevEpoch != prevEpoch || pr.epoch != epoch || len(pr.parts) != int(parts)) {
		r.forget(pr) // a new master's revision of the same number
		pr = nil
	}
	if pr == nil {
		// The slots of every announced part count too: a revision
		// claiming a million parts must not cost megabytes for one
		// datagram.
		slots := int(parts) * partOverhead
		if b.pendBytes+slots+len(blob) > r.cfg.MaxPendingBytes {
			r.c.PendingDropped++
			return nil
		}
		pr = &pendRev{rev: rev, prev: prev, epoch: epoch, prevEpoch: prevEpoch, parts: make([][]byte, parts), size: slots}
		b.pendBytes += slots
		b.pending[rev] = pr
		b.pendByPrev[prev] = pr
	}
	if pr.parts[part] != nil {
		return nil
	}
	pr.parts[part] = blob
	pr.got++
	pr.size += len(blob)
	b.pendBytes += len(blob)
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
	b := &r.b
	if b.installing != nil && !r.installed() {
		return // the revisions after it wait for the snapshot
	}
	for {
		var rep *target
		start := r.rev
		if t := b.ready; t != nil {
			switch {
			case t.full && t.rev > r.rev && len(t.tunnels) >= r.bigWork:
				r.installLater(t)
				return
			case t.full && t.rev > r.rev:
				r.applyTarget(t, false)
				continue
			case !t.full && t.rev < r.rev:
				b.ready = nil // stale repair: the next digest asks again
				continue
			case b.pendByPrev[t.rev] == nil || !b.pendByPrev[t.rev].complete():
				// Nothing follows it yet: apply it at its own revision
				// now rather than wait for the master's next change.
				r.applyTarget(t, true)
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
			pr := b.pendByPrev[cur]
			// A revision follows ours only if it follows the same
			// history: after a split brain both sides have numbers
			// alike that mean different tables.
			if pr == nil || !pr.complete() || (cur != 0 && !epochsAgree(pr.prevEpoch, curEpoch)) {
				break
			}
			curEpoch = pr.epoch
			if rep == nil && b.ready != nil && pr.rev > b.ready.rev {
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
	r.committed(a)
	// Nothing changed, the store kept its revision: the digest still
	// describes the table, so follow the master's number.
	r.rev = max(r.rev, last)
	if rep != nil {
		r.appliedTarget(rep)
	}
	for _, pr := range chain {
		r.noteEpoch(pr.epoch, pr.rev)
		r.forget(pr)
		r.c.RevisionsApplied++
	}
	r.c.ChangesApplied += uint64(len(batch))
	r.b.synced = true
	r.gcPending()
	r.noteBehind(r.clk.Now())
	return true
}

// gcPending forgets buffered revisions the table has passed.
func (r *Replicator) gcPending() {
	base := r.base()
	for rev, pr := range r.b.pending {
		if rev <= base {
			r.forget(pr)
		}
	}
}

func (r *Replicator) applyFailed(rev uint64, err error) {
	r.c.ApplyFailures++
	r.lastErr = err.Error()
	r.b.ready = nil
	r.setOOS(fmt.Sprintf("cannot apply revision %d: %v; snapshot requested", rev, err))
	r.requestXfer(xSnapshot, allBuckets())
}

// backupReady: see Ready.
func (r *Replicator) backupReady(now time.Time) bool {
	// A backup whose master went silent stays ready: it holds the last
	// table the master had, so it is the right director to take over
	// (the master crashing is exactly when it must win the election).
	// A director that never heard a master is not ready.
	b := &r.b
	lagging := !b.behindSince.IsZero() && now.Sub(b.behindSince) > r.cfg.ReadyMaxLagTime
	return b.synced && (r.oos == "" || b.masterSilent) && b.ready == nil && b.installing == nil && r.in == nil && !b.masterHeard.IsZero() &&
		b.masterRev-min(b.masterRev, r.rev) <= r.cfg.ReadyMaxLag && !lagging
}

// silentReason is the out-of-sync reason while the master is silent;
// Status adds for how long.
const silentReason = "no word from the master"

func (r *Replicator) backupTimers(now time.Time) {
	b := &r.b
	overdue := !b.masterHeard.IsZero() && now.Sub(b.masterHeard) > r.cfg.PeerTimeout
	if overdue && !b.masterSilent && now.Sub(b.deafUntil) <= r.cfg.PeerTimeout {
		// This director was not listening (deafUntil): the master gets
		// a whole timeout from then before it is called silent.
	} else if overdue {
		switch {
		case !b.masterSilent && r.oos == "":
			// The state changes: logged once, then reminded with
			// backoff while it lasts.
			b.masterSilent = true
			r.oos = silentReason
			b.silentEvery = r.cfg.PeerTimeout
			b.silentLogAt = now.Add(b.silentEvery)
			r.log.Warn("no word from the master", "last_heard", b.masterHeard, "silent_for", now.Sub(b.masterHeard).Round(time.Millisecond),
				"master", r.peer.ID, "revision", r.rev)
		case b.masterSilent && !now.Before(b.silentLogAt):
			b.silentEvery = min(2*b.silentEvery, maxSilentLogEvery)
			b.silentLogAt = now.Add(b.silentEvery)
			r.log.Warn("still no word from the master", "silent_for", now.Sub(b.masterHeard).Round(time.Millisecond),
				"master", r.peer.ID, "revision", r.rev)
		}
	} else if b.masterSilent {
		b.masterSilent = false
		r.oos = ""
		r.log.Info("master heard again", "master", r.peer.ID, "master_revision", b.masterRev, "revision", r.rev)
	}
	base := r.base()
	behind := b.masterRev > base || len(b.pending) > 0
	if behind && now.Sub(b.lastNack) >= r.cfg.NackInterval && !b.behindSince.IsZero() && now.Sub(b.behindSince) >= r.cfg.NackInterval {
		r.sendNack(base)
		b.lastNack = now
	}
	if !behind && b.ready == nil && r.in == nil && b.masterRev == r.rev && !b.masterHeard.IsZero() &&
		(b.lastDigest.IsZero() || now.Sub(b.lastDigest) >= r.cfg.DigestInterval) && r.digestReady() {
		r.sendDigest()
		b.lastDigest = now
	}
}

func (r *Replicator) sendNack(from uint64) {
	var w wire.Builder
	w.U64(wire.TFrom, from)
	room := r.cfg.MTU - wire.HeaderLen - wire.TagLen - sessionOverhead - 64
	revs := make([]uint64, 0, len(r.b.pending))
	for rev := range r.b.pending {
		revs = append(revs, rev)
	}
	slices.Sort(revs)
	for _, rev := range revs {
		pr := r.b.pending[rev]
		if len(w.B) > room-64 {
			break
		}
		if pr.complete() {
			w.U64(wire.THave, rev)
			continue
		}
		v := binary.BigEndian.AppendUint64(nil, rev)
		for i, b := range pr.parts {
			if b == nil && len(v) < 4*32 {
				v = binary.BigEndian.AppendUint32(v, uint32(i))
			}
		}
		w.Bytes(wire.TPartial, v)
	}
	r.c.Nacks++
	r.send(wire.MsgNack, w.B)
}

// digestPer is how many buckets' sums one digest message carries.
func (r *Replicator) digestPer() int {
	return (r.cfg.MTU - wire.HeaderLen - wire.TagLen - sessionOverhead - 3*(wire.TLVHead+8) - wire.TLVHead - 2) / 4
}

func (r *Replicator) sendDigest() {
	per := r.digestPer()
	for first := 0; first < NumBuckets; first += per {
		n := min(per, NumBuckets-first)
		var w wire.Builder
		w.U64(wire.TRev, r.rev)
		w.U64(wire.TRevEpoch, r.epochAt(r.rev))
		w.U64(wire.TNodesHash, r.dig.nodes)
		v := binary.BigEndian.AppendUint16(nil, uint16(first))
		for b := first; b < first+n; b++ {
			v = binary.BigEndian.AppendUint32(v, uint32(r.dig.sums[b]))
		}
		w.Bytes(wire.TBuckets, v)
		r.send(wire.MsgDigest, w.B)
	}
}

func (r *Replicator) onVerdict(p *wire.Packet) error {
	f := wire.Fields{P: p}
	f.Need(wire.TRev, wire.TMatch)
	rev, match := f.U64(wire.TRev), f.U8(wire.TMatch)
	if f.Err != nil {
		return f.Err
	}
	if r.role != RoleBackup {
		return nil
	}
	if match == 1 {
		r.c.DigestMatches++
		if rev == r.rev {
			r.lastMatch, r.matchRev = r.clk.Now(), rev
			r.tablesEqual = true
			r.b.synced = true
			// Equal tables at the same revision leave nothing to
			// repair, also after a local write of the same change
			// (LocalWrites keeps the count of those); but a verdict
			// speaks for its message's buckets only, so a local
			// write is cleared only when one message carries them
			// all (the default MTU).
			whole := r.digestPer() >= NumBuckets
			if strings.HasPrefix(r.oos, digestReason) || whole && strings.HasPrefix(r.oos, localWriteReason) {
				r.oos = ""
			}
		}
		return nil
	}
	var bad bucketSet
	copy(bad[:], f.Get(wire.TBitmap))
	r.c.DigestMismatches++
	r.tablesEqual = false
	r.setOOS(fmt.Sprintf("%s at revision %d differs from the master's in %d bucket(s); repair under way", digestReason, rev, bad.count()))
	return nil
}
