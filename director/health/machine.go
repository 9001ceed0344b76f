package health

import (
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/tunneldirector/tunneldirector/affinity"
)

// Clock is the machine's time source. It is deliberately only Now, so that
// any clock (the real one, a test's manual clock, the simulator's virtual
// one) satisfies it.
type Clock interface {
	Now() time.Time
}

type realClock struct{}

func (realClock) Now() time.Time { return time.Now() }

// Node is a node as the table holds it, with the durable health record
// stored beside it.
type Node struct {
	Name string
	// Addr is the inside address the checks go to.
	Addr netip.Addr
	// State is the table's state: active, draining or down.
	State affinity.NodeState
	// Record is the health record stored with the node.
	Record Record
}

// Record is the durable part of a node's health: what a restarted
// director or a new master must continue. It is the record the table
// stores with the node (affinity.NodeHealth, Node.Health): the daemon
// stores it in the same transaction as the node state change a Decision
// carries, and replicates it with the table. Record.AfterOperator is the
// rule for operator actions: any state set by hand clears it.
type Record = affinity.NodeHealth

// Decision is what the master's health checks decided about one node. The
// daemon applies a down exactly as `node down` (the node's tunnels move),
// an up as `node up` (nothing moves back), with Reason in the change, and
// stores Record with it in the same transaction.
type Decision struct {
	Node   string
	State  affinity.NodeState // NodeDown or NodeActive
	Reason string
	At     time.Time
	Record Record
}

func (d Decision) String() string {
	return fmt.Sprintf("node %s %s: %s", d.Node, d.State, d.Reason)
}

// Round is the result of one round of a node's checks, as the Monitor's
// probers deliver it. The heartbeat check is not in it: the machine
// evaluates heartbeats itself when the round arrives.
type Round struct {
	Node       string
	Start, End time.Time
	Checks     []CheckResult
}

// CheckResult is the outcome of one check of a round.
type CheckResult struct {
	Kind string `json:"kind"`
	OK   bool   `json:"ok"`
	// Err says why the check failed ("timeout", "exit status 1").
	Err string `json:"error,omitempty"`
	// Detail says how it passed ("INVALID_KE_PAYLOAD (group 31)").
	Detail  string        `json:"detail,omitempty"`
	Latency time.Duration `json:"latency_ns,omitempty"`
}

func (c CheckResult) String() string {
	if c.OK {
		if c.Detail != "" {
			return c.Kind + ": " + c.Detail
		}
		return c.Kind + ": ok"
	}
	return c.Kind + ": " + c.Err
}

// Counters count what the machine did since it started.
type Counters struct {
	Rounds      uint64 `json:"rounds"`
	Failed      uint64 `json:"failed_rounds"`
	NotCounted  uint64 `json:"rounds_not_counted"`
	Downs       uint64 `json:"downs"`
	Ups         uint64 `json:"ups"`
	Holds       uint64 `json:"holds"`
	HeldUps     uint64 `json:"ups_held"`
	PanicDowns  uint64 `json:"downs_suppressed_panic"`
	LinkDowns   uint64 `json:"downs_suppressed_link"`
	Panics      uint64 `json:"panics"`
	ApplyErrors uint64 `json:"apply_errors"`
}

type nodeState struct {
	Node
	p            Params
	okRun        int
	failRun      int
	last         []CheckResult
	lastAt       time.Time
	lastErr      string
	lastErrAt    time.Time
	lastHB       time.Time
	heartbeatSet bool
	pending      string
}

// Machine is the health state machine of one director: per node rise and
// fall counts, flap damping and hold-down, and for the farm the panic
// threshold, the inside link and the role. It is stepped one event at a
// time (SetNodes, Round, Link, Role, Heartbeat, SetConfig) by one
// goroutine, reads time only from its Clock, and hands every decision to
// apply at once, synchronously: a decision whose apply fails is not
// recorded and is taken again at the next step.
type Machine struct {
	cfg   Config
	clock Clock
	apply func(Decision) error
	log   *slog.Logger

	master bool
	linkUp bool
	linkAt time.Time // the last change of linkUp
	// settleFrom is when the view last recovered (link up, panic over):
	// failures starting within cfg.Settle after it are not counted.
	settleFrom time.Time
	rev        uint64
	nodes      map[string]*nodeState
	sorted     []*nodeState // the nodes by name, rebuilt by SetNodes
	panicked   bool
	panicMsg   string
	panicAt    time.Time
	count      Counters
}

// NewMachine returns a machine with no nodes, as a backup with the inside
// link up. apply receives the decisions (only while master).
func NewMachine(cfg Config, clock Clock, apply func(Decision) error, log *slog.Logger) *Machine {
	if clock == nil {
		clock = realClock{}
	}
	if log == nil {
		log = slog.Default()
	}
	return &Machine{cfg: cfg, clock: clock, apply: apply, log: log, linkUp: true, nodes: map[string]*nodeState{}}
}

// SetConfig replaces the configuration (a reload); counts are kept.
func (m *Machine) SetConfig(cfg Config) {
	m.cfg = cfg
	for _, n := range m.nodes {
		n.p = cfg.For(n.Name)
	}
	m.evaluate()
}

// SetNodes replaces the node list with the table's, at table revision rev
// (a snapshot older than one already applied is ignored). A node whose
// state or address changed by anything but this machine's own decision
// (the operator, the master's replicated decision) starts counting afresh.
func (m *Machine) SetNodes(rev uint64, nodes []Node) {
	if rev < m.rev {
		return
	}
	m.rev = rev
	now := m.clock.Now()
	seen := make(map[string]bool, len(nodes))
	for _, in := range nodes {
		seen[in.Name] = true
		if in.State != affinity.NodeDown {
			in.Record.Down = false
		}
		n, ok := m.nodes[in.Name]
		if !ok {
			n = &nodeState{lastHB: now}
			m.nodes[in.Name] = n
		} else if n.State != in.State || n.Addr != in.Addr {
			n.okRun, n.failRun = 0, 0
		}
		n.Node = in
		n.p = m.cfg.For(in.Name)
	}
	for name := range m.nodes {
		if !seen[name] {
			delete(m.nodes, name)
		}
	}
	m.sorted = m.sorted[:0]
	for _, n := range m.nodes {
		m.sorted = append(m.sorted, n)
	}
	sort.Slice(m.sorted, func(i, j int) bool { return m.sorted[i].Name < m.sorted[j].Name })
	m.evaluate()
}

// Role sets whether this director is the master. Only the master decides;
// a backup runs the same checks and shows what it would do. A new master
// decides at once on what its own checks saw, with the records it holds
// (the old master's, by replication).
func (m *Machine) Role(master bool) {
	if master == m.master {
		return
	}
	m.master = master
	if master {
		// Agents report heartbeats to the master: give them max_age to
		// find the new one before their silence counts.
		now := m.clock.Now()
		for _, n := range m.nodes {
			if n.lastHB.Before(now) {
				n.lastHB = now
			}
		}
	}
	m.log.Info("health: role", "master", master)
	m.evaluate()
}

// Link reports the director's inside interface up or down. While it is
// down nothing moves; rounds that overlap a down period are not counted,
// nor failed rounds that start within settle after it came back, and
// counts start afresh, because failures seen around a broken link say
// nothing about the nodes.
func (m *Machine) Link(up bool) {
	if up == m.linkUp {
		return
	}
	m.linkUp = up
	m.linkAt = m.clock.Now()
	if up {
		m.settleFrom = m.linkAt
	}
	for _, n := range m.nodes {
		n.okRun, n.failRun = 0, 0
	}
	if up {
		m.log.Warn("health: inside link up again: counting checks afresh")
	} else {
		m.log.Error("health: inside link down: moving nothing until it is back")
	}
	m.evaluate()
}

// Heartbeat records a heartbeat from the node's agent.
func (m *Machine) Heartbeat(node string) {
	if n, ok := m.nodes[node]; ok {
		n.lastHB = m.clock.Now()
		n.heartbeatSet = true
	}
}

// Round counts one round of a node's checks and decides what follows.
func (m *Machine) Round(r Round) {
	n, ok := m.nodes[r.Node]
	if !ok {
		return
	}
	checks := slices.Clone(r.Checks)
	if n.p.Has(CheckHeartbeat) {
		checks = append(checks, m.heartbeat(n, r.End))
	}
	pass := len(checks) > 0
	var failed []string
	for _, c := range checks {
		if !c.OK {
			pass = false
			failed = append(failed, c.String())
		}
	}
	n.last, n.lastAt = checks, r.End
	m.count.Rounds++
	if !pass {
		m.count.Failed++
		n.lastErr, n.lastErrAt = strings.Join(failed, ", "), r.End
	}
	settling := !m.settleFrom.IsZero() && r.Start.Sub(m.settleFrom) < m.cfg.Settle
	if !m.linkUp || r.Start.Before(m.linkAt) || (!pass && settling) {
		m.count.NotCounted++
		return
	}
	if pass {
		n.okRun++
		n.failRun = 0
	} else {
		n.failRun++
		n.okRun = 0
	}
	m.evaluate()
}

func (m *Machine) heartbeat(n *nodeState, at time.Time) CheckResult {
	c := CheckResult{Kind: CheckHeartbeat}
	age := at.Sub(n.lastHB)
	switch {
	case age <= n.p.Heartbeat.MaxAge:
		c.OK = true
		if n.heartbeatSet {
			c.Detail = fmt.Sprintf("%s ago", age.Round(time.Millisecond))
		} else {
			c.Detail = "waiting for the first heartbeat"
		}
	case !n.heartbeatSet:
		c.Err = fmt.Sprintf("no heartbeat in %s", age.Round(time.Second))
	default:
		c.Err = fmt.Sprintf("last heartbeat %s ago (max_age %s)", age.Round(time.Second), n.p.Heartbeat.MaxAge)
	}
	return c
}

// managed reports whether health decides about the node: the operator
// has not drained it or taken it down by hand.
func managed(n *nodeState) bool {
	return n.State == affinity.NodeActive || (n.State == affinity.NodeDown && n.Record.Down)
}

// evaluate takes every decision that is due and allowed.
func (m *Machine) evaluate() {
	if !m.cfg.Enabled {
		// Checks off (a reload): counts from before decide nothing.
		for _, n := range m.sorted {
			n.pending = ""
		}
		return
	}
	now := m.clock.Now()
	nodes := m.sorted
	var total, failing int
	for _, n := range nodes {
		if !managed(n) {
			continue
		}
		total++
		if n.Record.Down || n.failRun > 0 {
			failing++
		}
	}
	panicNow := total > 0 && float64(failing) > m.cfg.MaxDownFraction*float64(total)
	if panicNow != m.panicked {
		m.panicked = panicNow
		if panicNow {
			m.panicAt = now
			m.panicMsg = fmt.Sprintf("%d of %d nodes failing or down by health, more than max_down_fraction %g: moving nothing, the director's own view may be broken", failing, total, m.cfg.MaxDownFraction)
			m.count.Panics++
			m.log.Error("health: PANIC: "+m.panicMsg, "failing", failing, "nodes", total)
		} else {
			// The nodes that failed together recover one by one: count
			// afresh after settle, so the last ones are not moved
			// because the first ones ended the panic.
			m.log.Warn("health: panic over: counting checks afresh", "failing", failing, "nodes", total, "lasted", now.Sub(m.panicAt), "settle", m.cfg.Settle)
			m.panicMsg = ""
			m.settleFrom = now
			for _, n := range nodes {
				n.failRun = 0
			}
		}
	} else if panicNow {
		m.panicMsg = fmt.Sprintf("%d of %d nodes failing or down by health, more than max_down_fraction %g: moving nothing, the director's own view may be broken", failing, total, m.cfg.MaxDownFraction)
	}
	for _, n := range nodes {
		prev := n.pending
		n.pending = ""
		if !managed(n) {
			continue
		}
		switch {
		case n.State == affinity.NodeActive && n.failRun >= n.p.Fall:
			reason := fmt.Sprintf("health: %s %d/%d", n.lastErr, n.failRun, n.p.Fall)
			switch {
			case !m.master:
				n.pending = "down due: the master decides"
			case !m.linkUp:
				n.pending = "down due, not moved: inside link down"
				if prev != n.pending {
					m.count.LinkDowns++
				}
			case panicNow:
				n.pending = "down due, not moved: panic"
				if prev != n.pending {
					m.count.PanicDowns++
					m.log.Error("health: node failing but not moved (panic)", "node", n.Name, "reason", reason)
				}
			default:
				m.down(n, now, reason)
			}
		case n.State == affinity.NodeDown && n.okRun >= n.p.Rise:
			switch {
			case now.Before(n.Record.HoldUntil):
				n.pending = "up due, held down until " + n.Record.HoldUntil.Format(time.RFC3339)
				if prev != n.pending {
					m.count.HeldUps++
				}
			case !m.master:
				n.pending = "up due: the master decides"
			default:
				m.up(n, now, fmt.Sprintf("health: passing %d/%d (%s)", n.okRun, n.p.Rise, summary(n.last)))
			}
		}
	}
}

func summary(checks []CheckResult) string {
	parts := make([]string, len(checks))
	for i, c := range checks {
		parts[i] = c.String()
	}
	return strings.Join(parts, ", ")
}

func (m *Machine) down(n *nodeState, now time.Time, reason string) {
	f := m.cfg.Flap
	rec := n.Record
	rec.Down, rec.Since, rec.Reason = true, now, reason
	var downs []time.Time
	for _, t := range rec.Downs {
		if now.Sub(t) < f.Window {
			downs = append(downs, t)
		}
	}
	rec.Downs = append(downs, now)
	held := false
	if len(rec.Downs) > f.Count {
		if !rec.HoldUntil.IsZero() && now.Sub(rec.HoldUntil) > f.HoldMax {
			rec.Holds = 0
		}
		hold := f.Hold
		for i := 0; i < rec.Holds && hold < f.HoldMax; i++ {
			hold *= 2
		}
		hold = min(hold, f.HoldMax)
		rec.HoldUntil = now.Add(hold)
		rec.Holds++
		held = true
	}
	d := Decision{Node: n.Name, State: affinity.NodeDown, Reason: reason, At: now, Record: rec}
	if !m.commit(n, d) {
		return
	}
	m.count.Downs++
	if held {
		m.count.Holds++
		m.log.Warn("health: node down and held (flapping)", "node", n.Name, "reason", reason,
			"downs", len(rec.Downs), "window", f.Window, "until", rec.HoldUntil)
	} else {
		m.log.Warn("health: node down", "node", n.Name, "reason", reason)
	}
}

func (m *Machine) up(n *nodeState, now time.Time, reason string) {
	rec := n.Record
	rec.Down, rec.Since, rec.Reason = false, now, ""
	d := Decision{Node: n.Name, State: affinity.NodeActive, Reason: reason, At: now, Record: rec}
	if !m.commit(n, d) {
		return
	}
	m.count.Ups++
	m.log.Info("health: node up", "node", n.Name, "reason", reason)
}

func (m *Machine) commit(n *nodeState, d Decision) bool {
	if err := m.apply(d); err != nil {
		m.count.ApplyErrors++
		n.pending = "decision not applied: " + err.Error()
		m.log.Error("health: decision not applied; retrying at the next round", "decision", d.String(), "err", err)
		return false
	}
	n.State, n.Record = d.State, d.Record
	// A down node needs rise passing rounds from here on, an up one
	// fall failing rounds.
	n.okRun, n.failRun = 0, 0
	return true
}
