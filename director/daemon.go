package director

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/director/agents"
	"github.com/tunneldirector/tunneldirector/director/ctsync"
	"github.com/tunneldirector/tunneldirector/director/health"
	"github.com/tunneldirector/tunneldirector/director/replication"
	"github.com/tunneldirector/tunneldirector/internal/clock"
	"github.com/tunneldirector/tunneldirector/ipvs"
	"github.com/tunneldirector/tunneldirector/store"
	"github.com/tunneldirector/tunneldirector/store/etcdstore"
)

// Daemon keeps the kernel equal to the affinity table: it syncs the whole
// table at start (adopting what a previous run left in the kernel), turns
// every committed change into a dataplane delta, and periodically reads
// the kernel back to repair what someone else changed. The store is the
// truth; the kernel is reconciled from it, never the other way round.
type Daemon struct {
	log *slog.Logger
	clk clock.Clock
	st  store.Backend
	svc *Service
	// shared is the store when N active directors share it (etcd).
	shared sharedStore
	dp     ipvs.Dataplane

	cfgMu sync.Mutex
	cfg   *Config

	// changes is the reconciler's cursor on the store's change log: the
	// batches committed since the kernel was last brought up to date.
	changes store.Cursor
	fullMu  sync.Mutex
	full    bool // a change the delta path cannot express: sync everything
	wake    chan struct{}
	// started is closed once the kernel sync of the start is done (or
	// Run returned without one): the API's table changes wait for it
	// (startGate).
	started     chan struct{}
	startedOnce sync.Once

	statMu sync.Mutex
	stat   Status

	repl      *replication.Replicator // nil when the director runs alone
	agent     agentSide
	health    *health.Monitor // the node health checks (nodehealth.go)
	ct        *ctsync.Syncer  // nil without conntrack replication
	readyFile string
	watch     func(ctx context.Context, fn func(ipvs.NewFlow)) error

	unknown unknownBuckets // the unknown-peer buckets (buckets.go)

	m *daemonMetrics
	// elements are the peer, subnet and node elements the kernel holds,
	// as of the last successful reconcile (under statMu).
	elements struct{ peers, subnets, nodes int }
	// countedRev is the table revision the last full sync's element
	// counts are of: later deltas count only batches past it.
	countedRev uint64
	sd         *systemd
	// bulk is set by a reconcile that changed many elements (memory.go);
	// reconciles run on the event loop only.
	bulk bool
}

// Status is what `tunneldirector status` shows.
type Status struct {
	Mode              string        `json:"mode"`
	Revision          uint64        `json:"revision"`
	Tunnels           int           `json:"tunnels"`
	Nodes             int           `json:"nodes"`
	LastReconcile     time.Time     `json:"last_reconcile"`
	LastReconcileTook time.Duration `json:"last_reconcile_ns"`
	KernelRevision    uint64        `json:"kernel_revision"` // the table revision the kernel holds
	Reconciles        int           `json:"reconciles"`
	ReconcileErrors   int           `json:"reconcile_errors"`
	LastError         string        `json:"last_error,omitempty"`
	// KernelProblems are the objects the last reconcile could not program
	// (a route to a node the director cannot reach, say) while it applied
	// everything else; the next verify tries them again.
	KernelProblems []string  `json:"kernel_problems,omitempty"`
	LastVerify     time.Time `json:"last_verify"`
	DriftRepairs   int       `json:"drift_repairs"`
	Learned        int       `json:"learned"`
	// UnknownPeers are the buckets that steer peers not yet in the table.
	UnknownPeers *BucketStatus `json:"unknown_peers,omitempty"`
	// Replication is the pair's state, when replication is configured.
	Replication *replication.Status `json:"replication,omitempty"`
	// Agents is the node agents' state, when agent reports are on.
	Agents *agents.Status `json:"agents,omitempty"`
	// HealthDowns and HealthUps count the health checks' decisions this
	// director committed; HealthMoves the tunnels their downs moved.
	HealthDowns int `json:"health_downs"`
	HealthUps   int `json:"health_ups"`
	HealthMoves int `json:"health_moves"`
	// HealthLast is the last transition the health checks committed.
	HealthLast *HealthTransition `json:"health_last,omitempty"`
	// Health is the health checks' view: per node state and last
	// results, the panic and link state, counters.
	Health *health.Status `json:"health,omitempty"`
	// Etcd is the shared store's state, when the table is in etcd:
	// whether this director reaches it (if not, it forwards from its
	// last table, stale, and makes no writes) and who is elected.
	Etcd *etcdstore.Health `json:"etcd,omitempty"`
	// Conntrack is the conntrack replication's state, when configured.
	Conntrack *ctsync.Status `json:"conntrack,omitempty"`
}

// sharedStore is a store that N active directors share (etcd): writes
// need it reachable, and the writes nobody asked for (learned pins, the
// unknown-peer buckets' steps) are made by its elected director alone, so
// the directors do not race.
type sharedStore interface {
	Writable() error
	IsLeader() bool
	Health() etcdstore.Health
	RequestLearn(peer netip.Addr, mark uint16) error
	OnLearnRequest(fn func(peer netip.Addr, mark uint16) error)
}

// DaemonOptions wires a daemon.
type DaemonOptions struct {
	Config    *Config
	Store     store.Backend
	Dataplane ipvs.Dataplane
	Logger    *slog.Logger
	// Clock times the verify and ready loops and stamps the status (nil:
	// the real clock).
	Clock clock.Clock
	// Replicator pairs the director with its peer; nil runs it alone.
	Replicator *replication.Replicator
	// Conntrack replicates conntrack state over the Replicator's link
	// (NewConntrackSync); nil: not at all.
	Conntrack *ctsync.Syncer
	// ReadyFile, with a Replicator, is kept at "0" while in sync and "1"
	// otherwise, for keepalived's track_file.
	ReadyFile string
	// Watch, when set, reports the first packet of every peer the kernel
	// did not know (ipvs.FirstPackets): the daemon pins those peers.
	Watch func(ctx context.Context, fn func(ipvs.NewFlow)) error
	// Metrics, when set, receives the daemon's families (director/metrics).
	Metrics prometheus.Registerer
}

// NewDaemon wires a daemon over an open store and a dataplane; Run starts
// it. The configured nodes are merged into the table first.
func NewDaemon(o DaemonOptions) (*Daemon, error) {
	d := &Daemon{
		log:  o.Logger,
		clk:  clock.Or(o.Clock),
		st:   o.Store,
		svc:  NewService(o.Store),
		dp:   o.Dataplane,
		cfg:  o.Config,
		wake: make(chan struct{}, 1),
		repl: o.Replicator,
		ct:   o.Conntrack,

		started:   make(chan struct{}),
		readyFile: o.ReadyFile,
		watch:     o.Watch,
		m:         newDaemonMetrics(),
	}
	if d.log == nil {
		d.log = slog.Default()
	}
	d.sd = newSystemd(d.log)
	d.svc.m = d.m
	if o.Metrics != nil {
		cs := append(d.m.collectors(), newDaemonCollector(d), newAgentCollector(d), newHealthCollector(d))
		if d.ct != nil {
			cs = append(cs, newConntrackCollector(d.ct.Status))
		}
		for _, c := range cs {
			if err := o.Metrics.Register(c); err != nil {
				return nil, fmt.Errorf("register metrics: %w", err)
			}
		}
	}
	d.stat.Mode = d.dp.Mode().String()
	d.svc.gate = d.startGate
	d.svc.agentNode = func(name string) (agents.NodeView, bool) { return d.agent.merger.Node(name) }
	if sh, ok := o.Store.(sharedStore); ok {
		if o.Replicator != nil {
			return nil, errors.New("a store shared through etcd and pair replication exclude each other")
		}
		d.shared = sh
		sh.OnLearnRequest(d.Learn)
	}
	if d.ct != nil {
		d.ct.Filter().SetOwn(ownAddresses(o.Config))
	}
	if err := d.applyConfig(o.Config); err != nil {
		return nil, err
	}
	d.health = d.newHealth(o.Config)
	d.svc.health = d.health.Status
	// Every accepted agent report is a heartbeat for the health checks'
	// heartbeat check.
	d.SetAgentHeartbeats(d.health)
	// Run syncs the whole table first: the cursor starts where that sync
	// will find the table, or earlier (a batch read twice is harmless).
	cur, err := d.st.Changes(d.st.Revision())
	if err != nil {
		return nil, fmt.Errorf("follow the store's change log: %w", err)
	}
	d.changes = cur
	return d, nil
}

// Service returns the daemon's request handler, for the API.
func (d *Daemon) Service() *Service { return d.svc }

// applyConfig puts the configuration's VIPs and nodes into the table.
func (d *Daemon) applyConfig(c *Config) error {
	if err := d.st.SetVIPs(c.VIPs); err != nil {
		return fmt.Errorf("configuration VIPs: %w", err)
	}
	if err := d.configureAgents(c); err != nil {
		return err
	}
	// A backup's table is its master's: the master merges the
	// configured nodes and they arrive by replication.
	if d.writable() == nil {
		if _, err := d.st.Do(func(t *affinity.Table) ([]affinity.Change, error) { return c.nodeChanges(t), nil }); err != nil {
			return fmt.Errorf("configuration nodes: %w", err)
		}
	}
	if err := d.unknown.configure(c.UnknownPeers.Options(), d.st.Table(), d.clk.Now()); err != nil {
		return err
	}
	d.cfgMu.Lock()
	d.cfg = c
	d.cfgMu.Unlock()
	return nil
}

// Reload applies a new configuration (SIGHUP) and resyncs the kernel.
func (d *Daemon) Reload(c *Config) error {
	if err := d.applyConfig(c); err != nil {
		return err
	}
	d.health.SetConfig(c.Health)
	d.needFull()
	return nil
}

func (d *Daemon) config() *Config {
	d.cfgMu.Lock()
	defer d.cfgMu.Unlock()
	return d.cfg
}

// needFull asks the reconcile loop for a full sync (a configuration
// reload, a failed sync or verify) and wakes it.
func (d *Daemon) needFull() {
	d.fullMu.Lock()
	d.full = true
	d.fullMu.Unlock()
	d.kick()
}

func (d *Daemon) kick() {
	select {
	case d.wake <- struct{}{}:
	default:
	}
}

// Desired computes the whole kernel state from the table and configuration.
// The peers and subnets are read from the table when the dataplane asks
// (Marks), not copied.
func (d *Daemon) Desired() *ipvs.Desired {
	want, _ := d.desired()
	return want
}

// desired is Desired, and what its Marks yielded once the dataplane read
// them: the element counts, and the table revision they are of.
func (d *Daemon) desired() (*ipvs.Desired, *markCount) {
	c := d.config()
	t := d.st.Table()
	n := &markCount{}
	return &ipvs.Desired{
		VIPs:     t.VIPs(),
		Nodes:    c.kernelNodes(t),
		HashSeed: c.HashSeed,
		Buckets:  t.Buckets(),
		Marks: func(peer func(netip.Addr, uint16), subnet func(netip.Prefix, uint16)) {
			n.revision = t.Marks(func(a netip.Addr, m uint16) { n.peers++; peer(a, m) },
				func(p netip.Prefix, m uint16) { n.subnets++; subnet(p, m) })
		},
		MarksPeers:   t.Len(),
		MarksSubnets: t.SubnetLen(),
	}, n
}

// markCount is what a sync's Marks yielded.
type markCount struct {
	peers, subnets int
	revision       uint64
}

// kernelNodes are the table's nodes as the dataplane programs them, never
// nil.
func (c *Config) kernelNodes(t *affinity.Table) []ipvs.Node {
	fwd := c.nodeForward()
	nodes := t.Nodes()
	out := make([]ipvs.Node, 0, len(nodes))
	for _, n := range nodes {
		f, ok := fwd[n.Name]
		if !ok {
			f = c.Forward
		}
		out = append(out, ipvs.Node{Mark: n.Mark, Name: n.Name, Addr: n.Addr, Addr6: n.Addr6, Forward: f,
			Active: n.State == affinity.NodeActive, Down: n.State == affinity.NodeDown})
	}
	return out
}

// bigDelta is the number of new tunnels in one reconcile from which, when
// they are half the table or more (an import into an empty table), the
// kernel gets a full sync instead of a delta (moves, such as a node going
// down, stay a delta however many): the sync reads the table
// itself, where the delta's maps, keyed by address and prefix, are a second
// copy of the batch beside the table and the batch. At a million tunnels
// they held 150 MB, and the collector's headroom doubles that in peak RSS.
const bigDelta = 65536

// delta turns committed batches into one delta: the element changes (pins
// and bucket changes among them), and, when a node changed, all the nodes
// as the table now has them (a node going down is its new state plus its
// tunnels' moves, never a full diff), so the kernel takes them in one
// transaction. It reports false when the delta cannot express them and
// the kernel needs a full sync: the bucket count changed (the
// classifier's hash rule changes), a batch came back from the journal
// without the records as they were before, or a tunnel's node is gone;
// and when a full sync is cheaper (bigDelta).
func (d *Daemon) delta(batches []store.Batch, t *affinity.Table) (*ipvs.Delta, bool) {
	nodes := false
	// A first pass decides whether a delta can be made at all (a fresh
	// backup's snapshot of a million tunnels ends with new buckets, which
	// need a full sync: finding that out after building the delta cost
	// seconds) and sizes it: growing the maps to an import of a million
	// tunnels rehashed every key several times.
	var peers, subnets, fresh int
	for _, a := range batches {
		if !a.Resolved {
			return nil, false
		}
		for i := range a.Changes {
			switch c := &a.Changes[i]; c.Kind {
			case affinity.PutTunnel:
				peers++
				subnets += len(c.Tunnel.Subnets)
				if c.Old == nil {
					fresh++
				}
			case affinity.DeleteTunnel:
				if c.Old == nil {
					return nil, false
				}
			case affinity.PutBucket:
				if c.OldBucket == nil || c.OldBucket.Count != c.Bucket.Count {
					return nil, false
				}
			}
		}
	}
	if fresh >= bigDelta && 2*fresh >= t.Len() {
		return nil, false
	}
	dl := &ipvs.Delta{SetPeers: make(map[netip.Addr]uint16, peers), SetSubnets: make(map[netip.Prefix]uint16, subnets), Buckets: map[int]uint16{}}
	// del drops tu's keys from the delta's settings and deletes them,
	// except those keep (the record replacing tu) has too: they are set
	// again right after, so a move deletes nothing.
	del := func(tu *affinity.Tunnel, keep *affinity.Tunnel) {
		if keep == nil || keep.Peer != tu.Peer {
			delete(dl.SetPeers, tu.Peer)
			dl.DeletePeers = append(dl.DeletePeers, tu.Peer)
		}
		for _, p := range tu.Subnets {
			if keep == nil || !slices.Contains(keep.Subnets, p) {
				delete(dl.SetSubnets, p)
				dl.DeleteSubnets = append(dl.DeleteSubnets, p)
			}
		}
	}
	// Node marks by name, asked of the table once per node rather than
	// once per tunnel (a node down moves tens of thousands).
	marks := map[string]uint16{}
	mark := func(name string) (uint16, bool) {
		if m, ok := marks[name]; ok {
			return m, true
		}
		n, ok := t.Node(name)
		if ok {
			marks[name] = n.Mark
		}
		return n.Mark, ok
	}
	for _, a := range batches {
		for i := range a.Changes {
			c := &a.Changes[i]
			switch c.Kind {
			case affinity.PutNode, affinity.DeleteNode:
				nodes = true
			case affinity.DeleteTunnel:
				del(c.Old, nil)
			case affinity.PutBucket:
				dl.Buckets[c.Bucket.Index] = c.Bucket.Mark
			case affinity.PutTunnel:
				if c.Old != nil {
					del(c.Old, c.Tunnel)
				}
				m, ok := mark(c.Tunnel.Node)
				if !ok {
					return nil, false
				}
				dl.SetPeers[c.Tunnel.Peer] = m
				for _, p := range c.Tunnel.Subnets {
					dl.SetSubnets[p] = m
				}
			}
		}
	}
	// A key both deleted (old value) and set (new value) is only set.
	dl.DeletePeers = slices.DeleteFunc(dl.DeletePeers, func(a netip.Addr) bool { _, set := dl.SetPeers[a]; return set })
	dl.DeleteSubnets = slices.DeleteFunc(dl.DeleteSubnets, func(p netip.Prefix) bool { _, set := dl.SetSubnets[p]; return set })
	if nodes {
		dl.Nodes = d.config().kernelNodes(t)
	}
	return dl, true
}

// ErrNotMaster refuses a write on the backup director.
var ErrNotMaster = errors.New("not the master")

// writable refuses writes on a director that is not the master of its
// pair: the backup's table is written only by replication, so both stay
// equal. A director running alone always writes.
func (d *Daemon) writable() error {
	if d.shared != nil {
		return d.shared.Writable()
	}
	if d.repl == nil || d.repl.Role() == replication.RoleMaster {
		return nil
	}
	st := d.repl.Status()
	return fmt.Errorf("%w: this director (id %d) is %s; write on the master (director id %d, role %s as last heard)",
		ErrNotMaster, st.ID, st.Role, st.Peer.ID, st.Peer.Role)
}

// startGate is the API's gate on table changes: writable, once the kernel
// sync of the start is done. A change committed while that sync walks the
// table is in its target and not yet in the kernel, so the restarted
// daemon cannot adopt the kernel's maps by their digest: at a million
// tunnels it reloaded them whole for a one-tunnel import made as soon as
// the API answered (the table is too large to read back). Waiting costs
// the change the rest of that sync (under 2 s at a million tunnels), and
// it then reaches the kernel as a delta.
func (d *Daemon) startGate() error {
	<-d.started
	return d.writable()
}

// openStartGate lets the API's table changes through (startGate).
func (d *Daemon) openStartGate() { d.startedOnce.Do(func() { close(d.started) }) }

// mayCommit is writable for the checks made inside a store transaction
// (under the store's lock): it takes no lock of the replicator, which
// holds its own while it waits for the store's.
func (d *Daemon) mayCommit() error {
	if d.shared != nil {
		return d.shared.Writable()
	}
	if d.repl == nil || d.repl.IsMaster() {
		return nil
	}
	return fmt.Errorf("%w: this director is no longer the master", ErrNotMaster)
}

// SetRole sets the pair role (from keepalived's notify): the dataplane is
// already programmed on both directors, so only who writes changes.
func (d *Daemon) SetRole(role replication.Role) error {
	if d.repl == nil {
		return errors.New("set role: replication is not configured on this director")
	}
	d.repl.SetRole(role)
	// The agents report to the master only: a director losing the role
	// forgets their sessions, so that they start over at the new master
	// with a full report (which answers need_full to anything else).
	d.agent.merger.Reset()
	d.health.SetRole(role == replication.RoleMaster)
	d.log.Info("role changed", "role", role.String(), "epoch", d.repl.Epoch())
	if d.ct != nil {
		// Becoming master commits the backup's cache of the old
		// master's flows into the kernel before keepalived's notify
		// returns; becoming backup lets this director's synced entries
		// run out and asks the new master for its flows.
		d.ct.SetRole(context.Background(), role)
	}
	if role == replication.RoleMaster {
		// The configured nodes were not merged while backup.
		if _, err := d.st.Do(func(t *affinity.Table) ([]affinity.Change, error) { return d.config().nodeChanges(t), nil }); err != nil {
			d.log.Error("merge configured nodes as master", "err", err)
		}
		// The buckets go on from the old master's assignment, with the
		// first packets this director saw while backup; the takeover
		// itself changes none (the next balancing step is an interval
		// away).
		d.unknown.restore(d.st.Table(), d.clk.Now())
		d.kick()
	}
	d.writeReady()
	return nil
}

// Conflicts returns the reports of the split-brain merges this director
// made as master (`ctl conflicts`): every record both directors changed,
// both versions, the winner and why.
func (d *Daemon) Conflicts() ([]replication.MergeReport, error) {
	if d.repl == nil {
		return nil, fmt.Errorf("%w: replication is not configured on this director", ErrRefused)
	}
	return d.repl.Conflicts(), nil
}

// Ready reports whether this director may win an election: alone, always;
// paired, when its table is in sync with the peer's.
func (d *Daemon) Ready() bool { return d.repl == nil || d.repl.Ready() }

func (d *Daemon) writeReady() {
	if d.readyFile == "" {
		return
	}
	v := "1\n"
	if d.Ready() {
		v = "0\n"
	}
	if cur, err := os.ReadFile(d.readyFile); err == nil && string(cur) == v {
		return
	}
	tmp := d.readyFile + ".tmp"
	err := os.WriteFile(tmp, []byte(v), 0o644)
	if err == nil {
		err = os.Rename(tmp, d.readyFile)
	}
	if err != nil {
		d.log.Error("write ready file", "path", d.readyFile, "err", err)
	}
}

// Run syncs the kernel, then reconciles changes and verifies the kernel
// every VerifyInterval until ctx ends. The kernel stays programmed when it
// returns. Both directors of a pair run it: the backup's kernel follows the
// replicated table, so a takeover changes nothing in the dataplane.
func (d *Daemon) Run(ctx context.Context) error {
	// A daemon stopping before its first sync lets waiting changes
	// through to the store, as before it ran; the next start syncs them.
	defer d.openStartGate()
	// A master assigns the buckets before the kernel is programmed.
	d.stepBuckets()
	for _, w := range d.config().SelfInSubnets(d.st.Table(), LocalAddrs()) {
		d.log.Warn("own address in a protected subnet", "warning", w)
	}
	if err := d.syncAll(ctx, "start"); err != nil {
		return err
	}
	d.openStartGate()
	d.releaseAfterBulk()
	if d.repl != nil {
		go func() {
			if err := d.repl.Run(ctx); err != nil && ctx.Err() == nil {
				d.log.Error("replication stopped", "err", err)
			}
		}()
	}
	go d.runAgents(ctx)
	d.runHealth(ctx)
	if d.ct != nil {
		go func() {
			if err := d.ct.Run(ctx); err != nil && ctx.Err() == nil {
				d.log.Error("conntrack replication stopped", "err", err)
			}
		}()
	}
	if d.watch != nil {
		go func() {
			if err := d.watch(ctx, d.onFlow); err != nil && ctx.Err() == nil {
				d.log.Error("first-packet watch stopped: unknown peers are steered by hash but no longer pinned", "err", err)
			}
		}()
	}
	verify, verifyC := d.clk.NewTicker(time.Duration(d.config().VerifyInterval))
	defer verify.Stop()
	ready, readyC := d.clk.NewTicker(time.Second)
	defer ready.Stop()
	// The bucket interval is read at start; a reload that changes it
	// takes effect at the next start (Step limits itself to its own).
	step, stepC := d.clk.NewTicker(d.config().UnknownPeers.Options().WithDefaults().Interval)
	defer step.Stop()
	// The watchdog is pinged from this loop and nowhere else: a loop stuck
	// in a reconcile stops the pings, and systemd restarts the daemon.
	var watchdogC <-chan time.Time
	if every := d.sd.pingEvery(); every > 0 {
		wd, c := d.clk.NewTicker(every)
		defer wd.Stop()
		watchdogC = c
	}
	// pendingC fires while a verify's background read of the maps runs,
	// to compare it as soon as it arrives.
	var pendingC <-chan time.Time
	d.writeReady()
	d.sd.ready(d.statusLine())
	defer d.sd.stopping()
	for {
		// The cursor is replaced when the change log left it behind:
		// take its channel anew each time.
		select {
		case <-ctx.Done():
			return nil
		case <-d.changes.Notify():
			d.reconcile(ctx)
			d.releaseAfterBulk()
			d.stepBuckets()
		case <-d.wake:
			d.reconcile(ctx)
			d.releaseAfterBulk()
			d.stepBuckets()
		case <-stepC:
			d.stepBuckets()
		case <-pendingC:
			pendingC = d.verifyAgain(d.Verify(ctx))
		case <-verifyC:
			pendingC = d.verifyAgain(d.Verify(ctx))
			if d.ct != nil {
				d.ct.Filter().SetOwn(ownAddresses(d.config()))
			}
		case <-readyC:
			d.writeReady()
			if d.shared != nil {
				// An election won between changes: the newly
				// elected director takes the buckets over within
				// a second (a step that moves nothing is cheap),
				// and so do its health checks.
				d.stepBuckets()
				d.health.SetRole(d.decidesHealth())
			}
		case <-watchdogC:
			d.sd.ping()
		}
		d.sd.status(d.statusLine())
	}
}

func (d *Daemon) syncAll(ctx context.Context, why string) error {
	// What the cursor holds is in the table the sync reads: skip it.
	if _, _, err := d.pendingBatches(); err != nil {
		return fmt.Errorf("sync kernel (%s): %w", why, err)
	}
	rev := d.st.Revision()
	want, n := d.desired()
	st, err := d.dp.Sync(ctx, want)
	d.record(reconcileFull, rev, st, err)
	if err == nil || d.partial(err) {
		err = nil
		// The sync read the table as of n.revision, which may be past
		// rev: the batches up to it, still in the cursor, are in the
		// kernel and in these counts already.
		d.statMu.Lock()
		d.elements.peers, d.elements.subnets, d.elements.nodes = n.peers, n.subnets, len(want.Nodes)
		d.countedRev = n.revision
		d.statMu.Unlock()
	}
	if err != nil {
		return fmt.Errorf("sync kernel to revision %d (%s): %w", rev, why, err)
	}
	d.log.Info("kernel synced", "why", why, "revision", rev, "peers", n.peers, "subnets", n.subnets,
		"added", st.Added, "changed", st.Changed, "removed", st.Removed, "reloaded", st.Reloaded, "took", st.Duration)
	return nil
}

// pendingBatches reads the reconciler's cursor to the end. A cursor the
// change log left behind (the reconciler fell further behind than the
// ring and the journal reach) is replaced by one at the table's revision,
// and full says the kernel needs a full sync.
func (d *Daemon) pendingBatches() (batches []store.Batch, full bool, err error) {
	for {
		b, ok, err := d.changes.Next()
		if errors.Is(err, store.ErrCompacted) {
			d.log.Warn("reconciler fell behind the change log; syncing everything", "err", err)
			cur, err := d.st.Changes(d.st.Revision())
			if err != nil {
				return nil, true, err
			}
			d.changes.Close()
			d.changes = cur
			return nil, true, nil
		}
		if err != nil {
			return nil, true, err
		}
		if !ok {
			return batches, false, nil
		}
		d.m.countMoves(b)
		batches = append(batches, b)
	}
}

// reconcile applies what was committed since the last run: a delta when
// only tunnels changed, a full sync otherwise or after an error.
func (d *Daemon) reconcile(ctx context.Context) {
	d.fullMu.Lock()
	full := d.full
	d.full = false
	d.fullMu.Unlock()
	batches, lost, err := d.pendingBatches()
	if err != nil {
		d.log.Error("read the store's change log", "err", err)
	}
	full = full || lost || err != nil
	if len(batches) == 0 && !full {
		return
	}
	if !full {
		dl, ok := d.delta(batches, d.st.Table())
		if ok {
			rev := batches[len(batches)-1].Revision
			st, err := d.dp.Update(ctx, dl)
			d.record(reconcileDelta, rev, st, err)
			if err == nil || d.partial(err) {
				dp, ds := elementDelta(batches, d.countedRev)
				d.statMu.Lock()
				d.elements.peers += dp
				d.elements.subnets += ds
				d.statMu.Unlock()
				level, msg := slog.LevelDebug, "kernel updated"
				if st.Reloaded > 0 {
					// Worth an operator's notice: a transaction of the
					// whole table (a map outgrew the size it was made
					// with).
					level, msg = slog.LevelInfo, "kernel updated, maps recreated larger"
				}
				d.log.Log(ctx, level, msg, "revision", rev, "added", st.Added, "changed", st.Changed, "removed", st.Removed,
					"reloaded", st.Reloaded, "took", st.Duration)
				return
			}
			d.log.Warn("kernel update failed, syncing everything", "revision", rev, "err", err)
		}
	}
	if err := d.syncAll(ctx, "table change"); err != nil {
		d.log.Error("kernel sync failed; retrying at the next change or verify", "err", err)
		d.fullMu.Lock()
		d.full = true
		d.fullMu.Unlock()
	}
}

// verifyPoll is how often a verify whose background read of the maps is
// running looks for it.
const verifyPoll = 100 * time.Millisecond

// verifyAgain returns a channel firing after verifyPoll when pending, nil
// otherwise.
func (d *Daemon) verifyAgain(pending bool) <-chan time.Time {
	if !pending {
		return nil
	}
	_, c := d.clk.NewTimer(verifyPoll)
	return c
}

// Verify reads the kernel back and repairs drift, counting the repairs;
// it says whether a background read of the maps is still running.
func (d *Daemon) Verify(ctx context.Context) (pending bool) {
	st, err := d.dp.Verify(ctx)
	d.m.reconciled(reconcileVerify, st, err)
	d.statMu.Lock()
	d.stat.LastVerify = d.clk.Now()
	var pe *ipvs.PartialError
	if err == nil || errors.As(err, &pe) {
		d.stat.DriftRepairs += st.Added + st.Changed + st.Removed
		d.stat.KernelProblems = problems(pe)
	}
	d.statMu.Unlock()
	if d.partial(err) {
		err = nil
	}
	switch {
	case err != nil:
		d.log.Error("verify kernel", "err", err)
		d.needFull()
	case st.Added+st.Changed+st.Removed > 0:
		d.log.Warn("kernel drift repaired: something else changed the director's objects",
			"added", st.Added, "changed", st.Changed, "removed", st.Removed)
	}
	return st.Pending && err == nil
}

func (d *Daemon) record(kind string, rev uint64, st ipvs.Stats, err error) {
	d.m.reconciled(kind, st, err)
	d.noteBulk(st)
	d.statMu.Lock()
	defer d.statMu.Unlock()
	d.stat.Reconciles++
	d.stat.LastReconcile = d.clk.Now()
	d.stat.LastReconcileTook = st.Duration
	var pe *ipvs.PartialError
	if err != nil && !errors.As(err, &pe) {
		d.stat.ReconcileErrors++
		d.stat.LastError = err.Error()
		return
	}
	// A partial error applied everything but the objects it names: the
	// kernel is at rev for the rest.
	d.stat.KernelRevision = rev
	d.stat.LastError = ""
	d.stat.KernelProblems = problems(pe)
	if pe != nil {
		d.stat.LastError = pe.Error()
	}
}

// partial reports (and logs, one line per object) whether err is an
// ipvs.PartialError: everything but the named objects was applied, so the
// director keeps steering for the rest of the farm.
func (d *Daemon) partial(err error) bool {
	var pe *ipvs.PartialError
	if !errors.As(err, &pe) {
		return false
	}
	for _, e := range pe.Failed {
		d.log.Error("kernel object not programmed; steering everything else, retrying at the next verify", "op", pe.Op, "err", e)
	}
	return true
}

func problems(pe *ipvs.PartialError) []string {
	if pe == nil {
		return nil
	}
	out := make([]string, len(pe.Failed))
	for i, e := range pe.Failed {
		out[i] = e.Error()
	}
	return out
}

// Status reports the daemon's state.
func (d *Daemon) Status() Status {
	d.statMu.Lock()
	s := d.stat
	d.statMu.Unlock()
	t := d.st.Table()
	s.Revision = t.Revision()
	s.Tunnels = t.Len()
	s.Nodes = len(t.Nodes())
	if d.repl != nil {
		rs := d.repl.Status()
		s.Replication = &rs
	}
	hs := d.health.Status()
	s.Health = &hs
	if d.shared != nil {
		h := d.shared.Health()
		s.Etcd = &h
	}
	if d.ct != nil {
		cs := d.ct.Status()
		s.Conntrack = &cs
	}
	s.UnknownPeers = d.bucketStatus()
	if d.config().Agents.Enabled() {
		as := d.agent.merger.Status()
		s.Agents = &as
	}
	return s
}

// onFlow learns the peer of the first IKE, NAT-T, ESP or AH packet to a VIP
// from a peer the table does not know yet.
func (d *Daemon) onFlow(f ipvs.NewFlow) {
	switch {
	case f.Proto == 17 && (f.DstPort == 500 || f.DstPort == 4500), f.Proto == 50, f.Proto == 51:
	default:
		return
	}
	c := d.config()
	t := d.st.Table()
	if !t.IsVIP(f.Dst) {
		return
	}
	if _, known := t.PeerMark(f.Src); known {
		return
	}
	d.m.firstPackets.Inc()
	// Its bucket keeps its node while the peer waits for its pin (and on
	// either director: a takeover keeps the quiet windows).
	if n := t.BucketCount(); n > 0 {
		d.unknown.seen(ipvs.Bucket(f.Src, c.HashSeed, n), n, d.clk.Now())
	}
	if c.Learn != nil && !*c.Learn {
		return
	}
	// The packet carries the mark the classifier gave it (its bucket's
	// node, or the node of its first packet while in its pin window):
	// pin that, not a recomputed one, so a bucket change between the
	// first packet and the pin cannot split the peer. Without a mark,
	// compute what the kernel chose.
	mark, ok := c.Dataplane().NodeOf(f.Mark)
	if !ok {
		mark = unknownMark(t, f.Src, c.HashSeed)
	}
	if mark == 0 {
		return
	}
	if d.shared != nil && !d.shared.IsLeader() {
		// Every director hashed the peer to the same node; the elected
		// one pins it.
		if err := d.shared.RequestLearn(f.Src, mark); err != nil {
			d.log.Warn("ask the elected director to learn a peer", "peer", f.Src, "err", err)
		}
		return
	}
	if err := d.Learn(f.Src, mark); err != nil {
		d.log.Warn("learn peer", "peer", f.Src, "err", err)
		return
	}
	d.log.Info("learned peer from its first packet", "peer", f.Src, "proto", f.Proto, "port", f.DstPort, "mark", mark)
}

// Learn pins a peer seen in its first IKE or ESP packet into the table, on
// the node the kernel's hash sent it to, so later packets (and the other
// director) follow the first. Peers already in the table are left alone.
func (d *Daemon) Learn(peer netip.Addr, mark uint16) error {
	if err := d.writable(); err != nil {
		return fmt.Errorf("learn peer %s: %w", peer, err)
	}
	a, err := d.st.Do(func(t *affinity.Table) ([]affinity.Change, error) {
		if _, known := t.LookupPeer(peer); known {
			return nil, nil
		}
		n, ok := t.NodeByMark(mark)
		if !ok {
			return nil, fmt.Errorf("learn peer %s: no node has mark %d", peer, mark)
		}
		tu := &affinity.Tunnel{ID: affinity.LearnedPrefix + peer.String(), Peer: peer, Node: n.Name, Learned: true}
		return []affinity.Change{{Kind: affinity.PutTunnel, Tunnel: tu, Reason: "learned from first packet"}}, nil
	})
	if err != nil {
		var be *affinity.BatchError
		if errors.As(err, &be) {
			return fmt.Errorf("learn peer %s: %w", peer, err)
		}
		return err
	}
	if len(a.Changes) == 0 {
		return nil // pinned meanwhile (by the other director, say)
	}
	d.statMu.Lock()
	d.stat.Learned++
	d.statMu.Unlock()
	d.m.pins.Inc()
	return nil
}

// kernelElements returns the peer, subnet and node elements the kernel
// holds as of the last successful reconcile.
func (d *Daemon) kernelElements() (peers, subnets, nodes int) {
	d.statMu.Lock()
	defer d.statMu.Unlock()
	return d.elements.peers, d.elements.subnets, d.elements.nodes
}
