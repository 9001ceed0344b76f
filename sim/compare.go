package sim

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"text/tabwriter"
	"time"
)

// Comparison sets the project's scheduler beside the assignment
// strategies farms used before it, on the same steps.
type Comparison struct {
	Strategies []StrategyResult `json:"strategies"`
	Events     []CompareEvent   `json:"events"`
}

// StrategyResult is one strategy's movement and balance over the run.
type StrategyResult struct {
	Name           string `json:"name"`
	MovesOnFailure int    `json:"moves_on_failure"`
	// IdealOnFailure is the tunnels the failed nodes held under this
	// strategy: the fewest it could have moved.
	IdealOnFailure  int `json:"ideal_on_failure"`
	MovesOnAddition int `json:"moves_on_addition"`
	MovesOnRecovery int `json:"moves_on_recovery"`
	// MovesOther are moves at drains, removals' siblings, rebalances and
	// failovers.
	MovesOther  int  `json:"moves_other"`
	MaxOverMean Stat `json:"max_over_mean"`
	CV          Stat `json:"cv"`
}

// CompareEvent is one event's moves under each strategy, in the order of
// Comparison.Strategies, with each strategy's ideal minimum (the failed
// node's tunnels under that strategy; zero for other node events; -1 for
// a rebalance, whose moves are asked for).
type CompareEvent struct {
	At     string `json:"at"`
	Kind   string `json:"kind"`
	Node   string `json:"node,omitempty"`
	Moves  []int  `json:"moves"`
	Ideals []int  `json:"ideals"`
}

// MaglevSize is the Maglev lookup table's size: a prime, as the paper
// asks, well above 100 x the node count.
const MaglevSize = 65537

// strategy is an assignment of tunnels to nodes that is not the project's
// table: the simulator replays the same steps through each.
type strategy interface {
	name() string
	// reset is told the active nodes (sorted by name) after a change.
	reset(active []string)
	// place returns the node of a new tunnel.
	place(peer netip.Addr, pinned string) string
	// stateless strategies recompute every owner when the nodes change;
	// the others only move the tunnels of nodes that left.
	stateless() bool
}

// roundRobin is what the first NMS-driven farms did: each new tunnel
// goes to the next node in turn and stays there; a failed node's tunnels
// are dealt out in turn to the others.
type roundRobin struct {
	active []string
	next   int
}

func (r *roundRobin) name() string          { return "round-robin" }
func (r *roundRobin) stateless() bool       { return false }
func (r *roundRobin) reset(active []string) { r.active = active }
func (r *roundRobin) place(_ netip.Addr, pinned string) string {
	if pinned != "" && slices.Contains(r.active, pinned) {
		return pinned
	}
	if len(r.active) == 0 {
		return ""
	}
	n := r.active[r.next%len(r.active)]
	r.next++
	return n
}

// hashMod is hash(source) mod N over the active nodes, what the xt_cluster
// match and IPVS's sh scheduler do.
type hashMod struct{ active []string }

func (h *hashMod) name() string          { return "hash-mod-n" }
func (h *hashMod) stateless() bool       { return true }
func (h *hashMod) reset(active []string) { h.active = active }
func (h *hashMod) place(peer netip.Addr, _ string) string {
	if len(h.active) == 0 {
		return ""
	}
	return h.active[peerHash(peer)%uint64(len(h.active))]
}

// maglev is Maglev consistent hashing (Eisenbud et al., NSDI 2016): each
// node walks its own permutation of a prime-sized table, the nodes taking
// turns to claim their next free slot, so a change of nodes disturbs few
// slots and every node holds nearly the same number.
type maglev struct {
	active []string
	table  []int32
}

func (m *maglev) name() string    { return "maglev" }
func (m *maglev) stateless() bool { return true }
func (m *maglev) reset(active []string) {
	m.active = active
	if m.table == nil {
		m.table = make([]int32, MaglevSize)
	}
	for i := range m.table {
		m.table[i] = -1
	}
	if len(active) == 0 {
		return
	}
	offset := make([]uint64, len(active))
	skip := make([]uint64, len(active))
	next := make([]uint64, len(active))
	for i, n := range active {
		offset[i] = nameHash(n, 0x6d61676c) % MaglevSize
		skip[i] = nameHash(n, 0x65763031)%(MaglevSize-1) + 1
	}
	for filled := 0; ; {
		for i := range active {
			c := (offset[i] + next[i]*skip[i]) % MaglevSize
			for m.table[c] >= 0 {
				next[i]++
				c = (offset[i] + next[i]*skip[i]) % MaglevSize
			}
			m.table[c] = int32(i)
			next[i]++
			if filled++; filled == MaglevSize {
				return
			}
		}
	}
}
func (m *maglev) place(peer netip.Addr, _ string) string {
	if len(m.active) == 0 {
		return ""
	}
	return m.active[m.table[peerHash(peer)%MaglevSize]]
}

// peerHash is FNV-1a over the address's 16 bytes with a splitmix64
// finish, stable across runs and machines.
func peerHash(a netip.Addr) uint64 {
	h := uint64(14695981039346656037)
	for _, c := range a.As16() {
		h ^= uint64(c)
		h *= 1099511628211
	}
	return mix64(h)
}

func nameHash(s string, seed uint64) uint64 {
	h := uint64(14695981039346656037) ^ seed
	for i := 0; i < len(s); i++ {
		h ^= uint64(s[i])
		h *= 1099511628211
	}
	return mix64(h)
}

func mix64(h uint64) uint64 {
	h ^= h >> 30
	h *= 0xbf58476d1ce4e5b9
	h ^= h >> 27
	h *= 0x94d049bb133111eb
	h ^= h >> 31
	return h
}

// Compare replays the steps through round-robin, hash-mod-N and Maglev
// and sets them beside the project's scheduler as the run r measured it.
func Compare(steps []Step, s *Scenario, r *Report) *Comparison {
	strategies := []strategy{&roundRobin{}, &hashMod{}, &maglev{}}
	c := &Comparison{}
	sched := StrategyResult{Name: "scheduler (affinity.Table)", MaxOverMean: r.Balance.MaxOverMean, CV: r.Balance.CV}
	var evs []CompareEvent
	for _, e := range r.Events {
		ideal := -1
		if e.Ideal != nil {
			ideal = *e.Ideal
		}
		ce := CompareEvent{At: e.At, Kind: e.Kind, Node: e.Node, Moves: []int{e.Moves}, Ideals: []int{ideal}}
		evs = append(evs, ce)
		tally(&sched, e.Kind, e.Moves, ideal)
	}
	c.Strategies = append(c.Strategies, sched)
	for _, st := range strategies {
		res, moves, ideals := replayStrategy(st, steps, s)
		c.Strategies = append(c.Strategies, res)
		for i := range evs {
			if i < len(moves) {
				evs[i].Moves = append(evs[i].Moves, moves[i])
				evs[i].Ideals = append(evs[i].Ideals, ideals[i])
			}
		}
	}
	c.Events = evs
	return c
}

func tally(res *StrategyResult, kind string, moves, ideal int) {
	switch kind {
	case EvNodeDown, EvNodeRemove, EvNodeDies:
		res.MovesOnFailure += moves
		res.IdealOnFailure += ideal
	case EvNodeAdd:
		res.MovesOnAddition += moves
	case EvNodeUp, EvNodeRevives:
		res.MovesOnRecovery += moves
	default:
		res.MovesOther += moves
	}
}

type ctunnel struct {
	id     string
	peer   netip.Addr
	pinned string
	node   string
	idx    int
}

// replayStrategy runs the steps through one strategy and returns its
// result and the moves at each timed event, in the order the engine
// reports events.
func replayStrategy(st strategy, steps []Step, s *Scenario) (StrategyResult, []int, []int) {
	res := StrategyResult{Name: st.name()}
	state := map[string]string{} // node -> active, draining or down
	weights := map[string]uint32{}
	var order []string
	byID := map[string]*ctunnel{}
	var live []*ctunnel
	counts := map[string]int{}
	var moves, ideals []int
	var bal Balance

	activeNodes := func() []string {
		var a []string
		for _, n := range order {
			if state[n] == "active" {
				a = append(a, n)
			}
		}
		return a
	}
	assign := func(t *ctunnel, n string) {
		if t.node != "" {
			counts[t.node]--
		}
		t.node = n
		if n != "" {
			counts[n]++
		}
	}
	// rehome applies a change of nodes and counts the tunnels it moves.
	rehome := func() int {
		active := activeNodes()
		st.reset(active)
		moved := 0
		for _, t := range live {
			var to string
			switch {
			case st.stateless():
				to = st.place(t.peer, t.pinned)
			case !slices.Contains(active, t.node):
				if state[t.node] == "draining" {
					continue // a drained node keeps its tunnels
				}
				to = st.place(t.peer, "")
			default:
				continue
			}
			if to != t.node {
				if t.node != "" {
					moved++
				}
				assign(t, to)
			}
		}
		return moved
	}
	nextSample := time.Duration(0)
	sample := func() {
		var c []float64
		for _, n := range activeNodes() {
			c = append(c, load(counts[n], weights[n]))
		}
		bal.add(c)
	}
	for i := range steps {
		stp := &steps[i]
		for stp.At > nextSample {
			sample()
			nextSample += s.SampleEvery
		}
		switch stp.Kind {
		case StepTunnelUp:
			t := &ctunnel{id: stp.Tunnel.ID, peer: stp.Tunnel.Peer, pinned: stp.Tunnel.Node, idx: len(live)}
			if _, dup := byID[t.id]; dup {
				continue
			}
			byID[t.id] = t
			live = append(live, t)
			assign(t, st.place(t.peer, t.pinned))
		case StepEnd:
		case StepTunnelDown:
			t := byID[stp.Tunnel.ID]
			if t == nil {
				continue
			}
			assign(t, "")
			delete(byID, t.id)
			last := live[len(live)-1]
			live[t.idx] = last
			last.idx = t.idx
			live = live[:len(live)-1]
		default:
			e := stp.Event
			setup := e.At == 0 && e.Kind == EvNodeAdd
			m, ideal := 0, 0
			switch e.Kind {
			case EvNodeAdd:
				if _, ok := state[e.Node]; !ok {
					order = append(order, e.Node)
					slices.Sort(order)
				}
				state[e.Node] = "active"
				weights[e.Node] = e.Weight
				m = rehome()
			case EvNodeUp, EvNodeRevives:
				if _, ok := state[e.Node]; ok {
					state[e.Node] = "active"
				}
				m = rehome()
			case EvNodeDown, EvNodeDies:
				if _, ok := state[e.Node]; ok {
					ideal = counts[e.Node]
					state[e.Node] = "down"
				}
				m = rehome()
			case EvNodeDrain:
				if _, ok := state[e.Node]; ok {
					state[e.Node] = "draining"
				}
				m = rehome()
			case EvNodeRemove:
				if _, ok := state[e.Node]; ok {
					ideal = counts[e.Node]
					state[e.Node] = "down"
					m = rehome()
					delete(state, e.Node)
					order = slices.DeleteFunc(order, func(n string) bool { return n == e.Node })
				}
			}
			if e.Kind == EvRebalance {
				ideal = -1
			}
			if !setup {
				moves = append(moves, m)
				ideals = append(ideals, ideal)
				tally(&res, e.Kind, m, ideal)
			}
		}
	}
	for ; nextSample <= runEnd(steps, s.Duration); nextSample += s.SampleEvery {
		sample()
	}
	bal.finish()
	res.MaxOverMean, res.CV = bal.MaxOverMean, bal.CV
	return res, moves, ideals
}

func (c *Comparison) writeText(tw *tabwriter.Writer) {
	p := func(format string, args ...any) { fmt.Fprintf(tw, format, args...) }
	p("STRATEGY\tMOVES ON FAILURE (IDEAL)\tON ADDITION\tON RECOVERY\tOTHER\tMAX/MEAN (mean/max)\tCV (mean/max)\n")
	for _, s := range c.Strategies {
		p("%s\t%d (%d)\t%d\t%d\t%d\t%.3f / %.3f\t%.3f / %.3f\n", s.Name, s.MovesOnFailure, s.IdealOnFailure, s.MovesOnAddition, s.MovesOnRecovery, s.MovesOther,
			s.MaxOverMean.Mean, s.MaxOverMean.Max, s.CV.Mean, s.CV.Max)
	}
	tw.Flush()
	fmt.Fprintln(tw)
	var names []string
	for _, s := range c.Strategies {
		names = append(names, strings.ToUpper(strings.Fields(s.Name)[0]))
	}
	p("moves per event, and above the strategy's own ideal minimum:\n")
	p("AT\tEVENT\t%s\n", strings.Join(names, "\t"))
	for _, e := range c.Events {
		var ms []string
		for i, m := range e.Moves {
			if i < len(e.Ideals) && e.Ideals[i] >= 0 {
				ms = append(ms, fmt.Sprintf("%d (+%d)", m, m-e.Ideals[i]))
			} else {
				ms = append(ms, fmt.Sprint(m))
			}
		}
		ev := e.Kind
		if e.Node != "" {
			ev += " " + e.Node
		}
		p("%s\t%s\t%s\n", e.At, ev, strings.Join(ms, "\t"))
	}
}
