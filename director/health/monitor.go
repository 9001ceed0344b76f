package health

import (
	"context"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"sync"
	"time"
)

// Sink receives the master's decisions. The daemon implements it: Apply
// commits the node's state with d.Reason and stores d.Record in the same
// transaction, and returns an error when it did not (not master any more,
// the store refused): the Monitor then takes the decision again at the
// next round. Apply is called from the Monitor's goroutine and must not
// call Monitor.Status.
type Sink interface {
	Apply(d Decision) error
}

// Heartbeats is what the node agent's report handler calls for every
// heartbeat of an agent (the heartbeat check).
type Heartbeats interface {
	Heartbeat(node string)
}

// Options wire a Monitor.
type Options struct {
	Config Config
	Sink   Sink
	Log    *slog.Logger
	// Clock is the time source of the state machine (nil: real time).
	// Rounds are scheduled on real timers.
	Clock Clock
	// Source4 and Source6 are the director's inside addresses, the
	// checks' source (invalid: the kernel chooses by route).
	Source4, Source6 netip.Addr
	// Interface is the director's inside interface: while it is down,
	// nothing moves. Empty: not watched.
	Interface string
}

// seams are what the tests replace: sockets, the link watcher, sleeping.
type seams struct {
	dial      dialFunc
	watchLink func(ctx context.Context, name string, fn func(up bool)) error
}

// Monitor runs the health checks of every node on its own schedule,
// steps a Machine with the results, and hands the master's decisions to
// the Sink. All methods are safe for concurrent use.
type Monitor struct {
	opts  Options
	seams seams
	chk   *checker

	mu sync.Mutex // guards mc; held while a step (and its Apply) runs
	mc *Machine

	qmu   sync.Mutex
	queue []func(*Machine)
	// changed: an event in the queue may change the nodes to probe
	// (rounds and heartbeats do not, and are most events).
	changed bool
	wake    chan struct{}

	probers map[string]*prober // owned by the Run goroutine
}

type prober struct {
	addr   netip.Addr
	p      Params
	cancel context.CancelFunc
	done   chan struct{}
}

// New returns a Monitor that probes from the current network namespace
// and watches the inside interface over netlink.
func New(o Options) *Monitor {
	return newMonitor(o, seams{dial: dialKernel, watchLink: watchLink})
}

func newMonitor(o Options, s seams) *Monitor {
	if o.Log == nil {
		o.Log = slog.Default()
	}
	m := &Monitor{
		opts:    o,
		seams:   s,
		chk:     &checker{dial: s.dial, source4: o.Source4, source6: o.Source6},
		wake:    make(chan struct{}, 1),
		probers: map[string]*prober{},
	}
	m.mc = NewMachine(o.Config, o.Clock, m.apply, o.Log)
	return m
}

func (m *Monitor) apply(d Decision) error {
	if m.opts.Sink == nil {
		return nil
	}
	return m.opts.Sink.Apply(d)
}

// enqueue hands an event to the Run goroutine; it never blocks, so a
// Sink may call SetNodes from inside Apply.
func (m *Monitor) enqueue(f func(*Machine)) { m.push(f, false) }

func (m *Monitor) push(f func(*Machine), changes bool) {
	m.qmu.Lock()
	m.queue = append(m.queue, f)
	m.changed = m.changed || changes
	m.qmu.Unlock()
	select {
	case m.wake <- struct{}{}:
	default:
	}
}

// SetNodes gives the table's nodes and their records at revision rev
// (call it at start and after every committed change of nodes or records,
// including replicated ones on the backup).
func (m *Monitor) SetNodes(rev uint64, nodes []Node) {
	nodes = append([]Node(nil), nodes...)
	m.push(func(mc *Machine) { mc.SetNodes(rev, nodes) }, true)
}

// SetRole says whether this director is the master.
func (m *Monitor) SetRole(master bool) { m.enqueue(func(mc *Machine) { mc.Role(master) }) }

// SetConfig replaces the configuration (a reload).
func (m *Monitor) SetConfig(cfg Config) { m.push(func(mc *Machine) { mc.SetConfig(cfg) }, true) }

// Heartbeat records a heartbeat of the node's agent.
func (m *Monitor) Heartbeat(node string) { m.enqueue(func(mc *Machine) { mc.Heartbeat(node) }) }

// LinkChanged reports the inside interface up or down (the built-in
// watcher calls it; a caller without Interface may too).
func (m *Monitor) LinkChanged(up bool) { m.enqueue(func(mc *Machine) { mc.Link(up) }) }

// Status returns the current view.
func (m *Monitor) Status() Status {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.mc.Status()
}

// Run probes and decides until ctx ends. It returns the link watcher's
// error if the interface cannot be watched.
func (m *Monitor) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	watchErr := make(chan error, 1)
	if m.opts.Interface != "" {
		go func() { watchErr <- m.seams.watchLink(ctx, m.opts.Interface, m.LinkChanged) }()
	}
	defer m.stopProbers()
	for {
		select {
		case <-ctx.Done():
			return nil
		case err := <-watchErr:
			if err != nil && ctx.Err() == nil {
				return err
			}
		case <-m.wake:
		}
		m.qmu.Lock()
		q, changed := m.queue, m.changed
		m.queue, m.changed = nil, false
		m.qmu.Unlock()
		m.mu.Lock()
		for _, f := range q {
			f(m.mc)
		}
		var want map[string]target
		if changed {
			want = m.wanted()
		}
		m.mu.Unlock()
		if changed {
			m.reconcileProbers(ctx, want)
		}
	}
}

type target struct {
	addr netip.Addr
	p    Params
}

func (m *Monitor) wanted() map[string]target {
	if !m.mc.cfg.Enabled {
		return nil
	}
	out := make(map[string]target, len(m.mc.nodes))
	for name, n := range m.mc.nodes {
		if n.Addr.IsValid() {
			out[name] = target{n.Addr, n.p}
		}
	}
	return out
}

// reconcileProbers starts a prober for every node that lacks one and
// restarts those whose address or parameters changed.
func (m *Monitor) reconcileProbers(ctx context.Context, want map[string]target) {
	for name, pr := range m.probers {
		t, ok := want[name]
		if ok && t.addr == pr.addr && reflect.DeepEqual(t.p, pr.p) {
			continue
		}
		pr.cancel()
		<-pr.done
		delete(m.probers, name)
	}
	for name, t := range want {
		if _, ok := m.probers[name]; ok {
			continue
		}
		pctx, cancel := context.WithCancel(ctx)
		pr := &prober{addr: t.addr, p: t.p, cancel: cancel, done: make(chan struct{})}
		m.probers[name] = pr
		go m.probe(pctx, name, pr)
	}
}

func (m *Monitor) stopProbers() {
	for name, pr := range m.probers {
		pr.cancel()
		<-pr.done
		delete(m.probers, name)
	}
}

// probe runs one node's rounds, each interval from the start of the last,
// the first after a random part of the interval so that the farm's probes
// spread out.
func (m *Monitor) probe(ctx context.Context, name string, pr *prober) {
	defer close(pr.done)
	interval := max(pr.p.Interval, 10*time.Millisecond)
	t := time.NewTimer(rand.N(interval))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		next := time.Now().Add(interval)
		clock := m.mc.clock
		start := clock.Now()
		checks := m.chk.round(ctx, name, pr.addr, pr.p)
		if ctx.Err() != nil {
			return
		}
		r := Round{Node: name, Start: start, End: clock.Now(), Checks: checks}
		m.enqueue(func(mc *Machine) { mc.Round(r) })
		t.Reset(time.Until(next))
	}
}
