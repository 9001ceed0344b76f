package replication

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/store"
)

// Role is the director's VRRP role, set from outside (keepalived's notify).
type Role uint8

// Roles.
const (
	RoleBackup Role = iota
	RoleMaster
	RoleFault
)

var roleNames = [...]string{"backup", "master", "fault"}

// String returns "backup", "master" or "fault".
func (r Role) String() string {
	if int(r) < len(roleNames) {
		return roleNames[r]
	}
	return fmt.Sprintf("Role(%d)", uint8(r))
}

// MarshalText makes a role read as its name in JSON status.
func (r Role) MarshalText() ([]byte, error) { return []byte(r.String()), nil }

// UnmarshalText parses the role's name, for API clients.
func (r *Role) UnmarshalText(b []byte) error {
	v, err := ParseRole(string(b))
	*r = v
	return err
}

// ParseRole parses "master", "backup" or "fault".
func ParseRole(s string) (Role, error) {
	for i, n := range roleNames {
		if n == s {
			return Role(i), nil
		}
	}
	return 0, fmt.Errorf("unknown role %q (want master, backup or fault)", s)
}

// SyncState says whether this director's table is known to equal the
// master's.
type SyncState uint8

// Sync states.
const (
	// StateSyncing: catching up (snapshot in progress, or behind).
	StateSyncing SyncState = iota
	// StateInSync: at the master's revision, nothing pending.
	StateInSync
	// StateOutOfSync: something could not be delivered or applied, or
	// the tables are proven different; Status.Reason says what.
	StateOutOfSync
)

var stateNames = [...]string{"syncing", "in-sync", "out-of-sync"}

// String returns "syncing", "in-sync" or "out-of-sync".
func (s SyncState) String() string {
	if int(s) < len(stateNames) {
		return stateNames[s]
	}
	return fmt.Sprintf("SyncState(%d)", uint8(s))
}

// MarshalText makes a state read as its name in JSON status.
func (s SyncState) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// UnmarshalText parses the state's name, for API clients.
func (s *SyncState) UnmarshalText(b []byte) error {
	for v := SyncState(0); v < 8; v++ {
		if v.String() == string(b) {
			*s = v
			return nil
		}
	}
	return fmt.Errorf("unknown sync state %q", b)
}

// Config configures a Replicator. Zero durations and sizes take defaults.
type Config struct {
	// ID names this director on the wire; the two of a pair differ and
	// neither is zero.
	ID uint32
	// Key is the shared secret (at least 16 bytes).
	Key []byte
	// Store is this director's store; on a backup only the replicator
	// writes it.
	Store *store.Store
	// Transport carries the datagrams.
	Transport Transport
	// Clock drives every timer (nil: the real clock).
	Clock Clock
	// MTU bounds a datagram (0: the transport's).
	MTU int
	// Epoch is the epoch to start from, as persisted by the caller
	// (the replicator raises it above any epoch it sees).
	Epoch uint64
	// StatePath, when set, is a small file where the epoch and the epoch
	// history are kept across restarts (next to the store, say). Without
	// it a restarted director's history is unknown: a lagging peer is
	// then told from a diverged one by the digests alone.
	StatePath string

	// WindowChanges bounds the master's resend window (0: 65536 changes);
	// older revisions are sent by snapshot.
	WindowChanges int
	// ResendBudget bounds the datagrams one NACK makes the master resend
	// (0: 1024), so a far-behind backup does not flood the link.
	ResendBudget int
	// MaxPendingBytes bounds what a backup buffers ahead of its applied
	// revision (0: 64 MiB); beyond it datagrams are dropped and NACKed
	// later.
	MaxPendingBytes int
	// MaxApplyChanges bounds the changes one backup commit coalesces
	// (0: 200,000).
	MaxApplyChanges int
	// SnapshotRate paces transfers in bytes per second (0: 64 MiB/s), so
	// live traffic keeps flowing during a snapshot.
	SnapshotRate int

	StatusInterval time.Duration // 0: 100ms
	NackInterval   time.Duration // 0: 20ms
	DigestInterval time.Duration // 0: 2s
	XferIdle       time.Duration // 0: 50ms: receiver asks for missing chunks after this silence
	PeerTimeout    time.Duration // 0: 3s
	// ReadyMaxLag is the most revisions a ready backup may lag (0: 100),
	// and ReadyMaxLagTime how long it may stay behind (0: 1s).
	ReadyMaxLag     uint64
	ReadyMaxLagTime time.Duration

	// Logf, when set, receives notable events.
	Logf func(format string, args ...any)
	// OnConflict, when set, receives the report of every split-brain
	// merge. It runs with the replicator's lock held: hand it off.
	OnConflict func(MergeReport)
}

func (c *Config) defaults() error {
	if c.ID == 0 {
		return errors.New("replication config: director id is zero")
	}
	if len(c.Key) < 16 {
		return fmt.Errorf("replication config: key of %d bytes, need at least 16", len(c.Key))
	}
	if c.Store == nil || c.Transport == nil {
		return errors.New("replication config: store and transport are required")
	}
	if c.Clock == nil {
		c.Clock = realClock{}
	}
	if c.MTU == 0 {
		c.MTU = c.Transport.MTU()
	}
	if c.MTU < 576 {
		return fmt.Errorf("replication config: MTU %d below 576", c.MTU)
	}
	def := func(v *int, d int) {
		if *v <= 0 {
			*v = d
		}
	}
	def(&c.WindowChanges, 65536)
	def(&c.ResendBudget, 1024)
	def(&c.MaxPendingBytes, 64<<20)
	def(&c.MaxApplyChanges, 200_000)
	def(&c.SnapshotRate, 64<<20)
	dur := func(v *time.Duration, d time.Duration) {
		if *v <= 0 {
			*v = d
		}
	}
	dur(&c.StatusInterval, 100*time.Millisecond)
	dur(&c.NackInterval, 20*time.Millisecond)
	dur(&c.DigestInterval, 2*time.Second)
	dur(&c.XferIdle, 50*time.Millisecond)
	dur(&c.PeerTimeout, 3*time.Second)
	dur(&c.ReadyMaxLagTime, time.Second)
	if c.ReadyMaxLag == 0 {
		c.ReadyMaxLag = 100
	}
	return nil
}

// Counters count what the replicator did and refused.
type Counters struct {
	DatagramsSent     uint64 `json:"datagrams_sent"`
	DatagramsReceived uint64 `json:"datagrams_received"`
	SendErrors        uint64 `json:"send_errors"`
	AuthFailures      uint64 `json:"auth_failures"`
	Replays           uint64 `json:"replays"`
	BadVersion        uint64 `json:"bad_version"`
	Malformed         uint64 `json:"malformed"`
	Resends           uint64 `json:"resends"`
	Nacks             uint64 `json:"nacks"`
	PendingDropped    uint64 `json:"pending_dropped"`
	SnapshotsSent     uint64 `json:"snapshots_sent"`
	SnapshotsApplied  uint64 `json:"snapshots_applied"`
	RepairsSent       uint64 `json:"repairs_sent"`
	RepairsApplied    uint64 `json:"repairs_applied"`
	BucketsRepaired   uint64 `json:"buckets_repaired"`
	DigestMatches     uint64 `json:"digest_matches"`
	DigestMismatches  uint64 `json:"digest_mismatches"`
	Merges            uint64 `json:"merges"`
	Conflicts         uint64 `json:"conflicts"`
	LocalWrites       uint64 `json:"local_writes_on_backup"`
	ApplyFailures     uint64 `json:"apply_failures"`
	RevisionsApplied  uint64 `json:"revisions_applied"`
	ChangesApplied    uint64 `json:"changes_applied"`
}

// PeerStatus is what this director knows of the other one.
type PeerStatus struct {
	ID        uint32    `json:"id"`
	Role      Role      `json:"role"`
	Epoch     uint64    `json:"epoch"`
	Revision  uint64    `json:"revision"`
	LastHeard time.Time `json:"last_heard"`
	Alive     bool      `json:"alive"`
}

// Status is a report for `tunneldirector status`.
type Status struct {
	ID       uint32     `json:"id"`
	Role     Role       `json:"role"`
	Epoch    uint64     `json:"epoch"`
	Revision uint64     `json:"revision"`
	Peer     PeerStatus `json:"peer"`
	// MasterRevision is the master's revision as last heard (on the
	// master: its own).
	MasterRevision uint64 `json:"master_revision"`
	// LagRevisions and LagSeconds: how far the backup is behind (on the
	// master: how far its peer is).
	LagRevisions uint64    `json:"lag_revisions"`
	LagSeconds   float64   `json:"lag_seconds"`
	State        SyncState `json:"state"`
	Reason       string    `json:"reason,omitempty"`
	// TablesEqual is true when the last digest exchange proved both
	// tables equal at LastMatchRevision and nothing changed since.
	TablesEqual       bool      `json:"tables_equal"`
	LastDigestMatch   time.Time `json:"last_digest_match"`
	LastMatchRevision uint64    `json:"last_match_revision"`
	Ready             bool      `json:"ready"`
	Counters          Counters  `json:"counters"`
}

type epochStart struct{ epoch, first uint64 }

type queued struct{ a *affinity.Applied }

// Replicator keeps a backup's store equal to the master's. One runs on
// each director of a pair; SetRole tells it which it is.
type Replicator struct {
	// masterSilent marks the out-of-sync reason "no word from the
	// master": the table is still the master's last, so still ready.
	masterSilent bool

	cfg   Config
	st    *store.Store
	tr    Transport
	clk   Clock
	codec *codec
	bld   builder

	qmu   sync.Mutex
	queue []queued
	wake  chan struct{}

	mu      sync.Mutex
	role    Role
	epoch   uint64
	history []epochStart // epoch that wrote each revision range, ascending
	seq     uint64
	replay  replayTable
	rev     uint64 // revision the digest describes
	dig     *digest
	ring    []digestAt
	c       Counters
	lastErr string

	peer        PeerStatus
	lastStatus  time.Time
	lastMatch   time.Time
	matchRev    uint64
	tablesEqual bool

	// master
	window        []*winEntry
	winByPrev     map[uint64]*winEntry
	windowChanges int
	peerBehind    time.Time
	merged        [2]uint64 // (rev, epoch) of the backup history merged last
	pullAsked     time.Time
	pullFor       [2]uint64
	deliveredAt   time.Time // last snapshot the backup confirmed

	// backup
	masterRev   uint64
	masterEpoch uint64
	masterHeard time.Time
	behindSince time.Time
	pending     map[uint64]*pendRev
	pendByPrev  map[uint64]*pendRev
	pendBytes   int
	ready       *target // a complete snapshot or repair waiting to be applied
	synced      bool
	oos         string // out-of-sync reason
	lastNack    time.Time
	lastDigest  time.Time
	lastXReq    time.Time

	out *outXfer
	in  *inXfer

	conflicts []MergeReport
	lastInID  uint64

	// testDrop, set by tests only, loses changes before they are applied,
	// to make a backup diverge for anti-entropy to find.
	testDrop func(rev uint64, cs []affinity.Change) []affinity.Change
}

// New returns a replicator in the backup role. It subscribes to the
// store's commits at once; call Run (or, in tests, HandleDatagram and Tick)
// to make it work.
func New(cfg Config) (*Replicator, error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	r := &Replicator{
		cfg: cfg, st: cfg.Store, tr: cfg.Transport, clk: cfg.Clock,
		codec: newCodec(cfg.Key), wake: make(chan struct{}, 1),
		epoch:   cfg.Epoch,
		history: []epochStart{{0, 0}}, // epoch 0: not known

		winByPrev:  make(map[uint64]*winEntry),
		pending:    make(map[uint64]*pendRev),
		pendByPrev: make(map[uint64]*pendRev),
		dig:        newDigest(),
	}
	// A sequence number starting at the boot time keeps a restarted
	// director ahead of its earlier datagrams in the peer's replay window.
	r.seq = uint64(time.Now().UnixNano())
	// Subscribe before reading the table, so no commit falls between.
	r.st.OnCommit(func(a *affinity.Applied) {
		r.qmu.Lock()
		r.queue = append(r.queue, queued{a})
		r.qmu.Unlock()
		select {
		case r.wake <- struct{}{}:
		default:
		}
	})
	snap := r.st.Table().Snapshot()
	for i := range snap.Nodes {
		r.dig.putNode(&snap.Nodes[i])
	}
	for i := range snap.Tunnels {
		r.dig.putTunnel(&snap.Tunnels[i])
	}
	r.rev = snap.Revision
	r.pushRing()
	if err := r.loadState(); err != nil {
		return nil, err
	}
	return r, nil
}

func (r *Replicator) logf(format string, a ...any) {
	if r.cfg.Logf != nil {
		r.cfg.Logf("replication %d: "+format, append([]any{r.cfg.ID}, a...)...)
	}
}

func (r *Replicator) pushRing() {
	const ringLen = 256
	d := digestAt{rev: r.rev, nodes: r.dig.nodes, sums: r.dig.sums}
	if n := len(r.ring); n > 0 && r.ring[n-1].rev == r.rev {
		r.ring[n-1] = d
		return
	}
	if len(r.ring) >= ringLen {
		copy(r.ring, r.ring[1:])
		r.ring = r.ring[:ringLen-1]
	}
	r.ring = append(r.ring, d)
}

func (r *Replicator) ringAt(rev uint64) *digestAt {
	for i := len(r.ring) - 1; i >= 0; i-- {
		if r.ring[i].rev == rev {
			return &r.ring[i]
		}
	}
	return nil
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

// persisted is the state file: the epoch and the epoch history, so that
// a restarted director still tells a lagging peer from a diverged one.
type persisted struct {
	Epoch   uint64      `json:"epoch"`
	History [][2]uint64 `json:"history"` // (epoch, first revision)
}

func (r *Replicator) saveState() {
	if r.cfg.StatePath == "" {
		return
	}
	s := persisted{Epoch: r.epoch}
	for _, h := range r.history {
		s.History = append(s.History, [2]uint64{h.epoch, h.first})
	}
	b, _ := json.Marshal(s)
	tmp := r.cfg.StatePath + ".tmp"
	err := os.WriteFile(tmp, b, 0o600)
	if err == nil {
		err = os.Rename(tmp, r.cfg.StatePath)
	}
	if err != nil {
		r.lastErr = fmt.Sprintf("save replication state %s: %v", r.cfg.StatePath, err)
		r.logf("%s", r.lastErr)
	}
}

func (r *Replicator) loadState() error {
	if r.cfg.StatePath == "" {
		return nil
	}
	b, err := os.ReadFile(r.cfg.StatePath)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("load replication state: %w", err)
	}
	var s persisted
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("load replication state %s: %w", r.cfg.StatePath, err)
	}
	r.epoch = max(r.epoch, s.Epoch)
	r.history = r.history[:0]
	for _, h := range s.History {
		if h[1] <= r.rev {
			r.history = append(r.history, epochStart{h[0], h[1]})
		}
	}
	if len(r.history) == 0 {
		r.history = []epochStart{{0, 0}}
	}
	return nil
}

// drain takes the store's commits in order: the digest follows each, and
// on the master each is streamed to the backup. mine is the batch the
// replicator itself just committed, if any.
func (r *Replicator) drain(mine *affinity.Applied) {
	r.qmu.Lock()
	q := r.queue
	r.queue = nil
	r.qmu.Unlock()
	for _, it := range q {
		a := it.a
		if a.Revision <= r.rev && a != mine {
			continue // already in the digest built at start
		}
		prev := r.rev
		r.dig.apply(a.Changes)
		r.rev = a.Revision
		r.pushRing()
		r.tablesEqual = false
		switch {
		case r.role == RoleMaster:
			r.stream(a, prev)
		case a != mine:
			r.c.LocalWrites++
			r.setOOS(fmt.Sprintf("store written locally at revision %d while %s: writes belong on the master", a.Revision, r.role))
		}
	}
}

func (r *Replicator) setOOS(reason string) {
	if r.oos != reason {
		r.logf("out of sync: %s", reason)
	}
	r.oos = reason
}

// send seals a body under a fresh sequence number and sends it.
func (r *Replicator) send(t MsgType, body []byte) {
	r.seq++
	r.bld.start(r.bld.b, Header{Type: t, Sender: r.cfg.ID, Epoch: r.epoch, Seq: r.seq})
	r.bld.raw(body)
	out := r.bld.seal(r.codec)
	if err := r.tr.Send(out); err != nil {
		r.c.SendErrors++
		r.lastErr = err.Error()
		return
	}
	r.c.DatagramsSent++
}

// SetRole switches the role. Becoming master raises the epoch above every
// epoch seen, so the pair can tell the two masters of a split brain apart.
func (r *Replicator) SetRole(role Role) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.drain(nil)
	if role == r.role {
		return
	}
	r.logf("role %s -> %s at revision %d", r.role, role, r.rev)
	old := r.role
	r.role = role
	r.window, r.windowChanges = nil, 0
	clear(r.winByPrev)
	r.out = nil
	r.in = nil
	r.dropPending()
	r.ready = nil
	switch role {
	case RoleMaster:
		r.epoch = max(r.epoch, r.peer.Epoch, r.masterEpoch) + 1
		r.noteEpoch(r.epoch, r.rev+1)
		r.saveState()
		r.oos = ""
		r.synced = true
	case RoleBackup:
		r.synced = false
		if old == RoleMaster {
			r.oos = ""
		}
	}
	r.lastStatus = time.Time{}
}

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
	r.drain(nil)
	r.c.DatagramsReceived++
	p, err := r.codec.decode(b)
	if err != nil {
		switch {
		case errors.Is(err, ErrVersion):
			r.c.BadVersion++
		case errors.Is(err, ErrAuth):
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
	if !r.replay.check(p.Sender, p.Epoch, p.Seq) {
		r.c.Replays++
		return
	}
	if err := checkCritical(&p, knownTLV); err != nil {
		r.c.Malformed++
		r.lastErr = err.Error()
		return
	}
	if r.peer.ID != 0 && r.peer.ID != p.Sender {
		r.logf("datagram from director %d, peer was %d", p.Sender, r.peer.ID)
	}
	r.peer.ID = p.Sender
	r.peer.Epoch = max(r.peer.Epoch, p.Epoch)
	r.peer.LastHeard = r.clk.Now()
	if err := r.dispatch(&p); err != nil {
		r.c.Malformed++
		r.lastErr = err.Error()
	}
}

func (r *Replicator) dispatch(p *Packet) error {
	switch p.Type {
	case MsgStatus:
		return r.onStatus(p)
	case MsgData:
		return r.onData(p)
	case MsgNack:
		return r.onNack(p)
	case MsgDigest:
		return r.onDigest(p)
	case MsgVerdict:
		return r.onVerdict(p)
	case MsgChunk:
		return r.onChunk(p)
	case MsgXferReq:
		return r.onXferReq(p)
	}
	return nil // a newer director's message type: skipped
}

// Tick runs the timers: status, NACKs, digests, transfer pacing and
// retries. Run calls it every few milliseconds; tests call it after
// stepping a FakeClock.
func (r *Replicator) Tick() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.drain(nil)
	now := r.clk.Now()
	if now.Sub(r.lastStatus) >= r.cfg.StatusInterval {
		r.sendStatus()
		r.lastStatus = now
	}
	if r.role == RoleBackup {
		r.backupTimers(now)
	}
	r.xferTimers(now)
}

// Run receives datagrams and runs the timers until ctx ends.
func (r *Replicator) Run(ctx context.Context) error {
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	recv := r.tr.Recv()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case b, ok := <-recv:
			if !ok {
				return errors.New("replication: transport closed")
			}
			r.HandleDatagram(b)
		case <-r.wake:
			r.Tick()
		case <-tick.C:
			r.Tick()
		}
	}
}

func (r *Replicator) sendStatus() {
	var w builder
	w.u8(tRole, uint8(r.role))
	w.u64(tRev, r.base())
	w.u64(tRevEpoch, r.epochAt(r.base()))
	w.u64(tMasterRev, r.masterRevLocked())
	w.u8(tState, uint8(r.stateLocked()))
	w.u64(tTime, uint64(r.clk.Now().UnixNano()))
	r.send(MsgStatus, w.b)
}

func (r *Replicator) masterRevLocked() uint64 {
	if r.role == RoleMaster {
		return r.rev
	}
	return r.masterRev
}

func (r *Replicator) onStatus(p *Packet) error {
	f := fields{p: p}
	f.need(tRole, tRev)
	role := Role(f.u8(tRole))
	rev := f.u64(tRev)
	revEpoch := f.u64(tRevEpoch)
	if f.err != nil {
		return f.err
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
		r.masterHeard = now
		r.masterRev = rev
		r.noteBehind(now)
	}
	return nil
}

func (r *Replicator) noteBehind(now time.Time) {
	if r.masterRev > r.rev || r.ready != nil {
		if r.behindSince.IsZero() {
			r.behindSince = now
		}
	} else {
		r.behindSince = time.Time{}
	}
}

// masterSeesBackup decides how the backup catches up: live stream, NACKs,
// a snapshot, or (when its history is not a prefix of ours) a merge.
func (r *Replicator) masterSeesBackup(rb, eb uint64, now time.Time) {
	if rb >= r.rev {
		r.peerBehind = time.Time{}
	} else if r.peerBehind.IsZero() {
		r.peerBehind = now
	}
	prefix := rb == 0 || (rb <= r.rev && epochsAgree(r.epochAt(rb), eb))
	if !prefix && r.merged != [2]uint64{rb, eb} {
		r.askPull(rb, eb, now)
		return
	}
	if rb == r.rev && prefix {
		return
	}
	if !prefix || r.winByPrev[rb] == nil {
		r.startOut(xSnapshot, allBuckets(), "backup at revision "+fmt.Sprint(rb)+" is outside the resend window")
	}
}

// Ready reports whether this director may win a VRRP election: a master
// always; a backup once it holds the master's table (a snapshot or the
// stream brought it there), lags at most ReadyMaxLag revisions, hears
// the master, and knows of nothing undelivered.
func (r *Replicator) Ready() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.drain(nil)
	return r.readyLocked()
}

func (r *Replicator) readyLocked() bool {
	switch r.role {
	case RoleMaster:
		return true
	case RoleFault:
		return false
	}
	// A backup whose master went silent stays ready: it holds the last
	// table the master had, so it is the right director to take over
	// (the master crashing is exactly when it must win the election).
	// A director that never heard a master is not ready.
	now := r.clk.Now()
	lagging := !r.behindSince.IsZero() && now.Sub(r.behindSince) > r.cfg.ReadyMaxLagTime
	return r.synced && (r.oos == "" || r.masterSilent) && r.ready == nil && r.in == nil && !r.masterHeard.IsZero() &&
		r.masterRev-min(r.masterRev, r.rev) <= r.cfg.ReadyMaxLag && !lagging
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
	if !r.synced || r.ready != nil || r.in != nil || r.masterRev > r.rev || r.masterHeard.IsZero() {
		return StateSyncing
	}
	return StateInSync
}

// Status reports the replicator's view of the pair.
func (r *Replicator) Status() Status {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.drain(nil)
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
		if !r.peerBehind.IsZero() {
			s.LagSeconds = now.Sub(r.peerBehind).Seconds()
		}
	default:
		if r.masterRev > r.rev {
			s.LagRevisions = r.masterRev - r.rev
		}
		if !r.behindSince.IsZero() {
			s.LagSeconds = now.Sub(r.behindSince).Seconds()
		}
	}
	if s.State == StateSyncing && s.Reason == "" {
		switch {
		case r.role == RoleBackup && r.masterHeard.IsZero():
			s.Reason = "no master heard yet"
		case r.in != nil:
			s.Reason = fmt.Sprintf("receiving %s at revision %d: %d of %d chunks", r.in.kind, r.in.rev, r.in.got, r.in.n)
		case r.ready != nil:
			s.Reason = fmt.Sprintf("%s at revision %d waits for the master's next revision", r.ready.kind, r.ready.rev)
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
