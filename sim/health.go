package sim

import (
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"time"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/director/health"
)

// healthSim runs the director's real health state machine (package
// director/health) on the virtual clock: a node that dies (node-dies)
// fails its rounds until the machine takes it down, and its decision is
// committed as the daemon commits it (PlanHealthState), so the tunnels
// move exactly as the real director moves them, interval x fall after
// the death.
//
// Rounds are only played while they can decide something: from a node's
// death until it is down, from its revival until it is up (a hold
// included), and while a round failed; a farm whose nodes all answer
// costs nothing. A dead node the machine will not take down (a panic:
// too many dead) stops being probed after fall failed rounds, and is
// probed again at the next death, revival or decision, which is the only
// thing that can change the outcome.
type healthSim struct {
	e    *engine
	cfg  health.Config
	m    *health.Machine
	rng  *rand.Rand
	dead map[string]bool
	// diedAt is when the node last died or revived; deathEvent the
	// event of its death, while it is dead.
	diedAt     map[string]time.Duration
	deathEvent map[string]int
	// event is the index of the event whose death or revival the node's
	// next decision answers, for attribution.
	event   map[string]int
	probing map[string]bool
	stalled map[string]bool
	failRun map[string]int
	passed  map[string]bool // the last round passed
	dirty   bool            // the table's nodes changed: SetNodes due
	inside  bool            // the machine is stepping
}

func newHealthSim(e *engine) *healthSim {
	h := &healthSim{e: e, cfg: e.s.Health.Config(), rng: rand.New(rand.NewPCG(e.s.Seed, 0x4ea17)),
		dead: map[string]bool{}, diedAt: map[string]time.Duration{}, deathEvent: map[string]int{}, event: map[string]int{},
		probing: map[string]bool{}, stalled: map[string]bool{}, failRun: map[string]int{}, passed: map[string]bool{}}
	h.m = health.NewMachine(h.cfg, e.clk, h.apply, slog.New(slog.NewTextHandler(io.Discard, nil)))
	h.m.Role(true)
	return h
}

// sync gives the machine the master's nodes when they changed. The
// machine is stepped one event at a time: a commit made while it steps
// (its own decision) is given to it after the step.
func (h *healthSim) sync() {
	for h.dirty && !h.inside {
		h.dirty = false
		t := h.e.master().Table()
		nodes := t.Nodes()
		hn := make([]health.Node, len(nodes))
		for i, n := range nodes {
			hn[i] = health.Node{Name: n.Name, Addr: n.Addr, State: n.State, Record: n.Health}
		}
		h.step(func() { h.m.SetNodes(t.Revision(), hn) })
	}
}

// step runs one step of the machine.
func (h *healthSim) step(fn func()) {
	h.inside = true
	fn()
	h.inside = false
	h.sync()
}

// dies kills the node's IKE daemon: its tunnels go dark (their SAs are
// gone), and its rounds fail from now on.
func (h *healthSim) dies(node string, event int) {
	h.dead[node] = true
	h.diedAt[node] = h.e.now
	h.event[node] = event
	h.deathEvent[node] = event
	h.e.rep.Events[event].Dark = &DarkStats{}
	for _, x := range h.e.live {
		if x.saNode == node && !x.pending {
			h.darken(x)
		}
	}
	h.wake()
}

// darken starts the dark time of a tunnel whose SAs are on a dead node
// (at its death, or placed there before the health checks noticed).
func (h *healthSim) darken(x *tunnel) {
	ev, dead := h.deathEvent[x.saNode]
	if !dead || x.darkEvent >= 0 {
		return
	}
	x.darkEvent, x.darkSince = ev, h.e.now
	h.e.rep.Events[ev].Dark.Tunnels++
}

// revives brings the node's IKE daemon back: its rounds pass again, and
// tunnels still on it (none moved: a panic) re-establish there.
func (h *healthSim) revives(node string, event int) {
	delete(h.dead, node)
	delete(h.deathEvent, node)
	h.diedAt[node] = h.e.now
	h.event[node] = event
	for _, x := range h.e.live {
		if x.darkEvent >= 0 && x.saNode == node && x.reUntil == 0 {
			x.movedBy = -1
			h.e.reestablish(x)
		}
	}
	h.wake()
}

// wake probes every node whose rounds can decide something again.
func (h *healthSim) wake() {
	clear(h.stalled)
	for _, n := range h.e.master().Table().Nodes() {
		h.probe(n.Name)
	}
}

// interesting reports whether the node's rounds can change anything.
func (h *healthSim) interesting(name string) bool {
	n, ok := h.e.master().Table().Node(name)
	switch {
	case !ok || h.stalled[name]:
		return false
	case h.dead[name]:
		return n.State == affinity.NodeActive
	case n.State == affinity.NodeDown:
		return n.Health.Down
	}
	return !h.passed[name]
}

// probe starts the node's rounds, interval apart from a random phase,
// until they can decide nothing.
func (h *healthSim) probe(name string) {
	if h.probing[name] || !h.interesting(name) {
		return
	}
	h.probing[name] = true
	p := h.cfg.For(name)
	var round func()
	round = func() {
		if !h.interesting(name) {
			h.probing[name] = false
			return
		}
		start := h.e.clk.Now()
		dead := h.dead[name]
		took := time.Millisecond
		if dead {
			took = p.Timeout
		}
		h.e.After(took, func() {
			c := health.CheckResult{Kind: health.CheckIKE, OK: !dead, Detail: "INVALID_KE_PAYLOAD"}
			if dead {
				c.Detail, c.Err = "", "timeout"
			}
			h.passed[name] = !dead
			if dead {
				h.failRun[name]++
			} else {
				h.failRun[name] = 0
			}
			h.step(func() {
				h.m.Round(health.Round{Node: name, Start: start, End: h.e.clk.Now(), Checks: []health.CheckResult{c}})
			})
			if n, _ := h.e.master().Table().Node(name); dead && n.State == affinity.NodeActive && h.failRun[name] >= p.Fall {
				h.stalled[name] = true // nothing more to learn until something changes
			}
		})
		h.e.After(p.Interval, round)
	}
	h.e.After(time.Duration(h.rng.Int64N(int64(p.Interval))), round)
}

// apply commits a decision as the daemon does (director.Daemon.Apply).
func (h *healthSim) apply(d health.Decision) error {
	e := h.e
	idx, ok := h.event[d.Node]
	if !ok {
		idx = -1
	}
	prev := e.cur
	e.cur = idx
	defer func() { e.cur = prev }()
	var p *affinity.Plan
	a, err := e.master().Do(func(t *affinity.Table) ([]affinity.Change, error) {
		var err error
		if p, err = t.PlanHealthState(d.Node, d.State, d.Record.Clip(), d.Reason); err != nil {
			return nil, err
		}
		return p.Batch(), nil
	})
	e.follow()
	if err != nil {
		return fmt.Errorf("health decision %s: %w", d, err)
	}
	if idx >= 0 {
		rp := &e.rep.Events[idx]
		rp.rev = a.Revision
		rp.Unplaced += len(p.Unplaced)
		rp.Wanted += p.Wanted
		if rp.DetectedMs == nil {
			rp.DetectedMs = ptrTo(ms(e.now - h.diedAt[d.Node]))
		}
	}
	delete(h.event, d.Node)
	// A decision can end a panic or a hold: probe the stalled nodes.
	defer h.wake()
	return nil
}

// DarkStats is how long the tunnels of a node that died were dark: from
// the death until they were up again on their new node (detection, the
// move, and the peers' re-establishment), or until they ended.
type DarkStats struct {
	Tunnels int     `json:"tunnels"`
	MeanS   float64 `json:"mean_s"`
	MaxS    float64 `json:"max_s"`
	// TunnelHours is the total of every tunnel's dark time.
	TunnelHours float64 `json:"tunnel_hours"`
	ended       int
	sum         time.Duration
}

// lit ends a tunnel's dark time.
func (e *engine) lit(x *tunnel) {
	if x.darkEvent < 0 {
		return
	}
	d := e.rep.Events[x.darkEvent].Dark
	dark := e.now - x.darkSince
	d.ended++
	d.sum += dark
	d.MaxS = max(d.MaxS, round3(dark.Seconds()))
	x.darkEvent = -1
}

func (d *DarkStats) finish() {
	if d.ended > 0 {
		d.MeanS = round3(d.sum.Seconds() / float64(d.ended))
	}
	d.TunnelHours = round3(d.sum.Hours())
}

// report summarises the machine's counters, when the run had node
// deaths or revivals.
func (h *healthSim) report() *HealthReport {
	c := h.m.Status().Counters
	if c.Rounds == 0 {
		return nil
	}
	return &HealthReport{
		Settings: fmt.Sprintf("interval %s, timeout %s, fall %d, rise %d, max_down_fraction %g",
			FormatDuration(h.cfg.Interval), FormatDuration(h.cfg.Timeout), h.cfg.Fall, h.cfg.Rise, h.cfg.MaxDownFraction),
		Rounds: c.Rounds, Downs: c.Downs, Ups: c.Ups, Held: c.Holds, Panics: c.Panics,
	}
}
