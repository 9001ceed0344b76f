package affinity

import (
	"cmp"
	"fmt"
	"math"
	"net/netip"
	"slices"
)

// Move is one tunnel a plan moves, and why.
type Move struct {
	Tunnel string     `json:"tunnel"`
	Peer   netip.Addr `json:"peer"`
	From   string     `json:"from"`
	To     string     `json:"to"` // empty: no node can take it
	Reason string     `json:"reason"`
}

// Plan is a set of changes decided against the table as it was: the moves
// it makes, the tunnels it could not place, and the batch that applies it.
type Plan struct {
	Revision  uint64 `json:"revision"` // the table revision planned against
	Moves     []Move `json:"moves"`
	Unplaced  []Move `json:"unplaced,omitempty"`
	Wanted    int    `json:"wanted"` // moves wanted before the budget cut them
	Remaining int    `json:"remaining"`
	batch     []Change
}

// Batch returns the changes that carry the plan out, for Apply.
func (p *Plan) Batch() []Change { return p.batch }

// sortedEntries returns, by id, the entries whose owner's mark keep
// accepts (all of them when keep is nil), so that plans are
// deterministic; size is how many it is expected to keep. It chooses and
// sorts them by the tunnel map's marks and keys alone: following every
// entry's pointer for its mark cost a node down at a million tunnels a
// third of a second in cache misses.
func (t *Table) sortedEntries(keep func(mark uint16) bool, size int) []*entry {
	type keyed struct {
		id string
		e  *entry
	}
	ks := make([]keyed, 0, size)
	for id, o := range t.tunnels {
		if keep == nil || keep(o.mark) {
			ks = append(ks, keyed{id, o.e})
		}
	}
	slices.SortFunc(ks, func(a, b keyed) int { return cmp.Compare(a.id, b.id) })
	out := make([]*entry, len(ks))
	for i, k := range ks {
		out[i] = k.e
	}
	return out
}

func (t *Table) moveChange(e *entry, to *Node, reason string) Change {
	tu := t.tunnelOf(e)
	tu.Node = to.Name
	// An NMS pin no longer holds once the tunnel left the pinned node.
	tu.Pinned = false
	return Change{Kind: PutTunnel, Tunnel: &tu, Reason: reason}
}

// PlanNodeState plans the operator's change of a node's state. Going down
// moves every tunnel of the node (pinned ones too: the node cannot serve
// them) to the scheduler's choice among the other active nodes, and
// nothing else; tunnels no node can take stay and are listed as unplaced.
// Draining and coming back move nothing. A state set by hand is the
// operator's: the node's health record is cleared (NodeHealth.AfterOperator),
// so health leaves the node alone and a hold no longer applies.
func (t *Table) PlanNodeState(name string, state NodeState) (*Plan, error) {
	return t.planState(name, state, func(n *Node) NodeHealth { return n.Health.AfterOperator(ActionSetState) }, "")
}

// PlanHealthState plans a change of a node's state that the director's
// health checks decided: exactly what PlanNodeState plans (the same moves
// for a down, none for an up), with the health record h stored with the
// node and why (the checks' reason) in every change's reason.
func (t *Table) PlanHealthState(name string, state NodeState, h NodeHealth, why string) (*Plan, error) {
	return t.planState(name, state, func(*Node) NodeHealth { return h }, why)
}

func (t *Table) planState(name string, state NodeState, health func(*Node) NodeHealth, why string) (*Plan, error) {
	t.mu.RLock()
	defer t.mu.RUnlock()
	n := t.nodes[name]
	if n == nil {
		return nil, fmt.Errorf("node %q: %w", name, ErrNotFound)
	}
	nn := *n
	nn.State = state
	nn.Health = health(n)
	plan := &Plan{Revision: t.rev}
	reason := fmt.Sprintf("node %s %s", name, state)
	if why != "" {
		reason += " (" + why + ")"
	}
	plan.batch = append(plan.batch, Change{Kind: PutNode, Node: &nn, Reason: reason})
	if state == NodeDown && n.State != NodeDown {
		t.planEvacuate(plan, n, reason)
	}
	return plan, nil
}

// PlanRemoveNode plans removing a node: its tunnels move as when it goes
// down, then the node is deleted. A node whose tunnels cannot all be placed
// is not removed.
func (t *Table) PlanRemoveNode(name string) (*Plan, error) {
	t.mu.RLock()
	defer t.mu.RUnlock()
	n := t.nodes[name]
	if n == nil {
		return nil, fmt.Errorf("node %q: %w", name, ErrNotFound)
	}
	plan := &Plan{Revision: t.rev}
	reason := fmt.Sprintf("node %s removed", name)
	t.planEvacuate(plan, n, reason)
	if len(plan.Unplaced) > 0 {
		return plan, fmt.Errorf("%w: remove node %s: %d tunnel(s) cannot be placed on another node (for example %s)",
			ErrConflict, name, len(plan.Unplaced), plan.Unplaced[0].Tunnel)
	}
	plan.batch = append(plan.batch, Change{Kind: DeleteNode, Name: name, Reason: reason})
	return plan, nil
}

func (t *Table) planEvacuate(plan *Plan, n *Node, reason string) {
	p := t.newPlanner(n.Name)
	entries := t.sortedEntries(func(m uint16) bool { return m == n.Mark }, t.count[n.Mark])
	// Every entry is a move or an unplaced tunnel: sized once, the plan's
	// slices are not copied over and over while they grow.
	plan.Moves = slices.Grow(plan.Moves, len(entries))
	plan.batch = slices.Grow(plan.batch, len(entries))
	for _, e := range entries {
		plan.Wanted++
		to, err := t.pick(e.peer, &p.view, n.Name)
		if err != nil {
			plan.Unplaced = append(plan.Unplaced, Move{Tunnel: e.id, Peer: e.peer, From: n.Name, Reason: err.Error()})
			continue
		}
		p.move(n, to)
		plan.Moves = append(plan.Moves, Move{Tunnel: e.id, Peer: e.peer, From: n.Name, To: to.Name, Reason: reason})
		plan.batch = append(plan.batch, t.moveChange(e, to, reason))
	}
}

// Rebalance plans at most maxMoves tunnel moves, most urgent first:
//  1. tunnels left on down nodes (no node could take them before);
//  2. tunnels on draining nodes;
//  3. unpinned tunnels on nodes above their bounded-load limit;
//  4. unpinned tunnels on nodes above their fair share whose preferred
//     node is below its own (this is what fills a newly added node).
//
// It changes nothing: apply Plan.Batch to carry it out.
func (t *Table) Rebalance(maxMoves int) *Plan {
	t.mu.RLock()
	defer t.mu.RUnlock()
	plan := &Plan{Revision: t.rev}
	p := t.newPlanner("")
	moved := map[string]bool{}
	budget := func() bool { return len(plan.Moves) < maxMoves }
	add := func(e *entry, from, to *Node, reason string) {
		plan.Wanted++
		if !budget() {
			plan.Remaining++
			return
		}
		moved[e.id] = true
		p.move(from, to)
		plan.Moves = append(plan.Moves, Move{Tunnel: e.id, Peer: e.peer, From: from.Name, To: to.Name, Reason: reason})
		plan.batch = append(plan.batch, t.moveChange(e, to, reason))
	}
	all := t.sortedEntries(nil, len(t.tunnels))

	// 1 and 2: evacuate down and draining nodes.
	for _, state := range []NodeState{NodeDown, NodeDraining} {
		for _, e := range all {
			from := t.byMark[e.mark]
			if from.State != state {
				continue
			}
			reason := fmt.Sprintf("node %s is %s", from.Name, state)
			to, err := t.pick(e.peer, &p.view, from.Name)
			if err != nil {
				plan.Wanted++
				plan.Unplaced = append(plan.Unplaced, Move{Tunnel: e.id, Peer: e.peer, From: from.Name, Reason: err.Error()})
				continue
			}
			add(e, from, to, reason)
		}
	}

	// 3: nodes above their bound shed tunnels.
	var buf []ranked
	for _, e := range all {
		from := t.byMark[e.mark]
		if moved[e.id] || e.pinned || from.State != NodeActive {
			continue
		}
		limit := p.limit(from)
		if p.counts[from.Mark] <= limit {
			continue
		}
		// Shed towards the best-ranked node below its fair share, so
		// the load evens out instead of spilling onto the next node.
		var to *Node
		buf = t.rankLocked(e.peer, buf, "")
		for _, c := range buf {
			if c.n != from && float64(p.counts[c.n.Mark])+1 <= math.Ceil(p.share(c.n)) && p.counts[c.n.Mark] < p.limit(c.n) {
				to = c.n
				break
			}
		}
		if to == nil {
			continue
		}
		add(e, from, to, fmt.Sprintf("node %s holds %d, above its bound %d", from.Name, p.counts[from.Mark], limit))
	}

	// 4: move tunnels to their preferred node while that evens the load.
	for _, e := range all {
		from := t.byMark[e.mark]
		if moved[e.id] || e.pinned || from.State != NodeActive {
			continue
		}
		buf = t.rankLocked(e.peer, buf, "")
		if len(buf) == 0 || buf[0].n == from {
			continue
		}
		to := buf[0].n
		if float64(p.counts[from.Mark]) <= p.share(from) || float64(p.counts[to.Mark])+1 > math.Ceil(p.share(to)) {
			continue
		}
		add(e, from, to, fmt.Sprintf("node %s above its share %.0f, %s preferred and below its share", from.Name, p.share(from), to.Name))
	}
	return plan
}

// share is a node's weighted fair share of the tunnels on active nodes.
func (p *planner) share(n *Node) float64 {
	if p.view.totalWeight == 0 {
		return 0
	}
	return float64(p.view.total) * float64(n.Weight) / float64(p.view.totalWeight)
}

// limit is the bounded-load limit of a node as the table stands (no tunnel
// being added), capped by its capacity.
func (p *planner) limit(n *Node) int {
	l := int(math.Ceil((1 + p.t.epsilon) * p.share(n)))
	if n.Capacity > 0 && n.Capacity < l {
		l = n.Capacity
	}
	return l
}
