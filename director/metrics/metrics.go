// Package metrics is the director's Prometheus registry, its naming
// conventions and its HTTP endpoint (metrics.listen). Every part of the
// daemon that exports metrics (the table, the dataplane, the pair, and the
// health checks, agents and conntrack replication as they are wired in)
// makes its families through the constructors here, so they all follow
// one set of rules:
//
//   - A family is named tunneldirector_<subsystem>_<what>[_<unit>], with
//     the subsystem one of the Subsystem constants and the unit in base
//     units, plural (_seconds, _bytes); counters end in _total, gauges and
//     histograms never do (NewCounterVec, NewGaugeVec and NewHistogramVec
//     refuse names that break this, at start, by panicking: a misnamed
//     family is a programming error).
//   - Labels are few and bounded: node (a node's name), state, reason,
//     kind, map, mode, role, result, source. Never a tunnel id or an
//     address: a million tunnels would be a million series.
//   - State the daemon already keeps (the table, the replicator's
//     counters) is read at scrape time by a Collector, not copied into a
//     second set of counters; events only the metrics need (a move, a
//     refused import) are counted where they happen.
//
// The registry also holds the Go runtime and process collectors.
package metrics

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Namespace prefixes every family the director exports.
const Namespace = "tunneldirector"

// Subsystems: the second part of a family's name.
const (
	// Table: the affinity table (tunnels, nodes, revision, moves, imports).
	Table = "table"
	// Dataplane: what the kernel holds and what reconciling it costs.
	Dataplane = "dataplane"
	// Pair: replication between the two directors.
	Pair = "pair"
	// Health: the checks of the nodes (per-node state, probe latency).
	Health = "health"
	// Agent: the node agents' reports (reports, misplaced tunnels).
	Agent = "agent"
	// Conntrack: conntrack-state replication (entries cached, committed).
	Conntrack = "conntrack"
	// Etcd: the table shared by N active directors through etcd.
	Etcd = "etcd"
)

var subsystems = []string{Table, Dataplane, Pair, Health, Agent, Conntrack, Etcd}

// Path is where the endpoint serves the metrics.
const Path = "/metrics"

// NewRegistry returns a registry holding the Go runtime and process
// collectors; the daemon registers its own families into it.
func NewRegistry() *prometheus.Registry {
	r := prometheus.NewRegistry()
	r.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	return r
}

// Name returns the full name of a family after checking the conventions:
// a known subsystem, lower snake case, _total exactly for counters.
func Name(subsystem, name string, counter bool) string {
	if !slices.Contains(subsystems, subsystem) {
		panic(fmt.Sprintf("metrics: subsystem %q is not one of %s", subsystem, strings.Join(subsystems, ", ")))
	}
	for _, r := range name {
		if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '_') {
			panic(fmt.Sprintf("metrics: %q is not lower snake case", name))
		}
	}
	if strings.HasSuffix(name, "_total") != counter {
		if counter {
			panic(fmt.Sprintf("metrics: counter %q must end in _total", name))
		}
		panic(fmt.Sprintf("metrics: %q ends in _total but is not a counter", name))
	}
	return prometheus.BuildFQName(Namespace, subsystem, name)
}

// NewDesc describes a family a Collector builds at scrape time.
func NewDesc(subsystem, name, help string, counter bool, labels ...string) *prometheus.Desc {
	return prometheus.NewDesc(Name(subsystem, name, counter), help, labels, nil)
}

// Descs returns the constructors of a subsystem's gauge and counter
// descriptions, for a Collector that declares many.
func Descs(subsystem string) (gauge, counter func(name, help string, labels ...string) *prometheus.Desc) {
	gauge = func(name, help string, labels ...string) *prometheus.Desc {
		return NewDesc(subsystem, name, help, false, labels...)
	}
	counter = func(name, help string, labels ...string) *prometheus.Desc {
		return NewDesc(subsystem, name, help, true, labels...)
	}
	return gauge, counter
}

// NewCounterVec makes a counter family (name ends in _total).
func NewCounterVec(subsystem, name, help string, labels ...string) *prometheus.CounterVec {
	return prometheus.NewCounterVec(prometheus.CounterOpts{Name: Name(subsystem, name, true), Help: help}, labels)
}

// NewGaugeVec makes a gauge family.
func NewGaugeVec(subsystem, name, help string, labels ...string) *prometheus.GaugeVec {
	return prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: Name(subsystem, name, false), Help: help}, labels)
}

// NewHistogramVec makes a histogram family; its name ends in a unit
// (_seconds, _bytes).
func NewHistogramVec(subsystem, name, help string, buckets []float64, labels ...string) *prometheus.HistogramVec {
	if !strings.HasSuffix(name, "_seconds") && !strings.HasSuffix(name, "_bytes") {
		panic(fmt.Sprintf("metrics: histogram %q must end in its unit (_seconds, _bytes)", name))
	}
	return prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: Name(subsystem, name, false), Help: help, Buckets: buckets}, labels)
}

// DurationBuckets are the buckets of every _seconds histogram: 100 µs to
// about 100 s, factor 2.5 (a one-tunnel update takes tens of µs, a full
// sync of a million tunnels about 15 s, its read-back 36 s).
var DurationBuckets = prometheus.ExponentialBuckets(0.0001, 2.5, 16)

// ListenKey is the configuration key of the endpoint, named in its errors.
const ListenKey = "metrics.listen"

// Listen binds the metrics endpoint. An address that cannot be bound is
// an error naming the configuration key, so the daemon refuses to start
// rather than run unobserved.
func Listen(addr netip.AddrPort) (net.Listener, error) {
	ln, err := net.Listen("tcp", addr.String())
	if err != nil {
		return nil, fmt.Errorf("%s: cannot listen on %s: %w", ListenKey, addr, err)
	}
	return ln, nil
}

// Serve serves the registry on ln at Path until ctx ends.
func Serve(ctx context.Context, ln net.Listener, reg *prometheus.Registry) error {
	mux := http.NewServeMux()
	mux.Handle(Path, promhttp.HandlerFor(reg, promhttp.HandlerOpts{
		// A collector that fails leaves its families out and is
		// reported in the answer; the rest is still served.
		ErrorHandling:       promhttp.ContinueOnError,
		MaxRequestsInFlight: 4,
		Timeout:             30 * time.Second,
	}))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 2 * time.Minute}
	go func() {
		<-ctx.Done()
		shut, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		srv.Shutdown(shut)
	}()
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("%s: serve: %w", ListenKey, err)
	}
	return nil
}
