package replication

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/director/replication/wire"
	"github.com/tunneldirector/tunneldirector/internal/clock"
	"github.com/tunneldirector/tunneldirector/store"
)

// Replicator keeps a backup's store equal to the master's. One runs on
// each director of a pair; SetRole tells it which it is. The state every
// role shares lives here; what only a master keeps is in masterSide, what
// only a backup keeps in backupSide, and both are made new on a role
// change, so nothing of one role leaks into the other.
type Replicator struct {
	cfg   Config
	st    *store.Store
	tr    Transport
	clk   clock.Clock
	log   *slog.Logger
	codec *wire.Codec
	bld   wire.Builder

	mu sync.Mutex
	// changes is this replicator's cursor on the store's change log: the
	// digest follows it, and on the master every batch it reads is
	// streamed. own lists the (prev, revision) of batches the replicator
	// committed itself and has not read back yet; any other batch read
	// on a backup is a local write.
	changes store.Cursor
	own     [][2]uint64
	role    Role
	// roleNow mirrors role for IsMaster, which takes no lock.
	roleNow atomic.Int32
	epoch   uint64
	history []epochStart // epoch that wrote each revision range, ascending
	// masterEpoch is the highest epoch a master was heard in: datagrams
	// of a deposed master (a lower epoch) are ignored, whatever the role.
	masterEpoch uint64
	seq         uint64
	// session is random per start: the peer binds every datagram to it
	// (wire.TPeerSession), so datagrams captured before a restart carry
	// another session and are refused. peerSession is the peer's.
	session     uint64
	peerSession uint64
	replay      wire.ReplayTable
	rev         uint64 // revision the digest describes (a backup's follows its master's numbers)
	logAt       uint64 // revision of the last batch read from the change log
	dig         *digest
	c           Counters
	lastErr     string
	oos         string // out-of-sync reason

	peer        PeerStatus
	lastStatus  time.Time
	lastMatch   time.Time
	matchRev    uint64
	tablesEqual bool
	conflicts   []MergeReport

	out      *outXfer // the transfer this director sends
	in       *inXfer  // the transfer it receives
	lastInID uint64

	m masterSide
	b backupSide

	// ct is the conntrack stream's sending side (its own lock), cti its
	// receiving side (under mu).
	ct  *ctOut
	cti ctIn

	// bigWork is the size from which digest updates and snapshot
	// encodes run off the event loop (work.go); dw runs the digest's,
	// and wake tells Run that a worker finished.
	bigWork int
	dw      digestWorker
	wake    chan struct{}
	// ownSnap is a full snapshot this backup is committing, and ownSnapAt
	// the (prev, revision) of its batch: its digest is made from the
	// snapshot on the worker, not change by change.
	ownSnap   *target
	ownSnapAt [2]uint64

	// testDrop, set by tests only, loses changes before they are applied,
	// to make a backup diverge for anti-entropy to find.
	testDrop func(rev uint64, cs []affinity.Change) []affinity.Change
	// testBigWork, set by tests only, runs first in each off-loop worker
	// ("digest" or "encode"): a test holds it to make the work take long.
	testBigWork func(what string)
}

// New returns a replicator in the backup role, following the store's
// change log from its current revision. Call Run (or, in tests,
// HandleDatagram and Tick) to make it work.
func New(cfg Config) (*Replicator, error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	r := &Replicator{
		cfg: cfg, st: cfg.Store, tr: cfg.Transport, clk: cfg.Clock,
		log:     cfg.Logger.With("director", cfg.ID),
		codec:   wire.NewCodec(cfg.Key),
		epoch:   cfg.Epoch,
		history: []epochStart{{0, 0}}, // epoch 0: not known
		b:       newBackupSide(),
		ct:      newCTOut(cfg.CTQueueBytes, cfg.CTWindowBytes),
		bigWork: defaultBigWork,
		wake:    make(chan struct{}, 1),
		dw:      digestWorker{done: make(chan *digest, 1)},
	}
	r.ct.restart()
	var nonce [8]byte
	if _, err := rand.Read(nonce[:]); err != nil {
		return nil, fmt.Errorf("replication: session id: %w", err)
	}
	r.session = binary.BigEndian.Uint64(nonce[:]) | 1
	// A sequence number starting at the boot time keeps a restarted
	// director ahead of its earlier datagrams in the peer's replay window.
	r.seq = uint64(time.Now().UnixNano())
	if err := r.follow(); err != nil {
		return nil, err
	}
	if err := r.loadState(); err != nil {
		return nil, err
	}
	return r, nil
}

// follow builds the digest from the table and opens a cursor at the
// table's revision. The cursor starts where the snapshot was taken, so a
// commit landing between the two is read from the cursor, not lost.
func (r *Replicator) follow() error {
	snap := r.st.Table().Snapshot()
	cur, err := r.st.Changes(snap.Revision)
	if err != nil {
		return fmt.Errorf("replication: follow the store's change log: %w", err)
	}
	if r.changes != nil {
		r.changes.Close()
	}
	r.changes = cur
	// A digest job still running works on the digest being replaced:
	// its result is dropped, and the queued ones followed the old one.
	r.dw.stale = r.dw.busy
	r.dw.queue = nil
	r.ownSnap = nil
	r.dig = newDigest()
	for i := range snap.Nodes {
		r.dig.putNode(&snap.Nodes[i])
	}
	for i := range snap.Tunnels {
		r.dig.putTunnel(&snap.Tunnels[i])
	}
	r.dig.putBuckets(snap.Buckets)
	r.rev, r.logAt = snap.Revision, snap.Revision
	r.own = r.own[:0]
	return nil
}

// Close releases the replicator's cursor on the store.
func (r *Replicator) Close() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.changes.Close()
}

// epochAt says which master epoch wrote a revision, from the history this
// director saw or made.
func (r *Replicator) epochAt(rev uint64) uint64 { return historyEpoch(r.history, rev) }

func historyEpoch(h []epochStart, rev uint64) uint64 {
	e := uint64(0)
	for _, s := range h {
		if s.first > rev {
			break
		}
		e = s.epoch
	}
	return e
}

// epochsAgree compares the epochs two directors give one revision. Epoch
// 0 means the director does not know (it restarted without a state file):
// it is taken to agree, and the digest exchange checks the content.
func epochsAgree(a, b uint64) bool { return a == 0 || b == 0 || a == b }

func (r *Replicator) noteEpoch(epoch, rev uint64) {
	if n := len(r.history); n > 0 && r.history[n-1].epoch == epoch {
		return
	}
	for len(r.history) > 0 && r.history[len(r.history)-1].first >= rev {
		r.history = r.history[:len(r.history)-1]
	}
	r.history = append(r.history, epochStart{epoch, rev})
	if len(r.history) > 64 {
		r.history = r.history[len(r.history)-64:]
	}
	r.saveState()
}

// committed records a batch the replicator committed itself and reads
// the change log up to it.
func (r *Replicator) committed(a *affinity.Applied) {
	if len(a.Changes) > 0 || a.Revision != a.Previous() {
		r.own = append(r.own, [2]uint64{a.Previous(), a.Revision})
	}
	r.drain()
}

// drain reads the store's change log: the digest follows each batch, and
// on the master each is streamed to the backup. A batch the replicator
// did not commit, read on a backup, is a local write.
func (r *Replicator) drain() {
	for {
		b, ok, err := r.changes.Next()
		if errors.Is(err, store.ErrCompacted) {
			// The log moved on past this replicator (more than the
			// journal holds between two reads): start over from the
			// table. On the master, the backup catches up by NACK or
			// snapshot.
			r.log.Warn("replication fell behind the store's change log; digest rebuilt from the table", "err", err)
			if err := r.follow(); err != nil {
				r.lastErr = err.Error()
			}
			return
		}
		if err != nil {
			r.lastErr = err.Error()
			return
		}
		if !ok {
			r.own = r.own[:0]
			return
		}
		// A snapshot committed off the loop (installLater) is ours
		// whenever its batch lands; r.own is emptied each time the log
		// is read to its end, which may happen before it commits.
		snap := r.ownSnap != nil && r.ownSnapAt == [2]uint64{b.Prev, b.Revision}
		mine := snap
		for i, o := range r.own {
			if o == [2]uint64{b.Prev, b.Revision} {
				mine = true
				r.own = append(r.own[:i], r.own[i+1:]...)
				break
			}
		}
		cs, err := b.Decoded()
		if err != nil {
			r.lastErr = err.Error()
			r.log.Error("read the store's change log; digest rebuilt from the table", "err", err)
			if err := r.follow(); err != nil {
				r.lastErr = err.Error()
			}
			return
		}
		if snap {
			t := r.ownSnap
			r.ownSnap = nil
			r.digestLater(func(*digest) *digest { return targetDigest(t) })
		} else {
			r.applyDigest(cs)
		}
		r.rev, r.logAt = b.Revision, b.Revision
		r.tablesEqual = false
		switch {
		case r.role == RoleMaster:
			r.stream(&b)
		case !mine:
			r.c.LocalWrites++
			r.setOOS(fmt.Sprintf("%s at revision %d while %s: writes belong on the master", localWriteReason, b.Revision, r.role))
		}
	}
}

// digestReason begins the out-of-sync reason of a digest that differs from
// the master's; the repair of the buckets ends it (xfer.go), and so does a
// digest match (backup.go).
const digestReason = "digest"

// localWriteReason begins the out-of-sync reason of a backup's own commit.
// A digest match at the backup's revision ends it (backup.go): both
// directors made the same write, as when both were master for a moment.
const localWriteReason = "store written locally"

func (r *Replicator) setOOS(reason string) {
	if r.oos != reason {
		r.log.Warn("out of sync", "reason", reason, "revision", r.rev)
	}
	r.oos = reason
}

// send seals a body under a fresh sequence number, bound to the peer's
// session, and sends it.
func (r *Replicator) send(t wire.MsgType, body []byte) {
	r.seq++
	r.bld.Start(r.bld.B, wire.Header{Type: t, Sender: r.cfg.ID, Epoch: r.epoch, Seq: r.seq})
	r.bld.U64(wire.TSession, r.session)
	r.bld.U64(wire.TPeerSession, r.peerSession)
	r.bld.Raw(body)
	out, err := r.bld.Seal(r.codec)
	if err == nil {
		err = r.tr.Send(out)
	}
	if err != nil {
		r.c.SendErrors++
		r.lastErr = err.Error()
		return
	}
	r.c.DatagramsSent++
}

// sessionOverhead is what the session TLVs add to every datagram.
const sessionOverhead = 2 * (wire.TLVHead + 8)

// SetRole switches the role. Becoming master raises the epoch above every
// epoch seen, so the pair can tell the two masters of a split brain apart.
func (r *Replicator) SetRole(role Role) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.drain()
	if role == r.role {
		return
	}
	r.log.Info("role changed", "from", r.role.String(), "to", role.String(), "revision", r.rev)
	old := r.role
	r.role = role
	r.roleNow.Store(int32(role))
	r.out, r.in = nil, nil
	r.m = masterSide{}
	r.b = newBackupSide()
	r.ct.restart() // a new conntrack stream from a new master
	r.cti = ctIn{}
	switch role {
	case RoleMaster:
		r.epoch = max(r.epoch, r.peer.Epoch, r.masterEpoch) + 1
		r.noteEpoch(r.epoch, r.rev+1)
		r.saveState()
		r.oos = ""
	case RoleBackup:
		if old == RoleMaster {
			r.oos = ""
		}
	}
	r.lastStatus = time.Time{}
}

// IsMaster reports whether the role is master without taking the
// replicator's lock: for checks made under the store's lock, which a
// backup's replicator takes while holding its own (committing its
// master's batches), so asking Role or Status there could deadlock.
func (r *Replicator) IsMaster() bool { return Role(r.roleNow.Load()) == RoleMaster }

// Role returns the current role.
func (r *Replicator) Role() Role {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.role
}

// Epoch returns the current epoch; the caller may persist it and pass it
// back in Config.Epoch after a restart.
func (r *Replicator) Epoch() uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.epoch
}

// HandleDatagram authenticates and processes one received datagram.
func (r *Replicator) HandleDatagram(b []byte) {
	r.mu.Lock()
	defer r.mu.Unlock()
	defer r.noteDeaf(r.clk.Now())
	r.drain()
	r.c.DatagramsReceived++
	p, err := r.codec.Open(b)
	if err != nil {
		switch {
		case errors.Is(err, wire.ErrVersion):
			r.c.BadVersion++
		case errors.Is(err, wire.ErrAuth):
			r.c.AuthFailures++
		default:
			r.c.Malformed++
		}
		r.lastErr = err.Error()
		return
	}
	if p.Sender == r.cfg.ID {
		return // our own, looped back by a multicast group
	}
	f := wire.Fields{P: &p}
	f.Need(wire.TSession, wire.TPeerSession)
	sess, bound := f.U64(wire.TSession), f.U64(wire.TPeerSession)
	if f.Err != nil || sess == 0 {
		r.c.Malformed++
		r.lastErr = fmt.Sprintf("datagram from director %d without a session: %v", p.Sender, f.Err)
		return
	}
	if bound != r.session {
		// Sealed for another start of this director (or before the
		// peer learned this one's session): never processed. The
		// peer's session it carries is authentic, so answer with a
		// status bound to it at the next tick.
		r.c.StaleSession++
		if sess != r.peerSession {
			r.peerSession = sess
			r.lastStatus = time.Time{}
		}
		return
	}
	if !r.replay.Check(p.Sender, p.Epoch, p.Seq) {
		r.c.Replays++
		return
	}
	r.peerSession = sess
	if err := wire.CheckCritical(&p); err != nil {
		r.c.Malformed++
		r.lastErr = err.Error()
		return
	}
	if r.peer.ID != 0 && r.peer.ID != p.Sender {
		r.log.Warn("datagram from another director than the peer", "sender", p.Sender, "peer", r.peer.ID)
	}
	r.peer.ID = p.Sender
	r.peer.Epoch = max(r.peer.Epoch, p.Epoch)
	r.peer.LastHeard = r.clk.Now()
	if err := r.dispatch(&p); err != nil {
		r.c.Malformed++
		r.lastErr = err.Error()
	}
}

func (r *Replicator) dispatch(p *wire.Packet) error {
	switch p.Type {
	case wire.MsgStatus:
		return r.onStatus(p)
	case wire.MsgData:
		return r.onData(p)
	case wire.MsgNack:
		return r.onNack(p)
	case wire.MsgDigest:
		return r.onDigest(p)
	case wire.MsgVerdict:
		return r.onVerdict(p)
	case wire.MsgChunk:
		return r.onChunk(p)
	case wire.MsgXferReq:
		return r.onXferReq(p)
	case wire.MsgCTData:
		return r.onCTData(p)
	case wire.MsgCTNack:
		return r.onCTNack(p)
	case wire.MsgCTResync:
		return r.onCTResync(p)
	}
	return nil // a newer director's message type: skipped
}

// noteDeaf records that the event loop was busy with one datagram (a
// snapshot applied) for longer than a status interval: it heard nothing
// meanwhile, and what the peer sent then may have been lost in a full
// socket buffer, so the peer's silence is counted from the end of the
// work, not from the last datagram heard (backupTimers).
func (r *Replicator) noteDeaf(start time.Time) {
	if now := r.clk.Now(); now.Sub(start) > r.cfg.StatusInterval {
		r.b.deafUntil = now
	}
}

// Tick runs the timers: status, NACKs, digests, transfer pacing and
// retries. Run calls it every few milliseconds; tests call it after
// stepping a clock.Manual.
func (r *Replicator) Tick() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.drain()
	r.digestReady()
	if r.b.installing != nil && r.installed() {
		r.tryApply()
	}
	now := r.clk.Now()
	if now.Sub(r.lastStatus) >= r.cfg.StatusInterval {
		r.sendStatus()
		r.lastStatus = now
	}
	if r.role == RoleBackup {
		r.backupTimers(now)
		r.ctBackupTimers(now)
	}
	r.xferTimers(now)
	r.pumpCT(now)
}

// Run receives datagrams and runs the timers until ctx ends; a commit to
// the store wakes it at once.
func (r *Replicator) Run(ctx context.Context) error {
	tick, tc := r.clk.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	recv := r.tr.Recv()
	for {
		r.mu.Lock()
		committed := r.changes.Notify()
		r.mu.Unlock()
		select {
		case <-ctx.Done():
			return ctx.Err()
		case b, ok := <-recv:
			if !ok {
				return errors.New("replication: transport closed")
			}
			r.HandleDatagram(b)
		case <-committed:
			r.tickAfter(recv)
		case <-r.ct.wake:
			r.tickAfter(recv)
		case <-r.wake:
			r.tickAfter(recv)
		case <-tc:
			r.tickAfter(recv)
		}
	}
}

// tickAfter handles the datagrams already received, then runs the
// timers. After a long piece of work (a snapshot applied) the peer's
// statuses are waiting in the queue: the timers must see them, or they
// would find the peer silent for as long as the work took.
func (r *Replicator) tickAfter(recv <-chan []byte) {
	for range len(recv) {
		b, ok := <-recv
		if !ok {
			break
		}
		r.HandleDatagram(b)
	}
	r.Tick()
}

func (r *Replicator) sendStatus() {
	var w wire.Builder
	w.U8(wire.TRole, uint8(r.role))
	w.U64(wire.TRev, r.base())
	w.U64(wire.TRevEpoch, r.baseEpoch())
	w.U64(wire.TMasterRev, r.masterRevLocked())
	w.U8(wire.TState, uint8(r.stateLocked()))
	w.U64(wire.TTime, uint64(r.clk.Now().UnixNano()))
	r.ctStatusTLVs(&w)
	r.send(wire.MsgStatus, w.B)
}

func (r *Replicator) masterRevLocked() uint64 {
	if r.role == RoleMaster {
		return r.rev
	}
	return r.b.masterRev
}

func (r *Replicator) onStatus(p *wire.Packet) error {
	f := wire.Fields{P: p}
	f.Need(wire.TRole, wire.TRev)
	role := Role(f.U8(wire.TRole))
	rev := f.U64(wire.TRev)
	revEpoch := f.U64(wire.TRevEpoch)
	if f.Err != nil {
		return f.Err
	}
	r.peer.Role, r.peer.Revision = role, rev
	now := r.clk.Now()
	switch {
	case r.role == RoleMaster && role == RoleMaster:
		r.setOOS(fmt.Sprintf("split brain: director %d is master too (epoch %d)", p.Sender, p.Epoch))
	case r.role == RoleMaster && role == RoleBackup:
		if r.oos != "" && len(r.oos) > 11 && r.oos[:11] == "split brain" {
			r.oos = ""
		}
		r.masterSeesBackup(rev, revEpoch, now)
	case r.role == RoleBackup && role == RoleMaster:
		if p.Epoch < r.masterEpoch {
			return nil // a deposed master still talking
		}
		r.masterEpoch = p.Epoch
		r.backupHearsMaster(rev, now)
		r.ctHearsMaster(&f)
	}
	return nil
}

// Ready reports whether this director may win a VRRP election: a master
// always; a backup once it holds the master's table (a snapshot or the
// stream brought it there), lags at most ReadyMaxLag revisions, hears
// the master, and knows of nothing undelivered.
func (r *Replicator) Ready() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.drain()
	return r.readyLocked()
}

func (r *Replicator) readyLocked() bool {
	switch r.role {
	case RoleMaster:
		return true
	case RoleFault:
		return false
	}
	return r.backupReady(r.clk.Now())
}

func (r *Replicator) stateLocked() SyncState {
	if r.oos != "" {
		return StateOutOfSync
	}
	switch r.role {
	case RoleMaster:
		if r.peer.ID != 0 && r.peer.Revision == r.rev {
			return StateInSync
		}
		return StateSyncing
	case RoleFault:
		return StateOutOfSync
	}
	b := &r.b
	if !b.synced || b.ready != nil || b.installing != nil || r.in != nil || b.masterRev > r.rev || b.masterHeard.IsZero() {
		return StateSyncing
	}
	return StateInSync
}

// Status reports the replicator's view of the pair.
func (r *Replicator) Status() Status {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.drain()
	now := r.clk.Now()
	s := Status{
		ID: r.cfg.ID, Role: r.role, Epoch: r.epoch, Revision: r.rev,
		Peer: r.peer, MasterRevision: r.masterRevLocked(),
		State: r.stateLocked(), Reason: r.oos,
		TablesEqual: r.tablesEqual && r.matchRev == r.rev, LastDigestMatch: r.lastMatch, LastMatchRevision: r.matchRev,
		Ready: r.readyLocked(), Counters: r.c,
	}
	s.Peer.Alive = !r.peer.LastHeard.IsZero() && now.Sub(r.peer.LastHeard) < r.cfg.PeerTimeout
	switch r.role {
	case RoleMaster:
		if r.peer.Revision < r.rev {
			s.LagRevisions = r.rev - r.peer.Revision
		}
		if !r.m.peerBehind.IsZero() {
			s.LagSeconds = now.Sub(r.m.peerBehind).Seconds()
		}
	default:
		if r.b.masterRev > r.rev {
			s.LagRevisions = r.b.masterRev - r.rev
		}
		if !r.b.behindSince.IsZero() {
			s.LagSeconds = now.Sub(r.b.behindSince).Seconds()
		}
		if r.b.masterSilent {
			s.Reason = fmt.Sprintf("%s for %s", r.oos, now.Sub(r.b.masterHeard).Round(time.Millisecond))
		}
	}
	if s.State == StateSyncing && s.Reason == "" {
		switch {
		case r.role == RoleBackup && r.b.masterHeard.IsZero():
			s.Reason = "no master heard yet"
		case r.in != nil:
			s.Reason = fmt.Sprintf("receiving %s at revision %d: %d of %d chunks", r.in.kind, r.in.rev, r.in.got, r.in.n)
		case r.b.installing != nil:
			s.Reason = fmt.Sprintf("applying the snapshot at revision %d", r.b.installing.t.rev)
		case r.b.ready != nil:
			s.Reason = fmt.Sprintf("%s at revision %d waits for the master's next revision", r.b.ready.kind, r.b.ready.rev)
		}
	}
	return s
}

// Conflicts returns the reports of the split-brain merges made so far.
func (r *Replicator) Conflicts() []MergeReport {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]MergeReport(nil), r.conflicts...)
}

// LastError returns the last datagram or send error, for diagnostics.
func (r *Replicator) LastError() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.lastErr
}
