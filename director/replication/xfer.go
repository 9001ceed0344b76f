package replication

import (
	"encoding/binary"
	"fmt"
	"maps"
	"slices"
	"time"

	"github.com/tunneldirector/tunneldirector/affinity"
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
const chunkOverhead = HeaderLen + TagLen + 4*(tlvHead+8) + tlvHead + 1 + 2*(tlvHead+4) + tlvHead + 32 + tlvHead

const maxChunks = 1 << 20

// Blob records of a transfer: kind byte, uvarint length, record.
const (
	recNode    = 1
	recTunnel  = 2
	recHistory = 3
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
	for len(b) > 0 {
		kind := b[0]
		n, k := binary.Uvarint(b[1:])
		if k <= 0 || n > uint64(len(b)-1-k) {
			return fmt.Errorf("%w: transfer record truncated", ErrMalformed)
		}
		v := b[1+k : 1+k+int(n)]
		b = b[1+k+int(n):]
		switch kind {
		case recHistory:
			if len(v) != 16 {
				return fmt.Errorf("%w: history record of %d bytes", ErrMalformed, len(v))
			}
			t.history = append(t.history, epochStart{binary.BigEndian.Uint64(v), binary.BigEndian.Uint64(v[8:])})
		case recNode:
			nd, err := affinity.UnmarshalNode(v)
			if err != nil {
				return fmt.Errorf("transfer node: %w", err)
			}
			t.nodes = append(t.nodes, nd)
		case recTunnel:
			tu, err := affinity.UnmarshalTunnel(v)
			if err != nil {
				return fmt.Errorf("transfer tunnel: %w", err)
			}
			if !t.full && !t.buckets.has(bucketOf(tu.ID)) {
				return fmt.Errorf("%w: repair carries tunnel %s outside its buckets", ErrMalformed, tu.ID)
			}
			t.tunnels = append(t.tunnels, tu)
		default:
			// A newer director's record: skipped.
		}
	}
	return nil
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
	if kind == xSnapshot && !r.deliveredAt.IsZero() && now.Sub(r.deliveredAt) < 4*r.cfg.StatusInterval {
		return // the backup's word predates the snapshot it just took
	}
	full := kind != xRepair
	blob, rev := encodeTarget(r.history, r.st.Table(), buckets, full)
	room := r.cfg.MTU - chunkOverhead
	n := max(1, (len(blob)+room-1)/room)
	r.seq++
	o := &outXfer{id: r.seq, kind: kind, rev: rev, revEpoch: r.epochAt(rev), buckets: buckets,
		blob: blob, room: room, n: n, queued: make([]bool, n), refill: now, lastHeard: now, started: now}
	for i := range n {
		o.enqueue(uint32(i))
	}
	r.out = o
	r.logf("%s %d to director %d: revision %d, %d bytes in %d chunks (%s)", kind, o.id, r.peer.ID, o.rev, len(blob), n, why)
	r.pumpOut(now)
}

func (r *Replicator) sendChunk(o *outXfer, i uint32) {
	var w builder
	w.u64(tXferID, o.id)
	w.u8(tKind, uint8(o.kind))
	w.u64(tRev, o.rev)
	w.u64(tRevEpoch, o.revEpoch)
	w.u32(tChunk, i)
	w.u32(tChunks, uint32(o.n))
	w.bytes(tBitmap, o.buckets[:])
	w.bytes(tBlob, o.blob[int(i)*o.room:min(len(o.blob), (int(i)+1)*o.room)])
	r.send(MsgChunk, w.b)
}

// pumpOut sends queued chunks as far as the rate allows. The burst is
// 10 ms of the rate, so live datagrams interleave with a snapshot.
func (r *Replicator) pumpOut(now time.Time) {
	o := r.out
	if o == nil {
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

func (r *Replicator) onChunk(p *Packet) error {
	f := fields{p: p}
	f.need(tXferID, tKind, tRev, tChunk, tChunks, tBitmap, tBlob)
	id, kind := f.u64(tXferID), xferKind(f.u8(tKind))
	rev, revEpoch := f.u64(tRev), f.u64(tRevEpoch)
	i, n := f.u32(tChunk), f.u32(tChunks)
	bm, blob := f.get(tBitmap), f.get(tBlob)
	if f.err != nil {
		return f.err
	}
	if n == 0 || n > maxChunks || i >= n || len(bm) != len(bucketSet{}) {
		return fmt.Errorf("%w: chunk %d of %d", ErrMalformed, i, n)
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
	r.ready = t
	r.noteBehind(now)
	r.tryApply()
	return nil
}

// sendXferReq asks for a transfer (id 0) or for the chunks of one still
// missing; no ranges means the transfer is complete.
func (r *Replicator) sendXferReq(id uint64, kind xferKind, buckets *bucketSet, missing [][2]uint32) {
	var w builder
	w.u64(tXferID, id)
	w.u8(tKind, uint8(kind))
	if buckets != nil {
		w.bytes(tBitmap, buckets[:])
	}
	for _, m := range missing {
		w.bytes(tRange, binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint32(nil, m[0]), m[1]))
	}
	r.send(MsgXferReq, w.b)
}

// requestXfer asks the master for a snapshot or repair, at most once per
// XferIdle.
func (r *Replicator) requestXfer(kind xferKind, buckets bucketSet) {
	now := r.clk.Now()
	if !r.lastXReq.IsZero() && now.Sub(r.lastXReq) < r.cfg.XferIdle {
		return
	}
	r.lastXReq = now
	r.sendXferReq(0, kind, &buckets, nil)
}

func (r *Replicator) askPull(rb, eb uint64, now time.Time) {
	if r.in != nil && r.in.kind == xPull {
		return
	}
	if r.pullFor == [2]uint64{rb, eb} && now.Sub(r.pullAsked) < 4*r.cfg.XferIdle {
		return
	}
	r.pullFor, r.pullAsked = [2]uint64{rb, eb}, now
	r.logf("backup at revision %d (epoch %d) is not on this master's history: pulling its table to merge", rb, eb)
	all := allBuckets()
	r.sendXferReq(0, xPull, &all, nil)
}

func (r *Replicator) onXferReq(p *Packet) error {
	f := fields{p: p}
	f.need(tXferID, tKind)
	id, kind := f.u64(tXferID), xferKind(f.u8(tKind))
	if f.err != nil {
		return f.err
	}
	var ranges [][2]uint32
	for _, v := range p.Fields {
		if v.Type == tRange {
			if len(v.Value) != 8 {
				return fmt.Errorf("%w: range of %d bytes", ErrMalformed, len(v.Value))
			}
			ranges = append(ranges, [2]uint32{binary.BigEndian.Uint32(v.Value), binary.BigEndian.Uint32(v.Value[4:])})
		}
	}
	now := r.clk.Now()
	if id == 0 {
		var bs bucketSet
		copy(bs[:], f.get(tBitmap))
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
		r.logf("%s %d delivered in %s", o.kind, o.id, now.Sub(o.started).Round(time.Millisecond))
		r.out = nil
		if o.kind == xSnapshot {
			r.deliveredAt = now
		}
		return nil
	}
	for _, rg := range ranges {
		for i := rg[0]; i < rg[1] && int(i) < o.n; i++ {
			o.enqueue(i)
		}
	}
	r.pumpOut(now)
	return nil
}

func (r *Replicator) xferTimers(now time.Time) {
	if o := r.out; o != nil {
		r.pumpOut(now)
		idle := now.Sub(o.lastHeard)
		switch {
		case idle > 10*r.cfg.PeerTimeout:
			r.logf("%s %d abandoned: receiver silent for %s", o.kind, o.id, idle)
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

// targetOps turns a snapshot or repair into resolved changes that make the
// table's nodes, and its tunnels in the target's buckets, equal to the
// target. Deletes come first so that puts never meet an outdated peer,
// subnet, mark or address; a tunnel that differs only in its times or
// revision is deleted and put again, since a put of equal content would
// be dropped as a no-op and keep the old revision.
func (r *Replicator) targetOps(t *target) []affinity.Change {
	tab := r.st.Table()
	var cur []affinity.Tunnel
	if t.full {
		cur = tab.Tunnels()
	} else {
		cur = tab.Filter(func(tu *affinity.Tunnel) bool { return t.buckets.has(bucketOf(tu.ID)) })
	}
	curNodes := map[string]affinity.Node{}
	for _, n := range tab.Nodes() {
		curNodes[n.Name] = n
	}
	wantNodes := map[string]affinity.Node{}
	for _, n := range t.nodes {
		wantNodes[n.Name] = n
	}
	want := make(map[string]*affinity.Tunnel, len(t.tunnels))
	for i := range t.tunnels {
		want[t.tunnels[i].ID] = &t.tunnels[i]
	}
	recreate := map[string]bool{}
	for name, c := range curNodes {
		if w, ok := wantNodes[name]; !ok || w.Mark != c.Mark || w.Addr != c.Addr {
			recreate[name] = true
		}
	}
	var ops, puts []affinity.Change
	keep := map[string]bool{}
	slices.SortFunc(cur, func(a, b affinity.Tunnel) int { return compareStr(a.ID, b.ID) })
	for i := range cur {
		c := &cur[i]
		if w := want[c.ID]; w != nil && !recreate[c.Node] && equalTunnel(c, w) {
			keep[c.ID] = true
			continue
		}
		ops = append(ops, affinity.Change{Kind: affinity.DeleteTunnel, Name: c.ID, Reason: "replication: " + t.kind.String()})
	}
	for _, name := range slices.Sorted(maps.Keys(recreate)) {
		ops = append(ops, affinity.Change{Kind: affinity.DeleteNode, Name: name, Reason: "replication: " + t.kind.String()})
	}
	needs := map[string]bool{}
	for i := range t.tunnels {
		w := &t.tunnels[i]
		if keep[w.ID] {
			continue
		}
		needs[w.Node] = true
		puts = append(puts, affinity.Change{Kind: affinity.PutTunnel, Tunnel: w, Reason: "replication: " + t.kind.String()})
	}
	var finals []affinity.Change
	for _, name := range slices.Sorted(maps.Keys(wantNodes)) {
		w := wantNodes[name]
		if c, ok := curNodes[name]; ok && !recreate[name] && c == w {
			continue
		}
		n := w
		if n.State == affinity.NodeDown && needs[name] {
			// A new tunnel may not be placed on a down node, even when
			// replaying: put the node up, its tunnels, then down again.
			n.State = affinity.NodeDraining
			fin := w
			finals = append(finals, affinity.Change{Kind: affinity.PutNode, Node: &fin, Reason: "replication"})
		}
		ops = append(ops, affinity.Change{Kind: affinity.PutNode, Node: &n, Reason: "replication: " + t.kind.String()})
	}
	ops = append(ops, puts...)
	return append(ops, finals...)
}

func compareStr(a, b string) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

func equalTunnel(a, b *affinity.Tunnel) bool {
	return a.ID == b.ID && a.Peer == b.Peer && a.Node == b.Node && a.Pinned == b.Pinned &&
		a.Comment == b.Comment && slices.Equal(a.Subnets, b.Subnets) && a.Revision == b.Revision &&
		a.Created.Equal(b.Created) && a.Updated.Equal(b.Updated)
}

// applyTarget applies a snapshot above the table's revision on its own.
func (r *Replicator) applyTarget(t *target) {
	ops := r.targetOps(t)
	a, err := r.st.CommitAt(t.rev, ops)
	if err != nil {
		r.applyFailed(t.rev, err)
		return
	}
	r.drain(a)
	if r.rev < t.rev {
		r.rev = t.rev // nothing differed: follow the master's number
		r.pushRing()
	}
	r.c.ChangesApplied += uint64(len(a.Changes))
	r.appliedTarget(t)
	r.gcPending()
	r.noteBehind(r.clk.Now())
}

// applyTargetReset applies a snapshot or repair at or below the table's
// revision: the store ends at exactly the target's revision, and the
// digests of revisions above it, which belonged to a history the master
// does not share, are dropped.
func (r *Replicator) applyTargetReset(t *target) {
	ops := r.targetOps(t)
	a, err := r.st.CommitReset(t.rev, ops)
	if err != nil {
		r.applyFailed(t.rev, err)
		return
	}
	if len(a.Changes) > 0 {
		r.drain(a)
	}
	r.rev = t.rev
	r.ring = slices.DeleteFunc(r.ring, func(d digestAt) bool { return d.rev > t.rev })
	r.pushRing()
	r.c.ChangesApplied += uint64(len(a.Changes))
	r.appliedTarget(t)
	r.gcPending()
	r.noteBehind(r.clk.Now())
}

func (r *Replicator) appliedTarget(t *target) {
	r.ready = nil
	r.synced = true
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
		if len(r.oos) > 6 && r.oos[:6] == "digest" {
			r.oos = ""
		}
	}
	r.logf("%s at revision %d applied; table at revision %d", t.kind, t.rev, r.rev)
	r.lastDigest = time.Time{} // prove it at once
}
