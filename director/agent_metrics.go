package director

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/tunneldirector/tunneldirector/director/agents"
	"github.com/tunneldirector/tunneldirector/director/metrics"
	"github.com/tunneldirector/tunneldirector/xfrm/report"
)

// agentCollector reads the agents' merge at scrape time (the merge keeps
// its counters anyway; see the metrics package's rules): reports and
// refusals by reason, what the merges changed, and per node what its
// agent reports. On a backup every family is there, at zero: the agents
// report to the master only.
type agentCollector struct {
	d *Daemon

	reports, refused, merges, changes   *prometheus.Desc
	sas, tunnels, misplaced, lastReport *prometheus.Desc
	unapplied                           *prometheus.Desc
}

func newAgentCollector(d *Daemon) *agentCollector {
	g, c := metrics.Descs(metrics.Agent)
	return &agentCollector{d: d,
		reports:    c("reports_total", "Agent reports accepted by this director as master, by kind: full, delta, heartbeat.", "kind"),
		refused:    c("refused_total", "Agent reports refused, by reason: unauthorized, unknown_node, wrong_node, off, method, not_master, too_large, invalid, error.", "reason"),
		merges:     c("merges_total", "Merges of the agents' facts into the table, by result: ok (committed or nothing to change), error.", "result"),
		changes:    c("changes_total", "What the merges did, by kind: learned (a peer no one listed), subnets (a learned tunnel's subnets changed to what its owner negotiated), followed (a misplaced tunnel moved to its SA, adopt: follow-sa), expired (a learned tunnel past learned_ttl).", "kind"),
		sas:        g("sas", "SAs the node's agent reports (nodes whose agent reports to this director).", "node"),
		tunnels:    g("tunnels", "Tunnels (peers with SAs) the node's agent reports.", "node"),
		misplaced:  g("misplaced_tunnels", "Peers the node holds SAs of while the table gives them to another node (at the last sweep).", "node"),
		lastReport: g("last_report_timestamp_seconds", "When the node's agent last got a report accepted (its heartbeat), Unix time.", "node"),
		unapplied:  g("unapplied_subnets", "Negotiated subnets (and learned peers) reported and not applied: a conflict, a VIP, outside agents.subnets, over the limit."),
	}
}

// Describe sends every family's description.
func (c *agentCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.reports, c.refused, c.merges, c.changes, c.sas, c.tunnels, c.misplaced, c.lastReport, c.unapplied} {
		ch <- d
	}
}

// Collect reads the merge's status and every table node's agent view.
func (c *agentCollector) Collect(ch chan<- prometheus.Metric) {
	m := c.d.agent.merger
	if m == nil {
		return
	}
	s := m.Status()
	counter := func(d *prometheus.Desc, v uint64, label string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), label)
	}
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	for _, k := range []report.Kind{report.KindFull, report.KindDelta, report.KindHeartbeat} {
		counter(c.reports, s.Reports[k], string(k))
	}
	for _, r := range agents.RefusalReasons {
		counter(c.refused, s.Refused[r], r)
	}
	counter(c.merges, s.Merges-s.MergeErrors, "ok")
	counter(c.merges, s.MergeErrors, "error")
	counter(c.changes, s.Learned, "learned")
	counter(c.changes, s.SubnetsApplied, "subnets")
	counter(c.changes, s.Followed, "followed")
	counter(c.changes, s.Expired, "expired")
	gauge(c.unapplied, float64(s.Unapplied))
	for _, n := range c.d.st.Table().Nodes() {
		v, ok := m.Node(n.Name)
		if !ok {
			continue
		}
		gauge(c.sas, float64(v.SAs), n.Name)
		gauge(c.tunnels, float64(v.Tunnels), n.Name)
		gauge(c.misplaced, float64(v.Misplaced), n.Name)
		gauge(c.lastReport, float64(v.LastReport.UnixMilli())/1e3, n.Name)
	}
}
