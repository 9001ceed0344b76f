package director

import (
	"errors"
	"strings"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/director/metrics"
	"github.com/tunneldirector/tunneldirector/director/replication"
	"github.com/tunneldirector/tunneldirector/ipvs"
	"github.com/tunneldirector/tunneldirector/store"
)

// Reconcile kinds, the kind label of the dataplane families.
const (
	reconcileFull   = "full"
	reconcileDelta  = "delta"
	reconcileVerify = "verify"
)

// daemonMetrics are the families of events only the metrics need: moves,
// imports, reconcile durations and results, drift repairs, first packets.
// What the daemon keeps anyway (the table, its status, the replicator's
// counters) is read at scrape time by daemonCollector.
type daemonMetrics struct {
	moves        *prometheus.CounterVec
	imports      *prometheus.CounterVec
	duration     *prometheus.HistogramVec
	reconciles   *prometheus.CounterVec
	drift        *prometheus.CounterVec
	firstPackets prometheus.Counter
	pins         prometheus.Counter
}

func newDaemonMetrics() *daemonMetrics {
	m := &daemonMetrics{
		moves: metrics.NewCounterVec(metrics.Table, "moves_total",
			"Tunnels that changed owner, by reason: node_down, node_removed, rebalance, import (an NMS pin), replication (a snapshot), other. Counted on both directors as the change reaches their kernel.", "reason"),
		imports: metrics.NewCounterVec(metrics.Table, "imports_total",
			"NMS imports by kind (tunnels, nodes) and result: committed, unchanged, dry_run, refused (bad input, a conflict), failed.", "kind", "result"),
		duration: metrics.NewHistogramVec(metrics.Dataplane, "reconcile_duration_seconds",
			"Kernel time of each reconcile: full (a whole sync), delta (committed changes), verify (read back and repair).", metrics.DurationBuckets, "kind"),
		reconciles: metrics.NewCounterVec(metrics.Dataplane, "reconciles_total",
			"Reconciles by kind and result: ok, partial (some objects not programmed, the rest applied), error.", "kind", "result"),
		drift: metrics.NewCounterVec(metrics.Dataplane, "drift_repairs_total",
			"Kernel objects a verify found changed by someone else and repaired, by kind: added (missing), changed, removed (foreign).", "kind"),
		firstPackets: prometheus.NewCounter(prometheus.CounterOpts{Name: metrics.Name(metrics.Dataplane, "unknown_peer_packets_total", true),
			Help: "First packets (IKE, NAT-T, ESP, AH) of peers the table did not know, steered by their bucket's node (or the node of their first packet in its pin window)."}),
		pins: prometheus.NewCounter(prometheus.CounterOpts{Name: metrics.Name(metrics.Dataplane, "learned_pins_total", true),
			Help: "Unknown peers pinned into the table on the node the kernel marked their first packet for."}),
	}
	// Every label value exists from the start: a rate over a series that
	// appears at its first event misses that event.
	for _, r := range []string{"node_down", "node_removed", "rebalance", "import", "replication", "other"} {
		m.moves.WithLabelValues(r)
	}
	for _, k := range []string{"tunnels", "nodes"} {
		for _, r := range []string{"committed", "unchanged", "dry_run", "refused", "failed"} {
			m.imports.WithLabelValues(k, r)
		}
	}
	for _, k := range []string{reconcileFull, reconcileDelta, reconcileVerify} {
		m.duration.WithLabelValues(k)
		for _, r := range []string{"ok", "partial", "error"} {
			m.reconciles.WithLabelValues(k, r)
		}
	}
	for _, k := range []string{"added", "changed", "removed"} {
		m.drift.WithLabelValues(k)
	}
	return m
}

func (m *daemonMetrics) collectors() []prometheus.Collector {
	return []prometheus.Collector{m.moves, m.imports, m.duration, m.reconciles, m.drift, m.firstPackets, m.pins}
}

// reconciled counts one reconcile of kind and its kernel time.
func (m *daemonMetrics) reconciled(kind string, st ipvs.Stats, err error) {
	result := "ok"
	var pe *ipvs.PartialError
	switch {
	case errors.As(err, &pe):
		result = "partial"
	case err != nil:
		result = "error"
	}
	m.reconciles.WithLabelValues(kind, result).Inc()
	if result != "error" {
		m.duration.WithLabelValues(kind).Observe(st.Duration.Seconds())
	}
	if kind == reconcileVerify && result != "error" {
		m.drift.WithLabelValues("added").Add(float64(st.Added))
		m.drift.WithLabelValues("changed").Add(float64(st.Changed))
		m.drift.WithLabelValues("removed").Add(float64(st.Removed))
	}
}

// countMoves counts the tunnels a committed batch moved between nodes.
func (m *daemonMetrics) countMoves(b store.Batch) {
	if !b.Resolved {
		return // a batch from the journal: who owned what before is not known
	}
	// Counted per run of one reason (a node down's moves share theirs),
	// not looked up in the counter vector per move.
	reason, n := "", 0
	flush := func() {
		if n > 0 {
			m.moves.WithLabelValues(moveReason(reason)).Add(float64(n))
		}
	}
	for i := range b.Changes {
		c := &b.Changes[i]
		if c.Kind == affinity.PutTunnel && c.Old != nil && c.Old.Node != "" && c.Old.Node != c.Tunnel.Node {
			if c.Reason != reason {
				flush()
				reason, n = c.Reason, 0
			}
			n++
		}
	}
	flush()
}

// moveReason turns a change's reason (free text naming nodes) into the
// bounded label of tunneldirector_table_moves_total.
func moveReason(r string) string {
	switch {
	case strings.HasPrefix(r, "import"):
		return "import"
	case r == "snapshot":
		return "replication"
	case strings.HasPrefix(r, "node ") && strings.HasSuffix(r, " removed"):
		return "node_removed"
	case strings.HasPrefix(r, "node ") && strings.HasSuffix(r, " down") && !strings.Contains(r, " is "):
		return "node_down"
	case strings.HasPrefix(r, "node "):
		// The rebalance planner's reasons: "node X is draining",
		// "node X holds N, above its bound", "node X above its share".
		return "rebalance"
	}
	return "other"
}

// imported counts an import by kind and result.
func (m *daemonMetrics) imported(kind string, res *ImportResult, err error) {
	result := "committed"
	switch {
	case err != nil && IsRefused(err):
		result = "refused"
	case err != nil:
		result = "failed"
	case res.DryRun:
		result = "dry_run"
	case !res.Changed:
		result = "unchanged"
	}
	m.imports.WithLabelValues(kind, result).Inc()
}

// daemonCollector reads the daemon's state at scrape time: the table
// (tunnels per node and source, nodes per state, revision), the kernel
// (mode, revision, elements per map, problems) and the pair.
type daemonCollector struct {
	d *Daemon

	tunnels, nodes, revision, buckets                    *prometheus.Desc
	mode, kernelRevision, elements, problems             *prometheus.Desc
	role, reachable, lagRevisions, lagSeconds, ready     *prometheus.Desc
	equal, sent, received, resent, nacks, sendErrors     *prometheus.Desc
	authFailures, replays, snapshotsSent, snapshotsApply *prometheus.Desc
	digestMatches, digestMismatches                      *prometheus.Desc
	etcdConnected, etcdElected                           *prometheus.Desc
}

func newDaemonCollector(d *Daemon) *daemonCollector {
	g := func(sub, name, help string, labels ...string) *prometheus.Desc {
		return metrics.NewDesc(sub, name, help, false, labels...)
	}
	c := func(name, help string) *prometheus.Desc { return metrics.NewDesc(metrics.Pair, name, help, true) }
	return &daemonCollector{d: d,
		tunnels:          g(metrics.Table, "tunnels", "Tunnels per owner node and source: nms (imported or added by an operator) or learned (pinned from a first packet).", "node", "source"),
		nodes:            g(metrics.Table, "nodes", "Nodes per state: active, draining, down.", "state"),
		revision:         g(metrics.Table, "revision", "The table's revision (every committed change adds one)."),
		buckets:          g(metrics.Table, "unknown_peer_buckets", "Unknown-peer hash buckets per node: the share of unknown peers' first packets each node takes.", "node"),
		mode:             g(metrics.Dataplane, "mode", "1 for the dataplane mode in force: ipvs or route-only.", "mode"),
		kernelRevision:   g(metrics.Dataplane, "kernel_revision", "The table revision the kernel holds; below tunneldirector_table_revision while a change is being applied."),
		elements:         g(metrics.Dataplane, "kernel_elements", "Elements the director programmed into the kernel, by map: peers (peer address to node), subnets (protected subnet to node), nodes (marks, routes, services).", "map"),
		problems:         g(metrics.Dataplane, "kernel_problems", "Kernel objects the last reconcile could not program (the rest was applied; retried at every verify)."),
		role:             g(metrics.Pair, "role", "1 for this director's role in the pair: master, backup or fault.", "role"),
		reachable:        g(metrics.Pair, "peer_reachable", "1 while the other director is heard on the sync link."),
		lagRevisions:     g(metrics.Pair, "lag_revisions", "How many revisions the backup is behind the master."),
		lagSeconds:       g(metrics.Pair, "lag_seconds", "How long the backup has been behind the master."),
		ready:            g(metrics.Pair, "ready", "1 when this director's table is in sync and it may win a VRRP election."),
		equal:            g(metrics.Pair, "tables_equal", "1 when the last digest exchange proved both tables equal and nothing changed since."),
		sent:             c("datagrams_sent_total", "Datagrams sent on the sync link."),
		received:         c("datagrams_received_total", "Datagrams received on the sync link and accepted."),
		resent:           c("datagrams_resent_total", "Changes sent again after a NACK or a timeout."),
		nacks:            c("nacks_total", "Gaps in the sequence (lost datagrams) the receiver asked for again."),
		sendErrors:       c("send_errors_total", "Datagrams the kernel refused to send."),
		authFailures:     c("auth_failures_total", "Datagrams dropped because their HMAC did not verify."),
		replays:          c("replays_total", "Datagrams dropped as replays."),
		snapshotsSent:    c("snapshots_sent_total", "Full snapshots sent to a peer too far behind."),
		snapshotsApply:   c("snapshots_applied_total", "Full snapshots received and applied."),
		digestMatches:    c("digest_matches_total", "Digest exchanges that proved both tables equal."),
		digestMismatches: c("digest_mismatches_total", "Digest exchanges that found the tables different (the differing ranges are repaired)."),
		etcdConnected:    g(metrics.Etcd, "connected", "1 while this director follows the shared table in etcd; 0: it forwards from its last table (stale) and makes no writes."),
		etcdElected:      g(metrics.Etcd, "elected", "1 while this director is the elected one that pins learned peers for all."),
	}
}

// Describe sends every family's description.
func (c *daemonCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.tunnels, c.nodes, c.revision, c.buckets, c.mode, c.kernelRevision, c.elements, c.problems,
		c.role, c.reachable, c.lagRevisions, c.lagSeconds, c.ready, c.equal, c.sent, c.received, c.resent, c.nacks,
		c.sendErrors, c.authFailures, c.replays, c.snapshotsSent, c.snapshotsApply, c.digestMatches, c.digestMismatches,
		c.etcdConnected, c.etcdElected} {
		ch <- d
	}
}

// Collect reads the table, the daemon's status and the replicator.
func (c *daemonCollector) Collect(ch chan<- prometheus.Metric) {
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter := func(d *prometheus.Desc, v uint64) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v))
	}
	t := c.d.st.Table()
	all := t.Counts()
	learned := t.CountsWhere(func(id string) bool { return strings.HasPrefix(id, affinity.LearnedPrefix) })
	states := map[string]int{}
	for _, s := range []affinity.NodeState{affinity.NodeActive, affinity.NodeDraining, affinity.NodeDown} {
		states[s.String()] = 0
	}
	for _, n := range t.Nodes() {
		states[n.State.String()]++
		gauge(c.tunnels, float64(all[n.Name]-learned[n.Name]), n.Name, "nms")
		gauge(c.tunnels, float64(learned[n.Name]), n.Name, "learned")
	}
	for s, n := range states {
		gauge(c.nodes, float64(n), s)
	}
	gauge(c.revision, float64(t.Revision()))

	s := c.d.Status()
	if b := s.UnknownPeers; b != nil {
		for _, n := range t.Nodes() {
			gauge(c.buckets, float64(b.Nodes[n.Name]), n.Name)
		}
	}
	for _, m := range []ipvs.Mode{ipvs.ModeIPVS, ipvs.ModeRouteOnly} {
		gauge(c.mode, bool01(s.Mode == m.String()), m.String())
	}
	gauge(c.kernelRevision, float64(s.KernelRevision))
	peers, subnets, nodes := c.d.kernelElements()
	gauge(c.elements, float64(peers), "peers")
	gauge(c.elements, float64(subnets), "subnets")
	gauge(c.elements, float64(nodes), "nodes")
	gauge(c.problems, float64(len(s.KernelProblems)))

	if e := s.Etcd; e != nil {
		gauge(c.etcdConnected, bool01(e.Connected))
		gauge(c.etcdElected, bool01(e.Leader))
	}
	r := s.Replication
	if r == nil {
		return // alone: no pair families
	}
	for _, role := range []replication.Role{replication.RoleMaster, replication.RoleBackup, replication.RoleFault} {
		gauge(c.role, bool01(r.Role == role), role.String())
	}
	gauge(c.reachable, bool01(r.Peer.Alive))
	gauge(c.lagRevisions, float64(r.LagRevisions))
	gauge(c.lagSeconds, r.LagSeconds)
	gauge(c.ready, bool01(r.Ready))
	gauge(c.equal, bool01(r.TablesEqual))
	k := r.Counters
	counter(c.sent, k.DatagramsSent)
	counter(c.received, k.DatagramsReceived)
	counter(c.resent, k.Resends)
	counter(c.nacks, k.Nacks)
	counter(c.sendErrors, k.SendErrors)
	counter(c.authFailures, k.AuthFailures)
	counter(c.replays, k.Replays)
	counter(c.snapshotsSent, k.SnapshotsSent)
	counter(c.snapshotsApply, k.SnapshotsApplied)
	counter(c.digestMatches, k.DigestMatches)
	counter(c.digestMismatches, k.DigestMismatches)
}

func bool01(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// elementDelta is how many peer and subnet map elements the committed
// batches past revision after add (negative: remove); a delta the daemon
// applied changes the kernel's maps by exactly this much.
func elementDelta(batches []store.Batch, after uint64) (peers, subnets int) {
	for _, b := range batches {
		if b.Revision <= after {
			continue // counted by the full sync that read the table past it
		}
		for i := range b.Changes {
			c := &b.Changes[i]
			if c.Old != nil && (c.Kind == affinity.PutTunnel || c.Kind == affinity.DeleteTunnel) {
				peers, subnets = peers-1, subnets-len(c.Old.Subnets)
			}
			if c.Kind == affinity.PutTunnel {
				peers, subnets = peers+1, subnets+len(c.Tunnel.Subnets)
			}
		}
	}
	return peers, subnets
}
