package director

import (
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"time"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/ipvs"
)

// SchedulerConfig is the configuration's scheduler section: placement of
// new and displaced tunnels (affinity.Options).
type SchedulerConfig struct {
	// Choices is d: the number of a peer's best-ranked nodes placement
	// weighs by load (0: every active node, the default; 1: by rank
	// alone).
	Choices int `yaml:"choices"`
}

// UnknownPeersConfig is the configuration's unknown_peers section: the
// hash buckets that steer peers the table does not know yet
// (affinity.BucketOptions; zero values are the defaults).
type UnknownPeersConfig struct {
	Buckets    int      `yaml:"buckets"`
	Interval   Duration `yaml:"interval"`
	MaxChanges int      `yaml:"max_changes"`
	Quiet      Duration `yaml:"quiet"`
	Horizon    float64  `yaml:"horizon"`
}

// Options returns the section as affinity.BucketOptions.
func (u UnknownPeersConfig) Options() affinity.BucketOptions {
	return affinity.BucketOptions{Count: u.Buckets, Interval: time.Duration(u.Interval), MaxChanges: u.MaxChanges,
		Quiet: time.Duration(u.Quiet), Horizon: u.Horizon}
}

// Validate checks the section by affinity's own rules; each problem is
// named by its key path (unknown_peers.max_changes).
func (u UnknownPeersConfig) Validate() error {
	return optionErrors("unknown_peers", u.Options().Validate())
}

// Validate checks the section by affinity's own rules (scheduler.choices).
func (s SchedulerConfig) Validate() error {
	return optionErrors("scheduler", affinity.Options{Choices: s.Choices}.Validate())
}

// optionErrors puts section in front of every key of affinity's
// OptionErrors.
func optionErrors(section string, err error) error {
	var oe affinity.OptionErrors
	if !errors.As(err, &oe) {
		return err
	}
	var errs []error
	for _, e := range oe {
		errs = append(errs, fmt.Errorf("%s.%s: %s", section, e.Key, e.Problem))
	}
	return errors.Join(errs...)
}

// unknownBuckets is the daemon's side of the unknown-peer buckets. The
// table holds the assignment (both directors program their kernels from
// it, and replication carries it); the master decides it: it steps
// affinity.Buckets on the table's loads and commits what changed. The
// learner reports every unpinned first packet (seen), on either
// director, so that a bucket keeps its node while a peer in it waits for
// its pin, also after a takeover. Safe for concurrent use.
type unknownBuckets struct {
	mu sync.Mutex
	b  *affinity.Buckets
	// synced says the table holds b's assignment: a step that moves
	// nothing has nothing to commit.
	synced bool
	// leading says this director stepped as the elected one of a shared
	// table at its last step (a newly elected one restores first).
	leading bool
	stat    BucketStatus
}

// BucketStatus is what the status shows of the unknown-peer buckets.
type BucketStatus struct {
	// Buckets is the number the table (and the kernel) holds.
	Buckets int `json:"buckets"`
	// Nodes counts the buckets of each node (by name).
	Nodes map[string]int `json:"nodes,omitempty"`
	// Steps counts the steps this daemon committed as master, Moved the
	// buckets they gave another node; LastStep is the latest.
	Steps    int       `json:"steps"`
	Moved    int       `json:"moved"`
	LastStep time.Time `json:"last_step"`
}

// configure (re)creates the stepper for o, keeping the assignment the
// table holds when its count fits.
func (u *unknownBuckets) configure(o affinity.BucketOptions, t *affinity.Table, now time.Time) error {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.b != nil && u.b.Options() == o.WithDefaults() {
		return nil
	}
	b, err := affinity.NewBuckets(o)
	if err != nil {
		return fmt.Errorf("unknown-peer buckets: %w", err)
	}
	u.b = b
	u.restoreLocked(t, now)
	return nil
}

// restore takes the table's assignment (a takeover) and keeps it for an
// interval before balancing.
func (u *unknownBuckets) restore(t *affinity.Table, now time.Time) {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.restoreLocked(t, now)
}

func (u *unknownBuckets) restoreLocked(t *affinity.Table, now time.Time) {
	// A table of another count (none yet, or another configuration)
	// keeps the fresh assignment: the next step assigns every bucket.
	u.synced = u.b.Restore(t.Buckets()) == nil
	if u.synced {
		u.b.Defer(now)
	}
}

// seen records an unpinned first packet of a peer the kernel hashed into
// bucket i of n.
func (u *unknownBuckets) seen(i, n int, now time.Time) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.b != nil && u.b.Len() == n {
		u.b.Seen(i, now)
	}
}

// stepBuckets runs one step on the master and commits the assignment it
// leaves, one transaction (the reconciler then applies it in one nftables
// transaction with any pending pins). Step limits itself: it balances at
// most every interval and otherwise only moves buckets off nodes that
// stopped taking tunnels, so it is called after every reconcile too.
func (d *Daemon) stepBuckets() {
	if d.writable() != nil {
		return // the backup programs what the master decided
	}
	if d.shared != nil && !d.stepsSharedBuckets() {
		return // another director of the shared table decides
	}
	u := &d.unknown
	u.mu.Lock()
	now := d.clk.Now()
	moved := u.b.Step(now, d.st.Table().Loads())
	want := u.b.Marks()
	if len(moved) == 0 && u.synced {
		u.mu.Unlock()
		return
	}
	u.mu.Unlock()
	// The difference to the table, not just this step's moves: a commit
	// that failed before is retried, and a restored assignment of another
	// count replaces the table's.
	a, err := d.st.Do(func(t *affinity.Table) ([]affinity.Change, error) {
		// Asked again under the store's lock: the step above can take
		// long enough (4,096 buckets at a pair's first assignment) for
		// keepalived to have made this director backup meanwhile, and a
		// backup's own commit puts the pair out of sync.
		if err := d.mayCommit(); err != nil {
			return nil, err
		}
		return affinity.BucketChanges(t.Buckets(), want, fmt.Sprintf("unknown-peer buckets: %d moved by headroom", len(moved))), nil
	})
	u.mu.Lock()
	defer u.mu.Unlock()
	if errors.Is(err, ErrNotMaster) {
		u.synced = false // the new master steps; this director follows it
		return
	}
	if err != nil {
		u.synced = false
		d.log.Error("commit the unknown-peer buckets; retrying at the next step", "err", err)
		return
	}
	u.synced = true
	if len(a.Changes) > 0 {
		u.stat.Steps++
		u.stat.Moved += len(a.Changes)
		u.stat.LastStep = now
		d.log.Debug("unknown-peer buckets stepped", "revision", a.Revision, "changed", len(a.Changes))
	}
}

// stepsSharedBuckets reports whether this director steps the buckets of
// a table shared through etcd: only the elected one, so N directors do not
// fight over the assignment. Newly elected, it goes on from the table's
// assignment, as a pair's new master does.
func (d *Daemon) stepsSharedBuckets() bool {
	lead := d.shared.IsLeader()
	u := &d.unknown
	u.mu.Lock()
	defer u.mu.Unlock()
	if lead && !u.leading && u.b != nil {
		u.restoreLocked(d.st.Table(), d.clk.Now())
	}
	u.leading = lead
	return lead
}

// bucketStatus reports the buckets the table holds per node.
func (d *Daemon) bucketStatus() *BucketStatus {
	t := d.st.Table()
	marks := t.Buckets()
	d.unknown.mu.Lock()
	s := d.unknown.stat
	d.unknown.mu.Unlock()
	s.Buckets = len(marks)
	per := map[uint16]int{}
	for _, m := range marks {
		per[m]++
	}
	s.Nodes = map[string]int{}
	for m, n := range per {
		if nd, ok := t.NodeByMark(m); ok {
			s.Nodes[nd.Name] = n
		}
	}
	return &s
}

// unknownMark is the node the kernel gives a peer it does not know: its
// bucket's, or with no buckets yet the hash over the active nodes.
func unknownMark(t *affinity.Table, peer netip.Addr, seed uint32) uint16 {
	if b := t.Buckets(); len(b) > 0 {
		return ipvs.BucketPick(peer, seed, b)
	}
	var active []uint16
	for _, n := range t.Nodes() {
		if n.State == affinity.NodeActive {
			active = append(active, n.Mark)
		}
	}
	return ipvs.HashPick(peer, seed, active)
}
