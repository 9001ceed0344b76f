package health

import (
	"fmt"
	"net/netip"
	"strings"
	"time"

	"github.com/tunneldirector/tunneldirector/affinity"
)

// Status is the health view of the farm, for `status`, `show nodes` and
// the API.
type Status struct {
	Enabled bool `json:"enabled"`
	// Master: this director decides; a backup only shows its view.
	Master bool `json:"master"`
	// LinkUp is the director's inside interface.
	LinkUp bool `json:"link_up"`
	// Panic, when set, says why nothing moves.
	Panic      string     `json:"panic,omitempty"`
	PanicSince time.Time  `json:"panic_since,omitzero"`
	Nodes      []NodeView `json:"nodes"`
	Counters   Counters   `json:"counters"`
}

// NodeView is one node's health.
type NodeView struct {
	Name    string             `json:"name"`
	Address netip.Addr         `json:"address"`
	State   affinity.NodeState `json:"state"`
	// Operator: the operator set the node's state by hand (drained or
	// down); health does not change it.
	Operator bool `json:"operator,omitempty"`
	// Failing and Fall: failing rounds in a row of the fall that takes it
	// down; Rising and Rise likewise for up.
	Failing int `json:"failing"`
	Fall    int `json:"fall"`
	Rising  int `json:"rising"`
	Rise    int `json:"rise"`
	// Record is the durable record: down by health since, hold.
	Record Record `json:"record"`
	// HeldUntil is set while a hold keeps the node down.
	HeldUntil time.Time `json:"held_until,omitzero"`
	// Checks are the last round's results.
	Checks    []CheckResult `json:"checks,omitempty"`
	LastCheck time.Time     `json:"last_check,omitzero"`
	LastError string        `json:"last_error,omitempty"`
	LastErrAt time.Time     `json:"last_error_at,omitzero"`
	// Latency is the IKE probe's round trip in the last round.
	Latency time.Duration `json:"latency_ns,omitempty"`
	// Pending says why a due decision was not taken (panic, link, hold,
	// backup).
	Pending string `json:"pending,omitempty"`
}

// Node returns the view of the named node.
func (s *Status) Node(name string) (NodeView, bool) {
	for _, v := range s.Nodes {
		if v.Name == name {
			return v, true
		}
	}
	return NodeView{}, false
}

// Health is the HEALTH column of `show nodes`: up, failing 1/2, down
// since, held down until, rising, the operator's state, and the last error.
func (v NodeView) Health() string {
	var s string
	switch {
	case v.Operator:
		s = v.State.String() + " (operator)"
	case !v.HeldUntil.IsZero():
		s = "held down until " + v.HeldUntil.Format(time.Stamp)
	case v.State == affinity.NodeDown:
		s = "down since " + v.Record.Since.Format(time.Stamp)
	case v.Failing > 0:
		s = fmt.Sprintf("failing %d/%d", v.Failing, v.Fall)
	case v.LastCheck.IsZero():
		s = "up (not checked yet)"
	default:
		s = "up"
	}
	if v.State == affinity.NodeDown && !v.Operator && v.Rising > 0 {
		s += fmt.Sprintf(", rising %d/%d", v.Rising, v.Rise)
	}
	if v.Failing > 0 || (v.State == affinity.NodeDown && !v.Operator) {
		if v.LastError != "" {
			s += " (" + v.LastError + ")"
		}
	}
	if v.Pending != "" {
		s += "; " + v.Pending
	}
	return s
}

// Status returns the machine's view.
func (m *Machine) Status() Status {
	st := Status{Enabled: m.cfg.Enabled, Master: m.master, LinkUp: m.linkUp, Counters: m.count}
	if m.panicked {
		st.Panic, st.PanicSince = m.panicMsg, m.panicAt
	}
	if !m.linkUp {
		st.Panic = strings.TrimSpace(st.Panic + " inside link down since " + m.linkAt.Format(time.RFC3339) + ": moving nothing")
	}
	now := m.clock.Now()
	for _, n := range m.sorted {
		v := NodeView{
			Name: n.Name, Address: n.Addr, State: n.State, Operator: !managed(n),
			Failing: n.failRun, Fall: n.p.Fall, Rising: n.okRun, Rise: n.p.Rise,
			Record: n.Record, Checks: n.last, LastCheck: n.lastAt,
			LastError: n.lastErr, LastErrAt: n.lastErrAt, Pending: n.pending,
		}
		v.Record.Downs = append([]time.Time(nil), n.Record.Downs...)
		if n.State == affinity.NodeDown && n.Record.Down && now.Before(n.Record.HoldUntil) {
			v.HeldUntil = n.Record.HoldUntil
		}
		for _, c := range n.last {
			if c.Kind == CheckIKE {
				v.Latency = c.Latency
			}
		}
		st.Nodes = append(st.Nodes, v)
	}
	return st
}

// StoredView is a node's view from the table alone, without checks: what
// a CLI reading the store file (no daemon) can say. A node health took
// down shows its down or hold and the stored reason.
func StoredView(n Node, now time.Time) NodeView {
	ns := nodeState{Node: n}
	v := NodeView{Name: n.Name, Address: n.Addr, State: n.State, Operator: !managed(&ns), Record: n.Record}
	if n.State == affinity.NodeDown && n.Record.Down {
		v.LastError = n.Record.Reason
		if now.Before(n.Record.HoldUntil) {
			v.HeldUntil = n.Record.HoldUntil
		}
	}
	return v
}
