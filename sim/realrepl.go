package sim

import (
	"fmt"
	"path/filepath"
	"time"

	"github.com/tunneldirector/tunneldirector/director/replication"
	"github.com/tunneldirector/tunneldirector/internal/clock"
	"github.com/tunneldirector/tunneldirector/store"
)

// Replication implementations a scenario can choose.
const (
	// ReplDirector is the project's director/replication over its
	// in-memory FakeNetwork, stepped on the virtual clock.
	ReplDirector = "director"
	// ReplJournal is the simulator's own journal-following link.
	ReplJournal = "journal"
)

// directorPair is two directors each running the real
// replication.Replicator over a FakeNetwork. The network and the
// replicators' timers run on a clock.Manual of their own that follows the
// virtual clock (and runs ahead of it while a switchover catches up);
// the pair is stepped (deliver, handle, tick) only while there is
// something to replicate, so idle hours cost nothing.
type directorPair struct {
	stores  [2]*store.Store
	reps    [2]*replication.Replicator
	eps     [2]*replication.FakeEndpoint
	net     *replication.FakeNetwork
	clk     *clock.Manual
	sched   clock.Clock
	master  int
	pumping bool
	busyFor time.Duration
	loss    float64
	stats   LinkStats
	applied func(rev uint64)
	// backupRev is the backup's revision as last told to applied.
	backupRev uint64
}

// pumpStep is the virtual time between two steps of the pair while it
// works: finer than the replicators' 20ms NACK interval, so that
// retransmissions run on time and the measured lag is not rounded up to
// the step.
const pumpStep = 5 * time.Millisecond

// slowPump is the step once the pair has worked for a while without
// converging (a cut link): status messages every 100ms are enough.
// stuckPump is the step after ten minutes without converging: still
// inside the replicators' 3s peer timeout, and a pair stuck for days of
// virtual time costs minutes instead of hours.
const (
	slowPump  = 100 * time.Millisecond
	stuckPump = time.Second
)

var simKey = []byte("tunneldirector-simulator-key-000")

// NewDirectorPair opens two stores in o.Dir and joins them with the real
// replication code.
func NewDirectorPair(o PairOptions, sched clock.Clock) (Pair, error) {
	p := &directorPair{sched: sched, loss: o.Loss, applied: o.Applied,
		clk: clock.NewManual(sched.Now())}
	p.net, p.eps[0], p.eps[1] = replication.NewFakeNetwork(replication.FakeConfig{
		Seed: o.Seed, Drop: o.Loss, Delay: o.Latency,
	}, p.clk)
	for i := range p.stores {
		st, err := store.Open(store.Options{
			Path:           filepath.Join(o.Dir, fmt.Sprintf("director-%d.db", i+1)),
			Table:          o.Table,
			JournalChanges: o.JournalChanges,
		})
		if err != nil {
			p.Close()
			return nil, fmt.Errorf("open simulated director store: %w", err)
		}
		p.stores[i] = st
		r, err := replication.New(replication.Config{
			ID: uint32(i + 1), Key: simKey, Store: st, Transport: p.eps[i], Clock: p.clk,
			StatePath: filepath.Join(o.Dir, fmt.Sprintf("director-%d.state", i+1)),
		})
		if err != nil {
			p.Close()
			return nil, fmt.Errorf("start replication of simulated director %d: %w", i+1, err)
		}
		p.reps[i] = r
	}
	p.reps[0].SetRole(replication.RoleMaster)
	return p, nil
}

func (p *directorPair) Name() string {
	return "director/replication (real Replicator pair over its in-memory FakeNetwork, on the virtual clock)"
}
func (p *directorPair) Master() *store.Store { return p.stores[p.master] }
func (p *directorPair) Backup() *store.Store { return p.stores[1-p.master] }

func (p *directorPair) SetLoss(l float64) {
	p.loss = l
	p.net.SetFaults(l, 0, 0)
	p.Committed()
}

func (p *directorPair) Stats() LinkStats {
	s := p.stats
	s.Messages = p.net.Stats.Sent
	s.Lost = p.net.Stats.Dropped
	for _, r := range p.reps {
		if r == nil {
			continue
		}
		c := r.Status().Counters
		s.Snapshots += int(c.SnapshotsApplied)
		s.Changes += int(c.ChangesApplied)
		s.ApplyErrors += int(c.ApplyFailures)
	}
	if b := p.reps[1-p.master]; b != nil {
		st := b.Status()
		s.BackupState = st.State.String()
		if st.Reason != "" {
			s.BackupState += ": " + st.Reason
		}
	}
	return s
}

func (p *directorPair) Close() error { return closeStores(p.stores) }

// Committed starts stepping the pair if it is idle.
func (p *directorPair) Committed() {
	if p.pumping {
		return
	}
	p.pumping = true
	p.busyFor = 0
	p.sched.AfterFunc(0, p.pump)
}

// step moves the fake clock to the virtual one and lets everything due
// happen: datagrams delivered and handled, then both replicators' timers.
func (p *directorPair) step(now time.Time) {
	p.clk.AdvanceTo(now)
	p.net.Settle(256, func(i int, b []byte) { p.reps[i].HandleDatagram(b) })
	for _, r := range p.reps {
		r.Tick()
	}
	// The backup's revision, for the lag: read after each step, it is
	// what the backup's commits in the step reached.
	if rev := p.Backup().Revision(); rev != p.backupRev {
		p.backupRev = rev
		if p.applied != nil {
			p.applied(rev)
		}
	}
}

// settled says the backup holds the master's table and says so. What is
// still in flight then is status and digest chatter, sent every 100ms for
// ever: waiting for an empty link would never end.
func (p *directorPair) settled() bool {
	if p.Backup().Revision() != p.Master().Revision() {
		return false
	}
	st := p.reps[1-p.master].Status()
	return st.State == replication.StateInSync
}

func (p *directorPair) pump() {
	p.step(p.sched.Now())
	if p.settled() {
		p.pumping = false
		return
	}
	d := pumpStep
	switch {
	case p.busyFor > 10*time.Minute:
		d = stuckPump
	case p.busyFor > 2*time.Second:
		d = slowPump
	}
	p.busyFor += d
	p.sched.AfterFunc(d, p.pump)
}

// maxCatchup bounds a switchover's wait for the backup.
const maxCatchup = 30 * time.Second

func (p *directorPair) Failover(mode string) (time.Duration, error) {
	var took time.Duration
	base := p.clk.Now()
	if mode != Crash {
		for took < maxCatchup && !p.settled() {
			took += pumpStep
			p.step(base.Add(took))
		}
	} else {
		// The master is gone: what is still on the wire is lost with it.
		p.net.Partition(true)
		p.step(base)
		p.net.Partition(false)
	}
	old := p.master
	p.master = 1 - p.master
	p.backupRev = p.Backup().Revision()
	p.reps[p.master].SetRole(replication.RoleMaster)
	p.reps[old].SetRole(replication.RoleBackup)
	p.pumping = false
	p.Committed()
	return took, nil
}
