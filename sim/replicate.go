package sim

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"time"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/internal/clock"
	"github.com/tunneldirector/tunneldirector/store"
)

// Pair is the two directors and the replication between them. The
// simulator commits only to Master; the pair carries every commit to
// Backup over a lossy link. NewDirectorPair implements it with the
// project's director/replication, NewJournalPair with the simulator's own
// journal-following link.
type Pair interface {
	// Name says which replication carries the table, for the report.
	Name() string
	Master() *store.Store
	Backup() *store.Store
	// Committed tells the pair that the master committed.
	Committed()
	// SetLoss changes the loss rate of the sync link.
	SetLoss(loss float64)
	// Failover makes the backup the master. A switchover first lets the
	// backup catch up over the link and returns how long that took on
	// the virtual clock; a crash loses whatever the backup lacks.
	Failover(mode string) (catchup time.Duration, err error)
	// Stats returns the link's counters.
	Stats() LinkStats
	Close() error
}

// LinkStats are a replication link's counters.
type LinkStats struct {
	Messages    int `json:"messages"`
	Lost        int `json:"lost"`
	Snapshots   int `json:"snapshots"`
	Changes     int `json:"changes"`
	ApplyErrors int `json:"apply_errors"`
	// BackupState is what the backup's replication says of itself at
	// the end (director/replication only).
	BackupState string `json:"backup_state,omitempty"`
}

// journalPair is two stores in a folder and a link that replays the
// master's change log (store.Changes) into the backup with
// store.CommitAt. Batches lost on the link are sent again after the
// retransmission timeout; a backup the log no longer reaches, or one that
// diverged in a crash, gets a snapshot: the master's table, installed as
// the backup table's DiffTo committed at the snapshot's revision.
type journalPair struct {
	dir      string
	stores   [2]*store.Store
	master   int
	opts     store.Options
	clk      clock.Clock
	rng      *rand.Rand
	latency  time.Duration
	rto      time.Duration
	loss     float64
	inflight bool
	gen      int // bumped on failover, so sends of the old direction stop
	resync   bool
	stats    LinkStats
	// applied is told each revision the backup reached, and when.
	applied  func(rev uint64)
	nextPath int
	// snap caches the master's last snapshot: a backup cut off for an
	// hour is offered one every retransmission timeout, and copying the
	// table each time would cost more than the rest of the run.
	snap *affinity.Snapshot
	// last caches the last message collected, for retransmissions of
	// the same revisions.
	last         message
	lastM, lastB uint64
	lastValid    bool
}

// PairOptions configures NewJournalPair.
type PairOptions struct {
	Dir            string
	Table          affinity.Options
	JournalChanges int
	Latency        time.Duration
	Retransmit     time.Duration
	Loss           float64
	Seed           uint64
	// Applied is called when the backup reaches a revision.
	Applied func(rev uint64)
}

// closeStores closes a pair's stores; one not opened yet is nil.
func closeStores(stores [2]*store.Store) error {
	var errs []error
	for _, st := range stores {
		if st != nil {
			errs = append(errs, st.Close())
		}
	}
	return errors.Join(errs...)
}

// NewJournalPair opens two empty stores in o.Dir.
func NewJournalPair(o PairOptions, clk clock.Clock) (Pair, error) {
	p := &journalPair{
		dir: o.Dir, clk: clk, latency: o.Latency, rto: o.Retransmit, loss: o.Loss,
		rng:     rand.New(rand.NewPCG(o.Seed, 0x11c)),
		opts:    store.Options{Table: o.Table, JournalChanges: o.JournalChanges},
		applied: o.Applied,
	}
	for i := range p.stores {
		st, err := p.open()
		if err != nil {
			p.Close()
			return nil, err
		}
		p.stores[i] = st
	}
	return p, nil
}

func (p *journalPair) open() (*store.Store, error) {
	p.nextPath++
	o := p.opts
	o.Path = filepath.Join(p.dir, fmt.Sprintf("director-%d.db", p.nextPath))
	st, err := store.Open(o)
	if err != nil {
		return nil, fmt.Errorf("open simulated director store: %w", err)
	}
	return st, nil
}

func (p *journalPair) Name() string {
	return "sim journal link (store.Changes -> store.CommitAt over a lossy in-memory link; director/replication not used)"
}
func (p *journalPair) Master() *store.Store { return p.stores[p.master] }
func (p *journalPair) Backup() *store.Store { return p.stores[1-p.master] }
func (p *journalPair) SetLoss(l float64)    { p.loss = l }
func (p *journalPair) Stats() LinkStats     { return p.stats }

func (p *journalPair) Close() error { return closeStores(p.stores) }

func (p *journalPair) Committed() {
	if p.inflight {
		return
	}
	p.inflight = true
	gen := p.gen
	p.clk.AfterFunc(0, func() { p.send(gen) })
}

// message is one datagram's worth: batches of the change log, or a
// snapshot.
type message struct {
	entries  []store.Batch
	snapshot *affinity.Snapshot
}

// collect reads what the backup lacks from the master's change log.
func (p *journalPair) collect() (message, error) {
	m, b := p.Master(), p.Backup()
	if p.lastValid && !p.resync && p.lastM == m.Revision() && p.lastB == b.Revision() {
		return p.last, nil
	}
	if p.resync || b.Revision() > m.Revision() {
		return message{snapshot: p.snapshot()}, nil
	}
	var msg message
	cur, err := m.Changes(b.Revision())
	if err == nil {
		msg.entries, err = store.ReadAll(cur)
		cur.Close()
	}
	if errors.Is(err, store.ErrCompacted) {
		return message{snapshot: p.snapshot()}, nil
	}
	if err == nil {
		p.last, p.lastM, p.lastB, p.lastValid = msg, m.Revision(), b.Revision(), true
	}
	return msg, err
}

func (p *journalPair) snapshot() *affinity.Snapshot {
	t := p.Master().Table()
	if p.snap == nil || p.snap.Revision != t.Revision() {
		s := t.Snapshot()
		p.snap = &s
	}
	return p.snap
}

func (p *journalPair) send(gen int) {
	if gen != p.gen {
		return
	}
	msg, err := p.collect()
	if err != nil {
		p.stats.ApplyErrors++
		p.inflight = false
		return
	}
	if msg.snapshot == nil && len(msg.entries) == 0 {
		p.inflight = false
		return
	}
	p.stats.Messages++
	if p.rng.Float64() < p.loss {
		p.stats.Lost++
		p.clk.AfterFunc(p.rto, func() { p.send(gen) })
		return
	}
	p.clk.AfterFunc(p.latency, func() {
		if gen != p.gen {
			return
		}
		p.deliver(msg)
		p.send(gen)
	})
}

// deliver applies a message to the backup.
func (p *journalPair) deliver(msg message) {
	if msg.snapshot != nil {
		if err := p.installSnapshot(msg.snapshot); err != nil {
			p.stats.ApplyErrors++
			return
		}
		p.resync = false
		p.stats.Snapshots++
		if p.applied != nil {
			p.applied(msg.snapshot.Revision)
		}
		return
	}
	b := p.Backup()
	for _, e := range msg.entries {
		if e.Revision <= b.Revision() {
			continue // a retransmission overlapping what arrived
		}
		cs, err := e.Decoded()
		if err == nil {
			_, err = b.CommitAt(e.Revision, cs)
		}
		if err != nil {
			p.stats.ApplyErrors++
			p.resync = true
			return
		}
		p.stats.Changes += len(cs)
		if p.applied != nil {
			p.applied(e.Revision)
		}
	}
}

// installSnapshot makes the backup's table equal to the snapshot: the
// table's DiffTo, committed at the snapshot's revision (keeping marks,
// owners, times and revisions), whatever revision the backup was at.
func (p *journalPair) installSnapshot(s *affinity.Snapshot) error {
	if s.Revision == 0 {
		return nil
	}
	b := p.Backup()
	if _, err := b.CommitReset(s.Revision, b.Table().DiffTo(s, nil)); err != nil {
		return fmt.Errorf("install snapshot at revision %d: %w", s.Revision, err)
	}
	return nil
}

// maxCatchupAttempts bounds a switchover's catch-up on a link that loses
// everything: the backup then takes over behind.
const maxCatchupAttempts = 1000

func (p *journalPair) Failover(mode string) (time.Duration, error) {
	var took time.Duration
	if mode != Crash {
		for range maxCatchupAttempts {
			if !p.resync && p.Backup().Revision() == p.Master().Revision() {
				break
			}
			msg, err := p.collect()
			if err != nil {
				return took, fmt.Errorf("failover: catch up: %w", err)
			}
			p.stats.Messages++
			if p.rng.Float64() < p.loss {
				p.stats.Lost++
				took += p.rto
				continue
			}
			took += p.latency
			p.deliver(msg)
		}
	}
	behind := p.Backup().Revision() != p.Master().Revision()
	p.gen++
	p.inflight = false
	p.snap = nil
	p.lastValid = false
	p.master = 1 - p.master
	// The old master may hold revisions the new one never saw, under
	// numbers the new master will reuse: only a snapshot makes it equal.
	p.resync = behind
	p.Committed()
	return took, nil
}
