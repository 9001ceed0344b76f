package director

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/director/health"
	"github.com/tunneldirector/tunneldirector/director/metrics"
)

// healthStates are the values of the state label of
// tunneldirector_health_node_state, one per node at a time.
var healthStates = []string{"up", "failing", "down", "held", "operator"}

// healthState is a node's value of that label.
func healthState(v health.NodeView) string {
	switch {
	case v.Operator:
		return "operator"
	case !v.HeldUntil.IsZero():
		return "held"
	case v.State == affinity.NodeDown:
		return "down"
	case v.Failing > 0:
		return "failing"
	}
	return "up"
}

// healthCollector reads the health checks' view at scrape time (the
// Monitor keeps it; nothing is counted twice): per node its state, its
// failing rounds and its IKE probe's round trip; the checks' counters;
// the decisions this director committed.
type healthCollector struct {
	d *Daemon

	state, failing, latency, panicking, linkUp *prometheus.Desc
	rounds, failed, transitions, moves         *prometheus.Desc
	holds, panics, suppressed                  *prometheus.Desc
}

func newHealthCollector(d *Daemon) *healthCollector {
	g, c := metrics.Descs(metrics.Health)
	return &healthCollector{d: d,
		state:       g("node_state", "1 for each node's health state: up, failing (a round failed, not yet fall), down (by health), held (down and held for flapping), operator (drained or down by hand: health leaves it alone).", "node", "state"),
		failing:     g("node_failing_rounds", "Failing rounds in a row of each node (fall of them take an active node down).", "node"),
		latency:     g("probe_latency_seconds", "Round trip of each node's IKE probe in its last round (0 without an answer).", "node"),
		panicking:   g("panic", "1 while more than max_down_fraction of the nodes fail: the checks move nothing."),
		linkUp:      g("inside_link_up", "1 while the director's inside interface is up (down: the checks move nothing)."),
		rounds:      c("rounds_total", "Check rounds run (every node, every interval)."),
		failed:      c("failed_rounds_total", "Check rounds that failed."),
		transitions: c("transitions_total", "Node state changes the health checks committed on this director, by state: down, up.", "state"),
		moves:       c("moved_tunnels_total", "Tunnels the health checks' downs moved on this director."),
		holds:       c("holds_total", "Downs that held a flapping node down."),
		panics:      c("panics_total", "Times more than max_down_fraction of the nodes failed at once."),
		suppressed:  c("suppressed_downs_total", "Downs due but not taken, by reason: panic, link (the inside interface down).", "reason"),
	}
}

// Describe sends every family's description.
func (c *healthCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.state, c.failing, c.latency, c.panicking, c.linkUp,
		c.rounds, c.failed, c.transitions, c.moves, c.holds, c.panics, c.suppressed} {
		ch <- d
	}
}

// Collect reads the Monitor's status and the daemon's counters; nothing
// while the checks are off.
func (c *healthCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.d.health.Status()
	if !s.Enabled {
		return
	}
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, labels...)
	}
	for _, v := range s.Nodes {
		now := healthState(v)
		for _, st := range healthStates {
			gauge(c.state, bool01(st == now), v.Name, st)
		}
		gauge(c.failing, float64(v.Failing), v.Name)
		gauge(c.latency, v.Latency.Seconds(), v.Name)
	}
	gauge(c.panicking, bool01(!s.PanicSince.IsZero()))
	gauge(c.linkUp, bool01(s.LinkUp))
	k := s.Counters
	counter(c.rounds, float64(k.Rounds))
	counter(c.failed, float64(k.Failed))
	counter(c.holds, float64(k.Holds))
	counter(c.panics, float64(k.Panics))
	counter(c.suppressed, float64(k.PanicDowns), "panic")
	counter(c.suppressed, float64(k.LinkDowns), "link")
	c.d.statMu.Lock()
	downs, ups, moved := c.d.stat.HealthDowns, c.d.stat.HealthUps, c.d.stat.HealthMoves
	c.d.statMu.Unlock()
	counter(c.transitions, float64(downs), "down")
	counter(c.transitions, float64(ups), "up")
	counter(c.moves, float64(moved))
}
