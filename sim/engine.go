package sim

import (
	"cmp"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"runtime/debug"
	"slices"
	"time"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/internal/clock"
	"github.com/tunneldirector/tunneldirector/store"
)

// Epoch is the virtual clock's zero: tables stamp changes with it plus the
// virtual time, so stored times are the same on every run.
var Epoch = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

// Options configures Run besides the scenario.
type Options struct {
	// Dir holds the two directors' stores; empty means a temporary
	// folder (on /dev/shm when there is one) removed afterwards.
	Dir string
	// Progress, when set, is called now and then with the virtual time
	// reached and the run's length.
	Progress func(done, total time.Duration)
	// NoCompare skips the strategy comparison.
	NoCompare bool
}

// tunnel is what the simulator knows about a live tunnel: where its SAs
// are (the node its peer established on), independent of the table.
type tunnel struct {
	id     string
	peer   netip.Addr
	probes []netip.Addr // one address in each protected subnet
	idx    int          // position in engine.live
	// sa is the mark of the node holding the SAs; 0 while the tunnel
	// waits for its first commit.
	sa     uint16
	saNode string
	// reUntil is when a moved tunnel is back up on its new node; zero
	// when it is established.
	reUntil time.Duration
	movedBy int // index of the event that last moved it, -1 for none
	pending bool
	// darkEvent is the node-dies event that left the tunnel dark (its
	// SAs died with the node), -1 while it is not; since when.
	darkEvent int
	darkSince time.Duration
	// unpinned: an unknown peer whose first packet the kernel steered to
	// sa, not yet in the table; its packets follow its bucket until the
	// pin, at pinAt. wait is its position in engine.waiting.
	unpinned bool
	pinAt    time.Duration
	wait     int
	// conn is the node mark of the peer's IPVS connection entry for IKE,
	// when the model keeps entries (0: none yet).
	conn uint16
}

type engine struct {
	s     *Scenario
	steps []Step
	end   time.Duration
	// clk is the virtual clock: its timers are the simulation's internal
	// events, fired one at a time by run. now is the virtual time the
	// engine is at (the clock's, minus Epoch; set back to the end for
	// the final report).
	clk      *clock.Manual
	now      time.Duration
	draining bool
	pair     Pair
	// log is the engine's cursor on the master's change log: where it
	// learns what the real table decided (see follow).
	log      store.Cursor
	logStore *store.Store
	// hs plays the director's health checks (node-dies, node-revives).
	hs *healthSim

	tunnels map[string]*tunnel
	live    []*tunnel
	marks   map[string]uint16 // node name -> mark, from committed changes
	names   map[uint16]string
	added   int // nodes added so far, for their addresses

	pendingUp   []*tunnel
	pendingUpTu map[string]affinity.Tunnel
	pendingDown []string
	touched     []*tunnel

	// The kernel's steering of unknown peers, and the peers it steered
	// that wait for their pin (in arrival order).
	kernel      *unknownPeers
	unknownOn   bool
	kernelDirty bool
	waiting     []*tunnel
	learnTu     map[string]affinity.Tunnel

	cur      int // index of the event being carried out, -1 between events
	revTime  map[uint64]time.Duration
	rep      *Report
	series   map[string][]int
	sampleAt []time.Duration
	lagSum   time.Duration
	lagN     int
	err      error
}

// After runs fn d from now on the virtual clock.
func (e *engine) After(d time.Duration, fn func()) { e.clk.AfterFunc(d, fn) }

// Run plays a scenario's workload (generated from the scenario, or a
// replayed trace given as steps) through two real directors and returns
// the report.
func Run(s *Scenario, steps []Step, o Options) (*Report, error) {
	check := *s
	if steps != nil {
		// A replay's events come from its trace.
		check.Events = nil
	}
	if err := check.Validate(); err != nil {
		return nil, err
	}
	if steps == nil {
		var err error
		if steps, err = Workload(s); err != nil {
			return nil, err
		}
	}
	dir := o.Dir
	if dir == "" {
		base := ""
		if fi, err := os.Stat("/dev/shm"); err == nil && fi.IsDir() {
			base = "/dev/shm" // bbolt commits are fsyncs: memory makes them cheap
		}
		d, err := os.MkdirTemp(base, "tunneldirector-sim-")
		if err != nil {
			return nil, fmt.Errorf("simulate: %w", err)
		}
		defer os.RemoveAll(d)
		dir = d
	}
	e := &engine{
		s: s, steps: steps, end: s.Duration, cur: -1, clk: clock.NewManual(Epoch),
		tunnels: map[string]*tunnel{}, marks: map[string]uint16{}, names: map[uint16]string{},
		pendingUpTu: map[string]affinity.Tunnel{},
		revTime:     map[uint64]time.Duration{},
		series:      map[string][]int{},
		rep:         newReport(s, steps),
		learnTu:     map[string]affinity.Tunnel{},
	}
	kernel, err := newUnknownPeers(s.Unknown)
	if err != nil {
		return nil, err
	}
	e.kernel = kernel
	for i := range steps {
		e.unknownOn = e.unknownOn || steps[i].Unknown
	}
	if e.unknownOn {
		e.rep.Unknown = &UnknownReport{Dataplane: kernel.name(), Buckets: s.Unknown.Buckets}
	}
	e.end = runEnd(steps, s.Duration)
	newPair := NewJournalPair
	if s.Replication.Impl == ReplDirector {
		newPair = NewDirectorPair
	}
	pair, err := newPair(PairOptions{
		Dir:            dir,
		Table:          affinity.Options{Epsilon: s.Epsilon, Choices: s.Choices, Now: func() time.Time { return Epoch.Add(e.now) }},
		JournalChanges: s.Replication.JournalChanges,
		Latency:        s.Replication.Latency,
		Retransmit:     s.Replication.Retransmit,
		Loss:           s.Replication.Loss,
		Seed:           s.Seed,
		Applied:        e.applied,
	}, e.clk)
	if err != nil {
		return nil, err
	}
	defer pair.Close()
	e.pair = pair
	defer func() {
		if e.log != nil {
			e.log.Close()
		}
	}()
	// The run holds every tunnel for its whole length: collecting often
	// only burns the second core.
	defer debug.SetGCPercent(debug.SetGCPercent(400))
	e.rep.Replication.Mode = pair.Name()
	e.hs = newHealthSim(e)
	e.follow() // the cursor starts before the first commit
	if err := e.run(o); err != nil {
		return nil, err
	}
	if !o.NoCompare {
		if e.rep.Compare, err = Compare(steps, s); err != nil {
			return nil, err
		}
	}
	return e.rep, nil
}

func (e *engine) run(o Options) error {
	e.periodic(e.s.CommitEvery, func() { e.commitPending() })
	e.periodic(e.s.FullCheckEvery, func() { e.sweep() })
	e.periodic(e.s.SampleEvery, func() { e.sample() })
	if e.unknownOn && e.kernel.buckets != nil {
		e.periodic(e.kernel.buckets.Options().Interval, func() {
			if e.kernelDirty {
				e.updateKernel()
			}
		})
	}
	next := 0
	lastProgress := time.Duration(-1)
	for e.err == nil {
		// Inputs go before internal events of the same instant: a tunnel
		// that comes up at a commit tick is in that commit.
		at, pending := e.clk.Next()
		if next < len(e.steps) && (!pending || Epoch.Add(e.steps[next].At).Compare(at) <= 0) {
			st := &e.steps[next]
			next++
			e.now = st.At
			e.clk.Set(Epoch.Add(st.At))
			e.step(st)
			e.follow()
			continue
		}
		if !pending || at.Sub(Epoch) > e.end {
			break
		}
		e.now = at.Sub(Epoch)
		e.clk.Step()
		e.follow()
		if o.Progress != nil && e.now-lastProgress >= time.Hour {
			lastProgress = e.now
			o.Progress(e.now, e.end)
		}
	}
	if e.err != nil {
		return e.err
	}
	e.now = e.end
	e.commitPending()
	e.drain()
	e.sweep()
	e.sample()
	for _, x := range e.live {
		e.lit(x) // dark until the end
	}
	e.finish()
	if o.Progress != nil {
		o.Progress(e.end, e.end)
	}
	return nil
}

func (e *engine) periodic(every time.Duration, fn func()) {
	var tick func()
	tick = func() {
		if e.draining {
			return
		}
		fn()
		e.After(every, tick)
	}
	e.After(0, tick)
}

// drain lets what is under way at the end finish (replication in flight,
// tunnels re-establishing), without new commits, sweeps or samples, for
// at most an hour of virtual time.
func (e *engine) drain() {
	e.draining = true
	for {
		at, ok := e.clk.Next()
		if !ok || at.Sub(Epoch) > e.end+time.Hour {
			break
		}
		e.now = at.Sub(Epoch)
		e.clk.Step()
		e.follow()
	}
	e.now = e.end
}

func (e *engine) master() *store.Store { return e.pair.Master() }

// follow reads the master's change log after the engine committed to it.
// That is where the simulator learns what the real table decided: a new
// tunnel's owner is where its peer establishes, and a changed owner moves
// the tunnel. After a failover the cursor moves to the new master, at
// its revision.
func (e *engine) follow() {
	if m := e.master(); e.logStore != m {
		if e.log != nil {
			e.log.Close()
		}
		cur, err := m.Changes(m.Revision())
		if err != nil {
			e.err = fmt.Errorf("simulate at %s: follow the master's change log: %w", FormatDuration(e.now), err)
			return
		}
		e.log, e.logStore = cur, m
		return
	}
	for {
		b, ok, err := e.log.Next()
		if err != nil {
			e.err = fmt.Errorf("simulate at %s: read the master's change log: %w", FormatDuration(e.now), err)
			return
		}
		if !ok {
			break
		}
		e.committed(&b)
	}
	e.hs.sync()
}

// committed takes one batch the master committed.
func (e *engine) committed(a *store.Batch) {
	cs, err := a.Decoded()
	if err != nil {
		e.err = fmt.Errorf("simulate at %s: %w", FormatDuration(e.now), err)
		return
	}
	for i := range cs {
		c := &cs[i]
		if c.Kind == affinity.PutNode {
			e.marks[c.Node.Name] = c.Node.Mark
			e.names[c.Node.Mark] = c.Node.Name
		}
		if c.Kind == affinity.PutNode || c.Kind == affinity.DeleteNode {
			e.hs.dirty = true
		}
	}
	e.revTime[a.Revision] = e.now
	e.rep.Totals.Commits++
	e.kernelDirty = true
	for i := range cs {
		c := &cs[i]
		if c.Kind != affinity.PutTunnel {
			continue
		}
		x := e.tunnels[c.Tunnel.ID]
		if x == nil {
			continue
		}
		switch {
		case x.sa == 0:
			x.sa, x.saNode = e.marks[c.Tunnel.Node], c.Tunnel.Node
			x.pending = false
			e.touched = append(e.touched, x)
			e.hs.darken(x) // placed on a node that died unnoticed
		case c.Tunnel.Node != x.saNode:
			e.moved(x)
		}
	}
	e.pair.Committed()
}

// moved starts a moved tunnel's re-establishment: its SAs are on the old
// node until the peer comes back through the director to the new one.
func (e *engine) moved(x *tunnel) {
	e.rep.Traffic.Disruptions++
	if e.cur >= 0 {
		ev := &e.rep.Events[e.cur]
		ev.Moves++
		if ev.from == nil {
			ev.from = map[string]int{}
		}
		ev.from[x.saNode]++
	} else {
		e.rep.Totals.UnattributedMoves++
	}
	x.movedBy = e.cur
	e.reestablish(x)
}

// reestablish brings a tunnel back up after director.reestablish, where
// the table sends its peer then.
func (e *engine) reestablish(x *tunnel) {
	x.reUntil = e.now + e.s.Reestablish
	until := x.reUntil
	e.After(e.s.Reestablish, func() {
		if e.tunnels[x.id] != x || x.reUntil != until {
			return // gone, or moved again since
		}
		x.reUntil = 0
		if m, ok := e.master().Table().PeerMark(x.peer); ok {
			x.sa, x.saNode = m, e.names[m]
		}
		if e.hs.dead[x.saNode] {
			// Back on a node that is dead: still dark.
			e.hs.darken(x)
		} else {
			e.lit(x)
		}
		if x.movedBy >= 0 {
			ev := &e.rep.Events[x.movedBy]
			ev.settled = max(ev.settled, e.now)
		}
		e.check(x)
	})
}

func (e *engine) applied(rev uint64) {
	for r, at := range e.revTime {
		if r <= rev {
			lag := e.now - at
			e.lagSum += lag
			e.lagN++
			e.rep.Replication.MaxLagMs = max(e.rep.Replication.MaxLagMs, ms(lag))
			delete(e.revTime, r)
		}
	}
	for i := range e.rep.Events {
		ev := &e.rep.Events[i]
		if ev.rev != 0 && ev.rev <= rev && ev.replicated < 0 {
			ev.replicated = e.now
		}
	}
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// step carries out one input.
func (e *engine) step(st *Step) {
	switch st.Kind {
	case StepTunnelUp:
		tu := st.Tunnel
		if _, dup := e.tunnels[tu.ID]; dup {
			e.rep.Totals.Refused++
			e.rep.addRefusal(e.now, tu.ID, "tunnel id already up")
			return
		}
		x := &tunnel{id: tu.ID, peer: tu.Peer, idx: len(e.live), movedBy: -1, pending: true, darkEvent: -1}
		for _, p := range tu.Subnets {
			x.probes = append(x.probes, p.Addr().Next())
		}
		if st.Unknown {
			e.arrive(x, tu)
			return
		}
		e.tunnels[tu.ID] = x
		e.live = append(e.live, x)
		e.pendingUp = append(e.pendingUp, x)
		e.pendingUpTu[tu.ID] = tu
		e.rep.Totals.Arrivals++
	case StepEnd:
	case StepTunnelDown:
		x := e.tunnels[st.Tunnel.ID]
		if x == nil {
			return // refused when it came up, or never up
		}
		e.drop(x)
		e.rep.Totals.Departures++
		if x.unpinned {
			e.unwait(x)
			return
		}
		if x.pending {
			delete(e.pendingUpTu, x.id)
			return
		}
		e.pendingDown = append(e.pendingDown, x.id)
	default:
		e.event(st.Event)
	}
}

func (e *engine) drop(x *tunnel) {
	e.lit(x) // a tunnel that ends is dark no longer
	delete(e.tunnels, x.id)
	last := e.live[len(e.live)-1]
	e.live[x.idx] = last
	last.idx = x.idx
	e.live = e.live[:len(e.live)-1]
}

// commitPending commits the tunnels that came up or went down since the
// last commit as one transaction, the director's group commit. When the
// batch is refused (no node can take a tunnel), each change is committed
// on its own and the refused ones are reported.
func (e *engine) commitPending() {
	if len(e.pendingUp) == 0 && len(e.pendingDown) == 0 {
		return
	}
	batch := make([]affinity.Change, 0, len(e.pendingUp)+len(e.pendingDown))
	for _, id := range e.pendingDown {
		batch = append(batch, affinity.Change{Kind: affinity.DeleteTunnel, Name: id, Reason: "tunnel down"})
	}
	ups := e.pendingUp[:0:0]
	for _, x := range e.pendingUp {
		tu, ok := e.pendingUpTu[x.id]
		if !ok {
			continue
		}
		ups = append(ups, x)
		batch = append(batch, affinity.Change{Kind: affinity.PutTunnel, Tunnel: &tu, Reason: "tunnel up"})
	}
	e.pendingUp, e.pendingDown = e.pendingUp[:0], e.pendingDown[:0]
	clear(e.pendingUpTu)
	_, err := e.master().Commit(batch)
	e.follow()
	if err != nil {
		var be *affinity.BatchError
		if !errors.As(err, &be) {
			e.err = fmt.Errorf("simulate at %s: commit: %w", FormatDuration(e.now), err)
			return
		}
		for i := range batch {
			_, err := e.master().Commit(batch[i : i+1])
			e.follow()
			if err == nil || batch[i].Kind == affinity.DeleteTunnel {
				continue // a tunnel the table lost (a crash) need not be deleted
			}
			if !errors.As(err, &be) {
				e.err = fmt.Errorf("simulate at %s: commit: %w", FormatDuration(e.now), err)
				return
			}
			id := batch[i].Tunnel.ID
			e.rep.Totals.Refused++
			e.rep.addRefusal(e.now, id, be.Errors[0].Err.Error())
			if x := e.tunnels[id]; x != nil {
				e.drop(x)
			}
		}
	}
	for _, x := range ups {
		if e.tunnels[x.id] == x && x.pending {
			// Committed but not reported: the table already held it.
			x.pending = false
		}
	}
	e.checkTouched()
}

func (e *engine) checkTouched() {
	for _, x := range e.touched {
		if e.tunnels[x.id] == x {
			e.check(x)
		}
	}
	e.touched = e.touched[:0]
}

// check sends the tunnel's sample packets through the master's table: the
// peer's packets to the VIP by peer address, return traffic by an address
// in each protected subnet. Every packet must reach the node holding the
// SAs unless the tunnel is re-establishing after a move.
//
// A peer not yet pinned follows its bucket. With connection entries
// modelled, the peer's IKE follows the IPVS connection entry its first IKE
// packet made (or that this packet makes), while ESP follows the mark.
func (e *engine) check(x *tunnel) {
	if x.pending || x.reUntil != 0 || x.sa == 0 {
		return
	}
	if x.unpinned {
		m := e.kernel.mark(x.peer)
		e.rep.Traffic.Packets++
		if m != x.sa {
			e.rep.Traffic.PinWindow++
			e.violation(x, "peer "+x.peer.String()+" -> VIP before its pin (its bucket changed)", m, m != 0)
		}
		return
	}
	t := e.master().Table()
	m, ok := t.PeerMark(x.peer)
	e.rep.Traffic.Packets++
	if !ok || m != x.sa {
		e.violation(x, "peer "+x.peer.String()+" -> VIP", m, ok)
	}
	if e.s.Dataplane.ConnectionEntries && ok {
		if x.conn == 0 {
			x.conn = m
		}
		e.rep.Traffic.Packets++
		if x.conn != x.sa {
			e.rep.Traffic.ConnEntry++
			e.violation(x, "peer "+x.peer.String()+" IKE -> VIP (IPVS connection entry)", x.conn, true)
		}
	}
	for _, a := range x.probes {
		m, ok := t.SubnetMark(a)
		e.rep.Traffic.Packets++
		if !ok || m != x.sa {
			e.violation(x, "VIP -> "+a.String(), m, ok)
		}
	}
}

func (e *engine) violation(x *tunnel, packet string, got uint16, ok bool) {
	e.rep.Traffic.Violations++
	if e.cur >= 0 {
		e.rep.Events[e.cur].Violations++
	}
	if len(e.rep.Traffic.Examples) >= maxExamples {
		return
	}
	g := "(no entry)"
	if ok {
		g = e.names[got]
	}
	e.rep.Traffic.Examples = append(e.rep.Traffic.Examples, Violation{
		At: FormatDuration(e.now), Tunnel: x.id, Packet: packet, SAsOn: x.saNode, Reached: g,
	})
}

const maxExamples = 20

func (e *engine) sweep() {
	for _, x := range e.live {
		e.check(x)
	}
	e.rep.Traffic.Sweeps++
}

// sample records the tunnels per node and the balance over active nodes.
func (e *engine) sample() {
	t := e.master().Table()
	counts := t.Counts()
	var active []float64
	for _, n := range t.Nodes() {
		if _, ok := e.series[n.Name]; !ok {
			e.series[n.Name] = make([]int, len(e.sampleAt))
		}
		if n.State == affinity.NodeActive {
			active = append(active, load(counts[n.Name], n.Weight))
		}
	}
	for name, s := range e.series {
		e.series[name] = append(s, counts[name])
	}
	e.sampleAt = append(e.sampleAt, e.now)
	e.rep.Balance.add(active)
	behind := int(e.master().Revision()) - int(e.pair.Backup().Revision())
	e.rep.Replication.MaxRevisionsBehind = max(e.rep.Replication.MaxRevisionsBehind, behind)
}

// event carries out a timed event: pending tunnels are committed first,
// then the event's plan is committed through the store, and every live
// tunnel is checked.
func (e *engine) event(ev Event) {
	e.commitPending()
	if ev.At == 0 && ev.Kind == EvNodeAdd {
		// The initial farm, not an event of its life.
		e.addNode(ev)
		return
	}
	r := EventReport{Index: len(e.rep.Events), At: FormatDuration(ev.At), Kind: ev.Kind, Node: ev.Node,
		replicated: -1, start: e.now}
	e.rep.Events = append(e.rep.Events, r)
	e.cur = len(e.rep.Events) - 1
	defer func() { e.cur = -1 }()
	rp := &e.rep.Events[e.cur]
	ideal := 0
	counts := e.master().Table().Counts()
	var err error
	plan := func(fn func(*affinity.Table) (*affinity.Plan, error)) {
		var p *affinity.Plan
		var a *affinity.Applied
		a, err = e.master().Do(func(t *affinity.Table) ([]affinity.Change, error) {
			var perr error
			p, perr = fn(t)
			if perr != nil {
				return nil, perr
			}
			return p.Batch(), nil
		})
		e.follow()
		if p != nil {
			rp.Unplaced = len(p.Unplaced)
			rp.Wanted = p.Wanted
		}
		if a != nil {
			rp.rev = a.Revision
		}
	}
	switch ev.Kind {
	case EvNodeDown:
		ideal = counts[ev.Node] + e.waitingOn(ev.Node)
		plan(func(t *affinity.Table) (*affinity.Plan, error) { return t.PlanNodeState(ev.Node, affinity.NodeDown) })
		e.displaceWaiting(ev.Node)
	case EvNodeUp:
		plan(func(t *affinity.Table) (*affinity.Plan, error) { return t.PlanNodeState(ev.Node, affinity.NodeActive) })
	case EvNodeDrain:
		plan(func(t *affinity.Table) (*affinity.Plan, error) {
			return t.PlanNodeState(ev.Node, affinity.NodeDraining)
		})
	case EvNodeRemove:
		ideal = counts[ev.Node] + e.waitingOn(ev.Node)
		plan(func(t *affinity.Table) (*affinity.Plan, error) { return t.PlanRemoveNode(ev.Node) })
		e.displaceWaiting(ev.Node)
		e.dropEntries(ev.Node)
	case EvNodeAdd:
		err = e.addNode(ev)
	case EvRebalance:
		ideal = -1
		plan(func(t *affinity.Table) (*affinity.Plan, error) { return t.Rebalance(ev.Budget), nil })
		rp.Budget = ev.Budget
	case EvNodeDies:
		ideal = counts[ev.Node]
		e.hs.dies(ev.Node, e.cur)
	case EvNodeRevives:
		e.hs.revives(ev.Node, e.cur)
	case EvLinkLoss:
		e.pair.SetLoss(ev.Loss)
	case EvFailover:
		err = e.failover(ev, rp)
	}
	if ideal >= 0 {
		rp.Ideal = &ideal
	}
	if err != nil {
		rp.Error = err.Error()
	}
	e.updateKernel()
	e.sweep()
}

// dropEntries forgets the IPVS connection entries to a removed node: its
// service is gone with it, and the next packet makes a new entry.
func (e *engine) dropEntries(node string) {
	for _, x := range e.live {
		if x.conn != 0 && e.names[x.conn] == node {
			x.conn = 0
		}
	}
}

func (e *engine) addNode(ev Event) error {
	e.added++
	i := e.added
	n := affinity.Node{Name: ev.Node, Weight: ev.Weight, Capacity: ev.Capacity,
		Addr: netip.AddrFrom4([4]byte{172, 16, byte(i >> 8), byte(i)})}
	a, err := e.master().Commit([]affinity.Change{{Kind: affinity.PutNode, Node: &n, Reason: "node added"}})
	e.follow()
	if err != nil {
		return fmt.Errorf("add node %s: %w", ev.Node, err)
	}
	if e.cur >= 0 {
		e.rep.Events[e.cur].rev = a.Revision
	}
	e.updateKernel()
	return nil
}

// failover hands the master role to the backup and compares the two
// tables' owners for every live tunnel: a takeover must move nothing.
func (e *engine) failover(ev Event, rp *EventReport) error {
	mode := ev.Mode
	if mode == "" {
		mode = Switchover
	}
	rp.Mode = mode
	old := e.master().Table()
	e.follow()
	catchup, err := e.pair.Failover(mode)
	e.follow() // onto the new master's change log
	if err != nil {
		return err
	}
	e.rep.Replication.Failovers++
	// Lag is measured against the master that committed; the old
	// master's revisions mean nothing to the new pair.
	clear(e.revTime)
	rp.replicated = e.now + catchup
	nt := e.master().Table()
	var lost []affinity.Change
	var stale []affinity.Change
	for _, x := range e.live {
		// The new master's IPVS never saw the flows: entries start anew.
		x.conn = 0
		if x.pending || x.unpinned {
			continue // the learner pins waiting peers on the new master
		}
		om, ook := old.PeerMark(x.peer)
		nm, nok := nt.PeerMark(x.peer)
		if ook != nok || om != nm {
			rp.Moves++
			rp.Lost++
		}
		if !nok {
			tu, _ := old.Tunnel(x.id)
			tu.Node = ""
			if x.sa != 0 {
				if n, ok := nt.Node(x.saNode); ok && n.State != affinity.NodeDown {
					tu.Node = x.saNode
				}
			}
			tu.Pinned = tu.Pinned && tu.Node != ""
			lost = append(lost, affinity.Change{Kind: affinity.PutTunnel, Tunnel: &tu, Reason: "relearned after failover"})
		}
	}
	// Packets reach the new master before it relearns what it lost.
	e.sweep()
	nt.EachTunnel(func(tu *affinity.Tunnel) {
		if x := e.tunnels[tu.ID]; x == nil {
			stale = append(stale, affinity.Change{Kind: affinity.DeleteTunnel, Name: tu.ID, Reason: "gone before failover"})
		}
	})
	slices.SortFunc(stale, func(a, b affinity.Change) int { return cmp.Compare(a.Name, b.Name) })
	if fix := append(stale, lost...); len(fix) > 0 {
		a, err := e.master().Commit(fix)
		e.follow()
		if err != nil {
			return fmt.Errorf("failover: relearn %d tunnel(s): %w", len(fix), err)
		}
		rp.rev = a.Revision
		// Relearned tunnels are re-established where the table put them.
		for i := range a.Changes {
			c := &a.Changes[i]
			if c.Kind == affinity.PutTunnel {
				if x := e.tunnels[c.Tunnel.ID]; x != nil && c.Tunnel.Node != x.saNode {
					e.moved(x)
				}
			}
		}
	}
	return nil
}

// finish turns the run's observations into the report's derived numbers.
func (e *engine) finish() {
	r := e.rep
	for i := range r.Events {
		ev := &r.Events[i]
		if ev.Ideal != nil {
			x := ev.Moves - *ev.Ideal
			ev.Excess = &x
		}
		conv := time.Duration(0)
		if ev.settled > 0 {
			conv = ev.settled - ev.start
		}
		if ev.replicated >= 0 {
			conv = max(conv, ev.replicated-ev.start)
			ev.ReplicatedMs = ptrTo(ms(ev.replicated - ev.start))
		}
		ev.Converge = FormatDuration(conv)
		if ev.Dark != nil {
			ev.Dark.finish()
		}
		if ev.Kind == EvNodeDies && ev.DetectedMs == nil {
			// Health moved nothing (a panic): no ideal to compare with.
			ev.Ideal, ev.Excess = nil, nil
		}
		for n, c := range ev.from {
			ev.MovedFrom = append(ev.MovedFrom, NodeCount{Node: n, Tunnels: c})
		}
		slices.SortFunc(ev.MovedFrom, func(a, b NodeCount) int { return cmp.Compare(a.Node, b.Node) })
	}
	if e.lagN > 0 {
		r.Replication.MeanLagMs = round3(ms(e.lagSum) / float64(e.lagN))
	}
	r.Replication.Link = e.pair.Stats()
	r.Replication.FinalMaster = e.master().Revision()
	r.Replication.FinalBackup = e.pair.Backup().Revision()
	r.Replication.Equal = tablesEqual(e.master().Table(), e.pair.Backup().Table())
	r.Health = e.hs.report()
	r.Totals.FinalTunnels = e.master().Table().Len()
	r.Totals.Live = len(e.live)
	if u := r.Unknown; u != nil {
		u.Changes, u.Steps = e.kernel.changes, e.kernel.steps
		if after := r.Totals.Arrivals - r.InitialTunnels; after > 0 {
			u.Share = round3(float64(u.Learned) / float64(after))
		}
	}
	r.Balance.finish()
	names := make([]string, 0, len(e.series))
	for n := range e.series {
		names = append(names, n)
	}
	slices.Sort(names)
	r.Series.AtHours = make([]float64, len(e.sampleAt))
	for i, at := range e.sampleAt {
		r.Series.AtHours[i] = round3(at.Hours())
	}
	for _, n := range names {
		r.Series.Nodes = append(r.Series.Nodes, NodeSeries{Node: n, Tunnels: e.series[n]})
	}
}

func ptrTo[T any](v T) *T { return &v }

// tablesEqual reports whether the backup holds the master's table,
// revision and records: the table's own DiffTo finds nothing to change.
func tablesEqual(master, backup *affinity.Table) bool {
	s := master.Snapshot()
	return s.Revision == backup.Revision() && len(backup.DiffTo(&s, nil)) == 0
}
