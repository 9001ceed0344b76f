package director

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/tunneldirector/tunneldirector/director/ctsync"
	"github.com/tunneldirector/tunneldirector/director/metrics"
)

// ctMetric is one conntrack family read from the syncer's status at
// scrape time; label, when set, names the value of the family's one label.
type ctMetric struct {
	desc  *prometheus.Desc
	typ   prometheus.ValueType
	label string
	value func(*ctsync.Status) float64
}

// conntrackCollector exports the conntrack replication's status (the same
// counters `tunneldirector status` shows) as the conntrack families.
type conntrackCollector struct {
	status  func() ctsync.Status
	metrics []ctMetric
}

func newConntrackCollector(status func() ctsync.Status) *conntrackCollector {
	var ms []ctMetric
	add := func(name, help string, counter bool, labels []string, vals ...ctMetric) {
		d := metrics.NewDesc(metrics.Conntrack, name, help, counter, labels...)
		typ := prometheus.GaugeValue
		if counter {
			typ = prometheus.CounterValue
		}
		for _, v := range vals {
			v.desc, v.typ = d, typ
			ms = append(ms, v)
		}
	}
	one := func(f func(*ctsync.Status) uint64) ctMetric {
		return ctMetric{value: func(s *ctsync.Status) float64 { return float64(f(s)) }}
	}
	lab := func(l string, f func(*ctsync.Status) uint64) ctMetric {
		m := one(f)
		m.label = l
		return m
	}
	add("cached_flows", "Flows in this director's cache of the master's conntrack entries.", false, nil,
		ctMetric{value: func(s *ctsync.Status) float64 { return float64(s.Cached) }})
	add("cache_max_flows", "The cache's bound (replication.conntrack.cache_max).", false, nil,
		ctMetric{value: func(s *ctsync.Status) float64 { return float64(s.CacheMax) }})
	add("records_total", "Conntrack records by direction: sent (master: events, refreshes, resyncs) or received (backup).", true, []string{"kind"},
		lab("sent", func(s *ctsync.Status) uint64 { return s.Sent }),
		lab("received", func(s *ctsync.Status) uint64 { return s.Received }))
	add("filtered_total", "Kernel events not sent: not the pair's traffic, or held back by their TCP state.", true, nil,
		one(func(s *ctsync.Status) uint64 { return s.Filtered }))
	add("lost_total", "Losses by kind: events (the kernel's event socket overflowed; a resync follows), queue (records the full send queue refused), datagrams (a backup skipped by a reset).", true, []string{"kind"},
		lab("events", func(s *ctsync.Status) uint64 { return s.EventsLost }),
		lab("queue", func(s *ctsync.Status) uint64 { return s.QueueFull }),
		lab("datagrams", func(s *ctsync.Status) uint64 { return s.Stream.Lost }))
	add("datagrams_sent_total", "Conntrack datagrams sent on the sync link.", true, nil,
		one(func(s *ctsync.Status) uint64 { return s.Stream.DatagramsSent }))
	add("datagrams_received_total", "Conntrack datagrams received and accepted.", true, nil,
		one(func(s *ctsync.Status) uint64 { return s.Stream.DatagramsReceived }))
	add("datagrams_resent_total", "Conntrack datagrams sent again after a NACK.", true, nil,
		one(func(s *ctsync.Status) uint64 { return s.Stream.Resent }))
	add("malformed_total", "Authenticated conntrack datagrams refused by kind: datagram (the stream's framing did not decode) or records (its records did not).", true, []string{"kind"},
		lab("datagram", func(s *ctsync.Status) uint64 { return s.Stream.Malformed }),
		lab("records", func(s *ctsync.Status) uint64 { return s.Malformed }))
	add("resyncs_total", "Full resyncs by kind: sent (master) or received (backup).", true, []string{"kind"},
		lab("sent", func(s *ctsync.Status) uint64 { return s.ResyncsSent }),
		lab("received", func(s *ctsync.Status) uint64 { return s.ResyncsReceived }))
	add("cache_removed_total", "Flows removed from the cache by reason: destroyed (the master's destroy), expired (own timeout), evicted (cache full, oldest first), swept (absent from a full resync).", true, []string{"reason"},
		lab("destroyed", func(s *ctsync.Status) uint64 { return s.Cache.Destroys }),
		lab("expired", func(s *ctsync.Status) uint64 { return s.Cache.Expired }),
		lab("evicted", func(s *ctsync.Status) uint64 { return s.Cache.Evicted }),
		lab("swept", func(s *ctsync.Status) uint64 { return s.Cache.Swept }))
	add("commits_total", "Commits of the cache into the kernel (on becoming master, or ctl conntrack commit).", true, nil,
		one(func(s *ctsync.Status) uint64 { return s.Commits }))
	add("committed_flows_total", "Flows committed into the kernel by result: ok or failed.", true, []string{"result"},
		lab("ok", func(s *ctsync.Status) uint64 { return s.Committed }),
		lab("failed", func(s *ctsync.Status) uint64 { return s.CommitFailed }))
	add("last_commit_duration_seconds", "How long the last commit took (0 before the first).", false, nil,
		ctMetric{value: func(s *ctsync.Status) float64 {
			if s.LastCommit == nil {
				return 0
			}
			return s.LastCommit.Took.Seconds()
		}})
	return &conntrackCollector{status: status, metrics: ms}
}

// Describe sends every family's description once.
func (c *conntrackCollector) Describe(ch chan<- *prometheus.Desc) {
	var last *prometheus.Desc
	for _, m := range c.metrics {
		if m.desc != last {
			ch <- m.desc
			last = m.desc
		}
	}
}

// Collect reads the syncer's status once and sends every value.
func (c *conntrackCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.status()
	for _, m := range c.metrics {
		var labels []string
		if m.label != "" {
			labels = []string{m.label}
		}
		ch <- prometheus.MustNewConstMetric(m.desc, m.typ, m.value(&s), labels...)
	}
}
