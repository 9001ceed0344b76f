package sim

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/tunneldirector/tunneldirector/affinity"
)

// Comparison sets the project's scheduler, as it is and as it was, beside
// the assignment strategies farms used before it, on the same steps.
type Comparison struct {
	Strategies []StrategyResult `json:"strategies"`
	Events     []CompareEvent   `json:"events"`
	// AtHours are the times of the balance samples in each strategy's
	// Series.
	AtHours []float64 `json:"at_hours"`
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
	// FillAdded and FillRecovered are how long the first added and the
	// first recovered node took to reach 90 % of their fair share with no
	// rebalance ("never": not by the end; "rebalanced": a rebalance came
	// first; empty: no such event).
	FillAdded     string `json:"fill_added,omitempty"`
	FillRecovered string `json:"fill_recovered,omitempty"`
	// Learned counts the tunnels the director pinned from the kernel's
	// hash (unknown peers); absent for strategies without a table.
	Learned *int `json:"learned,omitempty"`
	// Series is max/mean of the load per weight at each sample: the
	// balance over time.
	Series []float64 `json:"series"`
}

// CompareEvent is one event's moves under each strategy, in the order of
// Comparison.Strategies, with each strategy's ideal minimum (the failed
// node's tunnels under that strategy; zero for other node events; -1 for
// a rebalance, whose moves are asked for), and for an added or recovered
// node the time each strategy took to fill it to 90 % of its share.
type CompareEvent struct {
	At     string   `json:"at"`
	Kind   string   `json:"kind"`
	Node   string   `json:"node,omitempty"`
	Moves  []int    `json:"moves"`
	Ideals []int    `json:"ideals"`
	Fill   []string `json:"fill,omitempty"`
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

// FillShare is the part of its fair share an added or recovered node
// must reach for the comparison's fill time.
const FillShare = 0.9

// Compare replays the steps through the project's scheduler with the
// scenario's choices and unknown-peer buckets (the new scheduler), with
// one choice and the hash over the active nodes (the old one), and through
// round-robin, hash-mod-N and Maglev. Every strategy sees the same steps;
// the table strategies run the real affinity.Table in memory, without the
// stores, placing each tunnel when it arrives and pinning unknown peers at
// once. The run's own numbers (group commit, replication, the pin window)
// are the report's; these are for the comparison.
func Compare(steps []Step, s *Scenario) (*Comparison, error) {
	d := s.Choices
	if d == 1 {
		d = affinity.DefaultChoices
	}
	label := "new scheduler (least loaded, buckets)"
	if d > 1 {
		label = fmt.Sprintf("new scheduler (d=%d, buckets)", d)
	}
	u := s.Unknown
	if u.Buckets == 0 {
		u = DefaultScenario().Unknown
	}
	newer, err := newTableReplayer(label, s, d, u)
	if err != nil {
		return nil, err
	}
	older, err := newTableReplayer("old scheduler (d=1, hash)", s, 1, UnknownSpec{})
	if err != nil {
		return nil, err
	}
	return compareWith(steps, s, []replayer{newer, older,
		simple{&roundRobin{}}, simple{&hashMod{}}, simple{&maglev{}}}), nil
}

func compareWith(steps []Step, s *Scenario, rs []replayer) *Comparison {
	c := &Comparison{}
	for i, r := range rs {
		d := &replay{s: s, st: r}
		res := d.run(steps)
		c.Strategies = append(c.Strategies, res)
		for k, ev := range d.events {
			if i == 0 {
				c.Events = append(c.Events, CompareEvent{At: ev.At, Kind: ev.Kind, Node: ev.Node})
			}
			if k < len(c.Events) {
				ce := &c.Events[k]
				ce.Moves = append(ce.Moves, ev.Moves[0])
				ce.Ideals = append(ce.Ideals, ev.Ideals[0])
				if ev.Kind == EvNodeAdd || ev.Kind == EvNodeUp {
					ce.Fill = append(ce.Fill, ev.Fill[0])
				}
			}
		}
		if i == 0 {
			c.AtHours = d.atHours
		}
	}
	return c
}

func tally(res *StrategyResult, kind string, moves, ideal int) {
	switch kind {
	case EvNodeDown, EvNodeRemove:
		res.MovesOnFailure += moves
		res.IdealOnFailure += ideal
	case EvNodeAdd:
		res.MovesOnAddition += moves
	case EvNodeUp:
		res.MovesOnRecovery += moves
	default:
		res.MovesOther += moves
	}
}

type ctunnel struct {
	id      string
	peer    netip.Addr
	pinned  string
	unknown bool
	node    string
	idx     int
}

// replayer is a strategy the comparison replays step by step.
type replayer interface {
	name() string
	// up places a new tunnel and returns its node ("" when refused).
	up(d *replay, t *ctunnel) string
	// down takes a departed tunnel out.
	down(d *replay, t *ctunnel)
	// event carries out a node event or a rebalance once the replay's
	// node states reflect it, moving tunnels with d.assign; it returns
	// the tunnels moved.
	event(d *replay, e Event) int
	// tick tells the strategy the time, before every step.
	tick(d *replay)
	// learned counts the tunnels pinned from the kernel's hash; ok is
	// false for strategies without a table.
	learned() (n int, ok bool)
}

// replay is one strategy's run over the steps: the node states, the live
// tunnels and where each is, the balance samples and the fill trackers.
type replay struct {
	s       *Scenario
	st      replayer
	now     time.Duration
	state   map[string]string // node -> active, draining or down
	weights map[string]uint32
	caps    map[string]int
	order   []string
	byID    map[string]*ctunnel
	live    []*ctunnel
	counts  map[string]int
	bal     Balance
	series  []float64
	atHours []float64
	events  []CompareEvent
	fills   []fill
	unknown bool // some steps bring unknown peers
}

// fill tracks an added or recovered node until it holds FillShare of its
// fair share.
type fill struct {
	node  string
	start time.Duration
	event int // index in replay.events
	open  bool
}

func (d *replay) activeNodes() []string {
	var a []string
	for _, n := range d.order {
		if d.state[n] == "active" {
			a = append(a, n)
		}
	}
	return a
}

// assign puts a tunnel on a node ("": none) and reports whether it moved.
func (d *replay) assign(t *ctunnel, n string) bool {
	if t.node == n {
		return false
	}
	moved := t.node != ""
	if t.node != "" {
		d.counts[t.node]--
	}
	t.node = n
	if n != "" {
		d.counts[n]++
	}
	return moved
}

func (d *replay) sample() {
	var c []float64
	for _, n := range d.activeNodes() {
		c = append(c, load(d.counts[n], d.weights[n]))
	}
	d.bal.add(c)
	mm, _, _ := spread(c)
	d.series = append(d.series, round3(mm))
	d.atHours = append(d.atHours, round3(d.now.Hours()))
}

// checkFills closes the fill trackers whose node reached its share.
func (d *replay) checkFills() {
	var total, weight float64
	for _, n := range d.activeNodes() {
		total += float64(d.counts[n])
		weight += float64(d.weights[n])
	}
	for i := range d.fills {
		f := &d.fills[i]
		if !f.open {
			continue
		}
		if d.state[f.node] != "active" {
			f.open = false
			d.events[f.event].Fill[0] = "left"
			continue
		}
		if weight > 0 && float64(d.counts[f.node]) >= FillShare*total*float64(d.weights[f.node])/weight {
			f.open = false
			d.events[f.event].Fill[0] = FormatDuration((d.now - f.start).Round(time.Minute))
		}
	}
}

func (d *replay) closeFills(why string) {
	for i := range d.fills {
		if f := &d.fills[i]; f.open {
			f.open = false
			d.events[f.event].Fill[0] = why
		}
	}
}

// run replays the steps and returns the strategy's result; d.events
// holds each timed event's moves, ideal and fill time.
func (d *replay) run(steps []Step) StrategyResult {
	s := d.s
	d.state, d.weights, d.caps = map[string]string{}, map[string]uint32{}, map[string]int{}
	d.byID, d.counts = map[string]*ctunnel{}, map[string]int{}
	for i := range steps {
		d.unknown = d.unknown || steps[i].Unknown
	}
	res := StrategyResult{Name: d.st.name()}
	nextSample := time.Duration(0)
	for i := range steps {
		stp := &steps[i]
		for stp.At > nextSample {
			d.now = nextSample
			d.sample()
			nextSample += s.SampleEvery
		}
		d.now = stp.At
		d.st.tick(d)
		switch stp.Kind {
		case StepTunnelUp:
			t := &ctunnel{id: stp.Tunnel.ID, peer: stp.Tunnel.Peer, pinned: stp.Tunnel.Node, unknown: stp.Unknown, idx: len(d.live)}
			if _, dup := d.byID[t.id]; dup {
				continue
			}
			n := d.st.up(d, t)
			if n == "" {
				continue // refused: no node can take it
			}
			d.byID[t.id] = t
			d.live = append(d.live, t)
			d.assign(t, n)
		case StepEnd:
		case StepTunnelDown:
			t := d.byID[stp.Tunnel.ID]
			if t == nil {
				continue
			}
			d.st.down(d, t)
			d.assign(t, "")
			delete(d.byID, t.id)
			last := d.live[len(d.live)-1]
			d.live[t.idx] = last
			last.idx = t.idx
			d.live = d.live[:len(d.live)-1]
		default:
			d.event(&res, stp.Event)
		}
		d.checkFills()
	}
	for ; nextSample <= runEnd(steps, s.Duration); nextSample += s.SampleEvery {
		d.now = nextSample
		d.sample()
	}
	d.closeFills("never")
	d.bal.finish()
	res.MaxOverMean, res.CV, res.Series = d.bal.MaxOverMean, d.bal.CV, d.series
	if n, ok := d.st.learned(); ok {
		res.Learned = &n
	}
	for _, ev := range d.events {
		switch {
		case ev.Kind == EvNodeAdd && res.FillAdded == "":
			res.FillAdded = ev.Fill[0]
		case ev.Kind == EvNodeUp && res.FillRecovered == "":
			res.FillRecovered = ev.Fill[0]
		}
	}
	return res
}

func (d *replay) event(res *StrategyResult, e Event) {
	// The strategies see a death as a failure and a revival as a
	// recovery, at once: they have no health checks to wait for.
	switch e.Kind {
	case EvNodeDies:
		e.Kind = EvNodeDown
	case EvNodeRevives:
		e.Kind = EvNodeUp
	}
	setup := e.At == 0 && e.Kind == EvNodeAdd
	m, ideal := 0, 0
	_, known := d.state[e.Node]
	switch e.Kind {
	case EvNodeAdd:
		if !known {
			d.order = append(d.order, e.Node)
			slices.Sort(d.order)
		}
		d.state[e.Node] = "active"
		d.weights[e.Node] = e.Weight
		if d.weights[e.Node] == 0 {
			d.weights[e.Node] = affinity.DefaultWeight
		}
		d.caps[e.Node] = e.Capacity
		m = d.st.event(d, e)
	case EvNodeUp, EvNodeDrain, EvNodeDown:
		if known {
			ideal = d.counts[e.Node]
			d.state[e.Node] = map[string]string{EvNodeUp: "active", EvNodeDrain: "draining", EvNodeDown: "down"}[e.Kind]
		}
		if e.Kind != EvNodeDown {
			ideal = 0
		}
		m = d.st.event(d, e)
	case EvNodeRemove:
		if known {
			ideal = d.counts[e.Node]
			d.state[e.Node] = "down"
			m = d.st.event(d, e)
			delete(d.state, e.Node)
			d.order = slices.DeleteFunc(d.order, func(n string) bool { return n == e.Node })
		}
	case EvRebalance:
		ideal = -1
		d.closeFills("rebalanced")
		m = d.st.event(d, e)
	}
	if setup {
		return
	}
	ce := CompareEvent{At: FormatDuration(e.At), Kind: e.Kind, Node: e.Node, Moves: []int{m}, Ideals: []int{ideal}}
	if e.Kind == EvNodeAdd || e.Kind == EvNodeUp {
		ce.Fill = []string{"never"}
		d.fills = append(d.fills, fill{node: e.Node, start: e.At, event: len(d.events), open: true})
	}
	d.events = append(d.events, ce)
	tally(res, e.Kind, m, ideal)
}

// simple replays a strategy without a table: stateless ones recompute
// every owner when the nodes change, the others only move the tunnels of
// nodes that went down or left (a drained node keeps its tunnels).
type simple struct{ strategy }

func (r simple) up(d *replay, t *ctunnel) string { return r.place(t.peer, t.pinned) }
func (r simple) down(*replay, *ctunnel)          {}
func (r simple) tick(*replay)                    {}
func (r simple) learned() (int, bool)            { return 0, false }

func (r simple) event(d *replay, e Event) int {
	if e.Kind == EvRebalance {
		return 0
	}
	active := d.activeNodes()
	r.reset(active)
	moved := 0
	for _, t := range d.live {
		var to string
		switch {
		case r.stateless():
			to = r.place(t.peer, t.pinned)
		case !slices.Contains(active, t.node):
			if d.state[t.node] == "draining" {
				continue
			}
			to = r.place(t.peer, "")
		default:
			continue
		}
		if d.assign(t, to) {
			moved++
		}
	}
	return moved
}

func (c *Comparison) writeText(tw *tabwriter.Writer) {
	p := func(format string, args ...any) { fmt.Fprintf(tw, format, args...) }
	p("STRATEGY\tMOVES ON FAILURE (IDEAL)\tON ADDITION\tON RECOVERY\tOTHER\tMAX/MEAN (mean/max)\tCV (mean/max)\tFILL 90%% ADDED\tRECOVERED\tLEARNED\n")
	dash := func(s string) string {
		if s == "" {
			return "-"
		}
		return s
	}
	for _, s := range c.Strategies {
		learned := "-"
		if s.Learned != nil {
			learned = fmt.Sprint(*s.Learned)
		}
		p("%s\t%d (%d)\t%d\t%d\t%d\t%.3f / %.3f\t%.3f / %.3f\t%s\t%s\t%s\n", s.Name, s.MovesOnFailure, s.IdealOnFailure, s.MovesOnAddition, s.MovesOnRecovery, s.MovesOther,
			s.MaxOverMean.Mean, s.MaxOverMean.Max, s.CV.Mean, s.CV.Max, dash(s.FillAdded), dash(s.FillRecovered), learned)
	}
	tw.Flush()
	fmt.Fprintln(tw)
	var names []string
	for _, s := range c.Strategies {
		names = append(names, strings.ToUpper(strings.Fields(s.Name)[0]))
	}
	p("moves per event, and above the strategy's own ideal minimum; for an added or recovered node, the time to %.0f%% of its share:\n", 100*FillShare)
	p("AT\tEVENT\t%s\n", strings.Join(names, "\t"))
	for _, e := range c.Events {
		var ms []string
		for i, m := range e.Moves {
			cell := fmt.Sprint(m)
			if i < len(e.Ideals) && e.Ideals[i] >= 0 {
				cell = fmt.Sprintf("%d (+%d)", m, m-e.Ideals[i])
			}
			if i < len(e.Fill) {
				cell += ", " + e.Fill[i]
			}
			ms = append(ms, cell)
		}
		ev := e.Kind
		if e.Node != "" {
			ev += " " + e.Node
		}
		p("%s\t%s\t%s\n", e.At, ev, strings.Join(ms, "\t"))
	}
}
