package sim

import (
	"cmp"
	"errors"
	"fmt"
	"maps"
	"math"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/director/health"
)

// unjoinErr lists the errors of an errors.Join.
func unjoinErr(err error) []error {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		return j.Unwrap()
	}
	return []error{err}
}

// Scenario is everything a run needs besides its workload: the farm, the
// tunnel population and churn, the director's and the sync link's
// parameters, and the timed events. sim/README.md documents every key of
// the YAML form and its default.
type Scenario struct {
	Seed     uint64        `json:"seed"`
	Duration time.Duration `json:"duration"`

	Nodes   []NodeSpec  `json:"nodes"`
	Tunnels TunnelsSpec `json:"tunnels"`
	Churn   ChurnSpec   `json:"churn"`

	// CommitEvery groups learned and departed tunnels into one store
	// transaction per interval, as a director's group commit does.
	CommitEvery time.Duration `json:"commit_every"`
	// Reestablish is how long a moved tunnel takes to come back on its
	// new node (IKE's dead-peer detection plus a new handshake).
	Reestablish time.Duration `json:"reestablish"`
	Epsilon     float64       `json:"epsilon"`
	// Choices is the scheduler's d: a placement weighs the peer's d best
	// rendezvous candidates by load (0: every active node, the default;
	// 1: the scheduler before choices).
	Choices int `json:"choices"`

	// Unknown is the share of arriving peers the NMS never announced and
	// how the kernel steers them until the director pins them.
	Unknown UnknownSpec `json:"unknown"`
	// Dataplane is what the model of the kernel keeps between packets.
	Dataplane DataplaneSpec `json:"dataplane"`

	Replication ReplicationSpec `json:"replication"`
	// Health is the director's health checks, which take a node that
	// dies (node-dies) down by themselves.
	Health HealthSpec `json:"health"`

	// FullCheckEvery is the interval of full traffic sweeps over every
	// live tunnel; tunnels touched by a step are checked after that step.
	FullCheckEvery time.Duration `json:"full_check_every"`
	// SampleEvery is the interval of the tunnels-per-node samples.
	SampleEvery time.Duration `json:"sample_every"`

	Events []Event `json:"events"`
}

// NodeSpec is one terminator node of the initial farm.
type NodeSpec struct {
	Name     string `json:"name"`
	Weight   uint32 `json:"weight"`
	Capacity int    `json:"capacity"`
}

// TunnelsSpec is the tunnel population.
type TunnelsSpec struct {
	// Count is the number of tunnels up at the start; arrivals keep the
	// population near it.
	Count       int     `json:"count"`
	PinnedShare float64 `json:"pinned_share"`
	MaxSubnets  int     `json:"max_subnets"`
	IPv6Share   float64 `json:"ipv6_share"`
}

// ChurnSpec is the arrival and departure process.
type ChurnSpec struct {
	// Lifetime is "exponential", "lognormal" or "none" (no churn).
	Lifetime string        `json:"lifetime"`
	Mean     time.Duration `json:"mean"`   // exponential
	Median   time.Duration `json:"median"` // lognormal
	Sigma    float64       `json:"sigma"`  // lognormal
	// ArrivalsPerHour is the Poisson arrival rate; 0 keeps the population
	// steady (count / mean lifetime).
	ArrivalsPerHour float64 `json:"arrivals_per_hour"`
}

// UnknownSpec is the unknown-peer side of a run: peers that reach a VIP
// before the table holds them. The kernel hashes such a peer into a bucket
// whose node gets its first packet (its SAs are made there), and the
// director's learner pins the peer on that node LearnDelay later.
type UnknownSpec struct {
	// Share is the share of arriving tunnels whose peer is unknown.
	Share float64 `json:"share"`
	// Buckets is the number of hash buckets; 0 models the dataplane
	// before buckets: the hash over the active nodes, one per node.
	Buckets int `json:"buckets"`
	// Interval, MaxChanges, Quiet and Horizon are affinity.BucketOptions.
	Interval   time.Duration `json:"interval"`
	MaxChanges int           `json:"max_changes"`
	Quiet      time.Duration `json:"quiet"`
	Horizon    float64       `json:"horizon"`
	// LearnDelay is the time from a peer's first packet to its pin in
	// the table (the learner's event, commit and kernel update).
	LearnDelay time.Duration `json:"learn_delay"`
}

func (u UnknownSpec) bucketOptions() affinity.BucketOptions {
	return affinity.BucketOptions{Count: u.Buckets, Interval: u.Interval, MaxChanges: u.MaxChanges, Quiet: u.Quiet, Horizon: u.Horizon}
}

// DataplaneSpec is the state the modelled kernel keeps between packets.
type DataplaneSpec struct {
	// ConnectionEntries models IPVS UDP services without one-packet
	// scheduling (the dataplane before issue 9): a peer's first IKE packet
	// creates a connection entry that every retransmit refreshes, so its
	// IKE keeps reaching the node of that entry after the peer moves.
	// False models one-packet scheduling (and route-only mode): IKE
	// follows the peer's mark like ESP.
	ConnectionEntries bool `json:"connection_entries"`
}

// ReplicationSpec is the sync link between the two directors.
type ReplicationSpec struct {
	// Impl is ReplDirector (the project's director/replication) or
	// ReplJournal (the simulator's own journal link).
	Impl           string        `json:"impl"`
	Latency        time.Duration `json:"latency"`
	Loss           float64       `json:"loss"`
	Retransmit     time.Duration `json:"retransmit"`
	JournalChanges int           `json:"journal_changes"`
}

// HealthSpec is the health checks' settings the simulator varies; the
// others are the director's defaults (health.DefaultConfig).
type HealthSpec struct {
	Interval        time.Duration `json:"interval"`
	Timeout         time.Duration `json:"timeout"`
	Rise            int           `json:"rise"`
	Fall            int           `json:"fall"`
	MaxDownFraction float64       `json:"max_down_fraction"`
}

// Config is the health checks' configuration of the scenario.
func (h HealthSpec) Config() health.Config {
	c := health.DefaultConfig()
	c.Interval, c.Timeout, c.Rise, c.Fall, c.MaxDownFraction = h.Interval, h.Timeout, h.Rise, h.Fall, h.MaxDownFraction
	return c
}

func defaultHealth() HealthSpec {
	c := health.DefaultConfig()
	return HealthSpec{Interval: c.Interval, Timeout: c.Timeout, Rise: c.Rise, Fall: c.Fall, MaxDownFraction: c.MaxDownFraction}
}

// Event kinds.
const (
	EvNodeDown   = "node-down"   // failure: its tunnels move at once
	EvNodeUp     = "node-up"     // recovery, or end of a drain
	EvNodeDrain  = "node-drain"  // no new tunnels; rebalance empties it
	EvNodeAdd    = "node-add"    // a new node joins
	EvNodeRemove = "node-remove" // evacuate and delete
	EvRebalance  = "rebalance"   // move at most Budget tunnels
	EvFailover   = "failover"    // the backup director takes over
	EvLinkLoss   = "link-loss"   // set the sync link's loss rate
	// EvNodeDies: the node's IKE daemon dies; nobody tells the director,
	// whose health checks take the node down after interval x fall.
	EvNodeDies = "node-dies"
	// EvNodeRevives: a node that died answers again; the health checks
	// bring it up after rise rounds (nothing moves back).
	EvNodeRevives = "node-revives"
)

var eventKinds = []string{EvNodeDown, EvNodeUp, EvNodeDrain, EvNodeAdd, EvNodeRemove, EvRebalance, EvFailover, EvLinkLoss, EvNodeDies, EvNodeRevives}

// Failover modes.
const (
	// Switchover is a planned takeover: the backup catches up first.
	Switchover = "switchover"
	// Crash is the master dying: what the backup lacks is lost.
	Crash = "crash"
)

// Event is one timed event of a scenario.
type Event struct {
	At       time.Duration `json:"at"`
	Kind     string        `json:"kind"`
	Node     string        `json:"node,omitempty"`
	Weight   uint32        `json:"weight,omitempty"`
	Capacity int           `json:"capacity,omitempty"`
	Budget   int           `json:"budget,omitempty"`
	Mode     string        `json:"mode,omitempty"`
	Loss     float64       `json:"loss,omitempty"`
}

// DefaultScenario is the standard scenario: a farm of 8 nodes and 10,000
// tunnels for 30 days with a failure, a recovery, an addition, a
// rebalance and a director failover.
func DefaultScenario() *Scenario {
	s := &Scenario{
		Seed:     1,
		Duration: 30 * 24 * time.Hour,
		Tunnels:  TunnelsSpec{Count: 10000, PinnedShare: 0.2, MaxSubnets: 4, IPv6Share: 0.1},
		Churn: ChurnSpec{Lifetime: "lognormal", Median: 3 * 24 * time.Hour, Sigma: 1.5,
			Mean: 5 * 24 * time.Hour},
		CommitEvery: 5 * time.Minute,
		Reestablish: 30 * time.Second,
		Epsilon:     affinity.DefaultEpsilon,
		Choices:     affinity.DefaultChoices,
		Unknown: UnknownSpec{Buckets: affinity.DefaultBuckets, Interval: affinity.DefaultBucketInterval,
			MaxChanges: affinity.DefaultBuckets / 16, Quiet: affinity.DefaultBucketQuiet,
			Horizon: affinity.DefaultBucketHorizon, LearnDelay: time.Second},
		Replication: ReplicationSpec{Impl: ReplDirector, Latency: 2 * time.Millisecond, Loss: 0.01,
			Retransmit: 200 * time.Millisecond, JournalChanges: 500_000},
		Health:         defaultHealth(),
		FullCheckEvery: 6 * time.Hour,
		SampleEvery:    time.Hour,
	}
	s.Nodes = GenNodes(8, affinity.DefaultWeight, 0)
	s.Events = StandardEvents(s.Duration, s.Nodes)
	return s
}

// GenNodes names n nodes vpn-01.. with the same weight and capacity.
func GenNodes(n int, weight uint32, capacity int) []NodeSpec {
	out := make([]NodeSpec, n)
	for i := range out {
		out[i] = NodeSpec{Name: fmt.Sprintf("vpn-%02d", i+1), Weight: weight, Capacity: capacity}
	}
	return out
}

// StandardEvents is the farm life of the standard scenario, spread over
// the duration: the third node fails, a node is added, the failed node
// comes back, a rebalance fills the new node, and the directors fail over.
func StandardEvents(d time.Duration, nodes []NodeSpec) []Event {
	at := func(f float64) time.Duration { return time.Duration(float64(d) * f).Truncate(time.Minute) }
	victim := nodes[min(2, len(nodes)-1)].Name
	return []Event{
		{At: at(0.25), Kind: EvNodeDown, Node: victim},
		{At: at(0.40), Kind: EvNodeAdd, Node: fmt.Sprintf("vpn-%02d", len(nodes)+1)},
		{At: at(0.50), Kind: EvNodeUp, Node: victim},
		{At: at(0.60), Kind: EvRebalance, Budget: 500},
		{At: at(0.75), Kind: EvFailover, Mode: Switchover},
	}
}

// ParseDuration parses a Go duration with two more units, d (24h) and w
// (7d): "30d", "1d12h", "90m", "2w".
func ParseDuration(s string) (time.Duration, error) {
	in := strings.TrimSpace(s)
	if in == "" {
		return 0, errors.New("empty duration")
	}
	var total time.Duration
	rest := in
	for rest != "" {
		i := 0
		for i < len(rest) && (rest[i] >= '0' && rest[i] <= '9' || rest[i] == '.') {
			i++
		}
		j := i
		for j < len(rest) && (rest[j] < '0' || rest[j] > '9') && rest[j] != '.' {
			j++
		}
		if i == 0 || j == i {
			return 0, fmt.Errorf("%q: not a duration (want e.g. 30d, 1d12h, 90m, 2s)", s)
		}
		num, unit := rest[:i], rest[i:j]
		rest = rest[j:]
		var d time.Duration
		switch unit {
		case "w", "d":
			f, err := strconv.ParseFloat(num, 64)
			if err != nil {
				return 0, fmt.Errorf("%q: not a duration", s)
			}
			day := 24 * time.Hour
			if unit == "w" {
				day *= 7
			}
			d = time.Duration(f * float64(day))
		default:
			var err error
			d, err = time.ParseDuration(num + unit)
			if err != nil {
				return 0, fmt.Errorf("%q: not a duration (want e.g. 30d, 1d12h, 90m, 2s)", s)
			}
		}
		total += d
	}
	return total, nil
}

// FormatDuration writes d in the units ParseDuration reads, days first.
func FormatDuration(d time.Duration) string {
	if d == 0 {
		return "0s"
	}
	var b strings.Builder
	if d < 0 {
		b.WriteByte('-')
		d = -d
	}
	if days := d / (24 * time.Hour); days > 0 {
		fmt.Fprintf(&b, "%dd", days)
		d -= days * 24 * time.Hour
		if d == 0 {
			return b.String()
		}
	}
	b.WriteString(d.String())
	return b.String()
}

// ScenarioError lists every problem of a scenario file, each naming the
// file, the key path and the problem.
type ScenarioError struct {
	File     string
	Problems []string
}

func (e *ScenarioError) Error() string {
	if len(e.Problems) == 1 {
		return e.File + ": " + e.Problems[0]
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%s: %d problems", e.File, len(e.Problems))
	for _, p := range e.Problems {
		b.WriteString("\n  " + e.File + ": " + p)
	}
	return b.String()
}

// LoadScenario reads a YAML (or JSON, which is YAML) scenario file.
func LoadScenario(path string) (*Scenario, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read scenario: %w", err)
	}
	return ParseScenario(path, b)
}

// ParseScenario parses a scenario over the defaults of DefaultScenario.
// Keys not given keep their defaults; "events" given replaces the
// standard events. Unknown keys are errors; every problem is reported.
func ParseScenario(name string, b []byte) (*Scenario, error) {
	s := DefaultScenario()
	var doc yaml.Node
	if err := yaml.Unmarshal(b, &doc); err != nil {
		return nil, &ScenarioError{File: name, Problems: []string{err.Error()}}
	}
	p := &parser{}
	if len(doc.Content) > 0 {
		p.scenario(doc.Content[0], s)
	}
	p.validate(s)
	if len(p.problems) > 0 {
		return nil, &ScenarioError{File: name, Problems: p.problems}
	}
	return s, nil
}

type parser struct{ problems []string }

func (p *parser) errf(path string, n *yaml.Node, format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	if n != nil && n.Line > 0 {
		p.problems = append(p.problems, fmt.Sprintf("%s: %s (line %d)", path, msg, n.Line))
		return
	}
	p.problems = append(p.problems, fmt.Sprintf("%s: %s", path, msg))
}

// fields walks a mapping, calling the handler of each known key and
// reporting unknown keys, duplicates and non-mappings.
func (p *parser) fields(path string, n *yaml.Node, h map[string]func(string, *yaml.Node)) {
	if n.Kind != yaml.MappingNode {
		p.errf(path, n, "want a mapping")
		return
	}
	seen := map[string]bool{}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		kp := k.Value
		if path != "" {
			kp = path + "." + k.Value
		}
		if seen[k.Value] {
			p.errf(kp, k, "duplicate key")
			continue
		}
		seen[k.Value] = true
		fn, ok := h[k.Value]
		if !ok {
			known := make([]string, 0, len(h))
			for name := range h {
				known = append(known, name)
			}
			slices.Sort(known)
			p.errf(kp, k, "unknown key (known: %s)", strings.Join(known, ", "))
			continue
		}
		fn(kp, v)
	}
}

func (p *parser) scalar(path string, n *yaml.Node) (string, bool) {
	if n.Kind != yaml.ScalarNode {
		p.errf(path, n, "want a single value")
		return "", false
	}
	return n.Value, true
}

// section returns the handler of a key whose value is a mapping of the
// keys h knows.
func (p *parser) section(h map[string]func(string, *yaml.Node)) func(string, *yaml.Node) {
	return func(path string, n *yaml.Node) { p.fields(path, n, h) }
}

// scalarOf returns the handler of a single-value key: parse turns the
// value into *dst, and its error is the problem reported at the key.
func scalarOf[T any](p *parser, dst *T, parse func(string) (T, error)) func(string, *yaml.Node) {
	return func(path string, n *yaml.Node) {
		if v, ok := p.scalar(path, n); ok {
			x, err := parse(v)
			if err != nil {
				p.errf(path, n, "%v", err)
				return
			}
			*dst = x
		}
	}
}

func (p *parser) dur(dst *time.Duration) func(string, *yaml.Node) {
	return scalarOf(p, dst, ParseDuration)
}

func (p *parser) float(dst *float64) func(string, *yaml.Node) {
	return scalarOf(p, dst, func(v string) (float64, error) {
		f, err := strconv.ParseFloat(v, 64)
		if err != nil || math.IsNaN(f) || math.IsInf(f, 0) {
			return 0, fmt.Errorf("%q: not a number", v)
		}
		return f, nil
	})
}

func (p *parser) integer(dst *int) func(string, *yaml.Node) {
	return scalarOf(p, dst, func(v string) (int, error) {
		i, err := strconv.Atoi(strings.ReplaceAll(v, "_", ""))
		if err != nil {
			return 0, fmt.Errorf("%q: not an integer", v)
		}
		return i, nil
	})
}

func (p *parser) uint64(dst *uint64) func(string, *yaml.Node) {
	return scalarOf(p, dst, func(v string) (uint64, error) {
		i, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("%q: not a non-negative integer", v)
		}
		return i, nil
	})
}

func (p *parser) weight(dst *uint32) func(string, *yaml.Node) {
	return func(path string, n *yaml.Node) {
		var i int
		p.integer(&i)(path, n)
		if i < 0 || i > 10000 {
			p.errf(path, n, "weight %d out of range 1..10000", i)
			return
		}
		*dst = uint32(i)
	}
}

func (p *parser) boolean(dst *bool) func(string, *yaml.Node) {
	return scalarOf(p, dst, func(v string) (bool, error) {
		b, err := strconv.ParseBool(v)
		if err != nil {
			return false, fmt.Errorf("%q: want true or false", v)
		}
		return b, nil
	})
}

func (p *parser) str(dst *string) func(string, *yaml.Node) {
	return scalarOf(p, dst, func(v string) (string, error) { return v, nil })
}

func (p *parser) scenario(n *yaml.Node, s *Scenario) {
	var nodeCount, weight, capacity = -1, -1, -1
	var countGiven bool
	p.fields("", n, map[string]func(string, *yaml.Node){
		"seed":     p.uint64(&s.Seed),
		"duration": p.dur(&s.Duration),
		"nodes": func(path string, n *yaml.Node) {
			var list []NodeSpec
			p.fields(path, n, map[string]func(string, *yaml.Node){
				"count": func(path string, n *yaml.Node) {
					countGiven = true
					p.integer(&nodeCount)(path, n)
				},
				"weight":   p.integer(&weight),
				"capacity": p.integer(&capacity),
				"list": func(path string, n *yaml.Node) {
					if n.Kind != yaml.SequenceNode {
						p.errf(path, n, "want a list")
						return
					}
					for i, c := range n.Content {
						ns := NodeSpec{Weight: affinity.DefaultWeight}
						ip := fmt.Sprintf("%s[%d]", path, i)
						p.fields(ip, c, map[string]func(string, *yaml.Node){
							"name":     p.str(&ns.Name),
							"weight":   p.weight(&ns.Weight),
							"capacity": p.integer(&ns.Capacity),
						})
						if err := affinity.ValidateID("node name", ns.Name); err != nil {
							p.errf(ip+".name", c, "%v", err)
						}
						list = append(list, ns)
					}
					if list == nil {
						list = []NodeSpec{}
					}
				},
			})
			switch {
			case list != nil && countGiven:
				p.errf(path, n, "give count or list, not both")
			case list != nil:
				s.Nodes = list
			default:
				if !countGiven {
					nodeCount = len(s.Nodes)
				}
				w, c := affinity.DefaultWeight, 0
				if weight >= 0 {
					w = weight
				}
				if capacity >= 0 {
					c = capacity
				}
				if w < 1 || w > 10000 {
					p.errf(path+".weight", n, "weight %d out of range 1..10000", w)
					w = affinity.DefaultWeight
				}
				if nodeCount < 1 || nodeCount > 1000 {
					p.errf(path+".count", n, "%d nodes: want 1..1000", nodeCount)
					nodeCount = 1
				}
				s.Nodes = GenNodes(nodeCount, uint32(w), c)
			}
			for i, ns := range s.Nodes {
				if ns.Capacity < 0 {
					p.errf(fmt.Sprintf("%s[%d].capacity", path, i), n, "capacity %d is negative", ns.Capacity)
				}
			}
		},
		"tunnels": p.section(map[string]func(string, *yaml.Node){
			"count":        p.integer(&s.Tunnels.Count),
			"pinned_share": p.float(&s.Tunnels.PinnedShare),
			"max_subnets":  p.integer(&s.Tunnels.MaxSubnets),
			"ipv6_share":   p.float(&s.Tunnels.IPv6Share),
		}),
		"churn": p.section(map[string]func(string, *yaml.Node){
			"lifetime":          p.str(&s.Churn.Lifetime),
			"mean":              p.dur(&s.Churn.Mean),
			"median":            p.dur(&s.Churn.Median),
			"sigma":             p.float(&s.Churn.Sigma),
			"arrivals_per_hour": p.float(&s.Churn.ArrivalsPerHour),
		}),
		"director": p.section(map[string]func(string, *yaml.Node){
			"commit_every": p.dur(&s.CommitEvery),
			"reestablish":  p.dur(&s.Reestablish),
			"epsilon":      p.float(&s.Epsilon),
			"choices":      p.integer(&s.Choices),
		}),
		"unknown": p.section(map[string]func(string, *yaml.Node){
			"share":       p.float(&s.Unknown.Share),
			"buckets":     p.integer(&s.Unknown.Buckets),
			"interval":    p.dur(&s.Unknown.Interval),
			"max_changes": p.integer(&s.Unknown.MaxChanges),
			"quiet":       p.dur(&s.Unknown.Quiet),
			"horizon":     p.float(&s.Unknown.Horizon),
			"learn_delay": p.dur(&s.Unknown.LearnDelay),
		}),
		"dataplane": p.section(map[string]func(string, *yaml.Node){
			"connection_entries": p.boolean(&s.Dataplane.ConnectionEntries),
		}),
		"replication": p.section(map[string]func(string, *yaml.Node){
			"impl":            p.str(&s.Replication.Impl),
			"latency":         p.dur(&s.Replication.Latency),
			"loss":            p.float(&s.Replication.Loss),
			"retransmit":      p.dur(&s.Replication.Retransmit),
			"journal_changes": p.integer(&s.Replication.JournalChanges),
		}),
		"health": p.section(map[string]func(string, *yaml.Node){
			"interval":          p.dur(&s.Health.Interval),
			"timeout":           p.dur(&s.Health.Timeout),
			"rise":              p.integer(&s.Health.Rise),
			"fall":              p.integer(&s.Health.Fall),
			"max_down_fraction": p.float(&s.Health.MaxDownFraction),
		}),
		"check": p.section(map[string]func(string, *yaml.Node){
			"full_every":   p.dur(&s.FullCheckEvery),
			"sample_every": p.dur(&s.SampleEvery),
		}),
		"events": func(path string, n *yaml.Node) {
			if n.Kind != yaml.SequenceNode {
				p.errf(path, n, "want a list")
				return
			}
			s.Events = []Event{}
			for i, c := range n.Content {
				var e Event
				ip := fmt.Sprintf("%s[%d]", path, i)
				p.fields(ip, c, map[string]func(string, *yaml.Node){
					"at":       p.dur(&e.At),
					"kind":     p.str(&e.Kind),
					"node":     p.str(&e.Node),
					"weight":   p.weight(&e.Weight),
					"capacity": p.integer(&e.Capacity),
					"budget":   p.integer(&e.Budget),
					"mode":     p.str(&e.Mode),
					"loss":     p.float(&e.Loss),
				})
				s.Events = append(s.Events, e)
			}
		},
	})
}

// validate checks the values, naming keys as the YAML form spells them.
func (p *parser) validate(s *Scenario) {
	for _, prob := range s.Problems() {
		p.problems = append(p.problems, prob)
	}
}

// Validate reports every problem of a scenario built in code or from
// flags, as one error.
func (s *Scenario) Validate() error {
	if probs := s.Problems(); len(probs) > 0 {
		return &ScenarioError{File: "scenario", Problems: probs}
	}
	return nil
}

// Problems lists what is wrong with the scenario's values, each prefixed
// with its key path.
func (s *Scenario) Problems() []string {
	var out []string
	bad := func(path, format string, args ...any) {
		out = append(out, path+": "+fmt.Sprintf(format, args...))
	}
	if s.Duration <= 0 {
		bad("duration", "%s: must be positive", FormatDuration(s.Duration))
	}
	if len(s.Nodes) == 0 {
		bad("nodes", "no nodes")
	}
	names := map[string]bool{}
	for i, n := range s.Nodes {
		if names[n.Name] {
			bad(fmt.Sprintf("nodes.list[%d].name", i), "%q given twice", n.Name)
		}
		names[n.Name] = true
	}
	if s.Tunnels.Count < 0 || s.Tunnels.Count > 2_000_000 {
		bad("tunnels.count", "%d: want 0..2000000", s.Tunnels.Count)
	}
	share := func(path string, f float64) {
		if f < 0 || f > 1 {
			bad(path, "%g: want a share between 0 and 1", f)
		}
	}
	share("tunnels.pinned_share", s.Tunnels.PinnedShare)
	share("tunnels.ipv6_share", s.Tunnels.IPv6Share)
	share("replication.loss", s.Replication.Loss)
	if s.Tunnels.MaxSubnets < 1 || s.Tunnels.MaxSubnets > 64 {
		bad("tunnels.max_subnets", "%d: want 1..64", s.Tunnels.MaxSubnets)
	}
	switch s.Churn.Lifetime {
	case "none":
	case "exponential":
		if s.Churn.Mean <= 0 {
			bad("churn.mean", "must be positive for an exponential lifetime")
		}
	case "lognormal":
		if s.Churn.Median <= 0 {
			bad("churn.median", "must be positive for a lognormal lifetime")
		}
		if s.Churn.Sigma <= 0 || s.Churn.Sigma > 5 {
			bad("churn.sigma", "%g: want 0 < sigma <= 5", s.Churn.Sigma)
		}
	default:
		bad("churn.lifetime", "%q: want exponential, lognormal or none", s.Churn.Lifetime)
	}
	if s.Churn.ArrivalsPerHour < 0 {
		bad("churn.arrivals_per_hour", "%g is negative", s.Churn.ArrivalsPerHour)
	}
	positive := func(path string, d time.Duration) {
		if d <= 0 {
			bad(path, "%s: must be positive", FormatDuration(d))
		}
	}
	positive("director.commit_every", s.CommitEvery)
	positive("check.full_every", s.FullCheckEvery)
	positive("check.sample_every", s.SampleEvery)
	positive("replication.retransmit", s.Replication.Retransmit)
	if s.Reestablish < 0 {
		bad("director.reestablish", "negative")
	}
	if s.Replication.Latency < 0 {
		bad("replication.latency", "negative")
	}
	if s.Epsilon <= 0 || s.Epsilon > 10 {
		bad("director.epsilon", "%g: want 0 < epsilon <= 10", s.Epsilon)
	}
	optionProblems("director.", affinity.Options{Choices: s.Choices}.Validate(), bad)
	share("unknown.share", s.Unknown.Share)
	if s.Unknown.Buckets != 0 {
		// The scenario spells out every option: zero is no default here.
		o := s.Unknown.bucketOptions()
		if o.Interval <= 0 {
			bad("unknown.interval", "%s: must be positive", FormatDuration(o.Interval))
		}
		if o.MaxChanges <= 0 {
			bad("unknown.max_changes", "%d: want 1..%d", o.MaxChanges, o.Count)
		}
		if o.Quiet <= 0 {
			bad("unknown.quiet", "%s: must be positive", FormatDuration(o.Quiet))
		}
		if o.Horizon <= 0 {
			bad("unknown.horizon", "%g: want 0 < horizon <= 1", o.Horizon)
		}
		optionProblems("unknown.", o.Validate(), bad)
	}
	if s.Unknown.Buckets < 0 {
		bad("unknown.buckets", "%d: want 0 (the hash over the active nodes) or 1..%d", s.Unknown.Buckets, affinity.MaxBuckets)
	}
	if s.Unknown.LearnDelay < 0 || s.Unknown.LearnDelay > time.Hour {
		bad("unknown.learn_delay", "%s: want 0..1h", FormatDuration(s.Unknown.LearnDelay))
	}
	if s.Replication.Impl != ReplDirector && s.Replication.Impl != ReplJournal {
		bad("replication.impl", "%q: want director or journal", s.Replication.Impl)
	}
	if s.Replication.JournalChanges < 1 {
		bad("replication.journal_changes", "%d: want at least 1", s.Replication.JournalChanges)
	}
	hc := s.Health.Config()
	if err := hc.Validate("health"); err != nil {
		for _, e := range unjoinErr(err) {
			out = append(out, e.Error())
		}
	}
	for i, e := range s.Events {
		path := fmt.Sprintf("events[%d]", i)
		if e.At < 0 || e.At > s.Duration {
			bad(path+".at", "%s: outside the run (0..%s)", FormatDuration(e.At), FormatDuration(s.Duration))
		}
		if !slices.Contains(eventKinds, e.Kind) {
			bad(path+".kind", "%q: want one of %s", e.Kind, strings.Join(eventKinds, ", "))
			continue
		}
		switch e.Kind {
		case EvNodeDown, EvNodeUp, EvNodeDrain, EvNodeAdd, EvNodeRemove, EvNodeDies, EvNodeRevives:
			if e.Node == "" {
				bad(path+".node", "missing: %s needs a node", e.Kind)
			} else if err := affinity.ValidateID("node name", e.Node); err != nil {
				bad(path+".node", "%v", err)
			}
		case EvRebalance:
			if e.Budget < 1 {
				bad(path+".budget", "%d: a rebalance needs a move budget of at least 1", e.Budget)
			}
		case EvFailover:
			if e.Mode != "" && e.Mode != Switchover && e.Mode != Crash {
				bad(path+".mode", "%q: want switchover or crash", e.Mode)
			}
		case EvLinkLoss:
			if e.Loss < 0 || e.Loss > 1 {
				bad(path+".loss", "%g: want a share between 0 and 1", e.Loss)
			}
		}
		if e.Capacity < 0 {
			bad(path+".capacity", "%d is negative", e.Capacity)
		}
	}
	// Node events must name a node that exists by then, in time order.
	order := make([]int, len(s.Events))
	for i := range order {
		order[i] = i
	}
	slices.SortStableFunc(order, func(a, b int) int { return cmp.Compare(s.Events[a].At, s.Events[b].At) })
	exists := maps.Clone(names)
	for _, i := range order {
		e := s.Events[i]
		path := fmt.Sprintf("events[%d].node", i)
		switch e.Kind {
		case EvNodeAdd:
			if exists[e.Node] {
				bad(path, "%q already exists at %s", e.Node, FormatDuration(e.At))
			}
			exists[e.Node] = true
		case EvNodeDown, EvNodeUp, EvNodeDrain, EvNodeRemove, EvNodeDies, EvNodeRevives:
			if e.Node != "" && !exists[e.Node] {
				bad(path, "%q: no such node at %s", e.Node, FormatDuration(e.At))
			}
			if e.Kind == EvNodeRemove {
				delete(exists, e.Node)
			}
		}
	}
	return out
}

// optionProblems reports the OptionErrors of affinity's Validate under the
// scenario's key path.
func optionProblems(prefix string, err error, bad func(path, format string, args ...any)) {
	var oe affinity.OptionErrors
	if errors.As(err, &oe) {
		for _, e := range oe {
			bad(prefix+e.Key, "%s", e.Problem)
		}
	}
}

// ParseEvent parses the flag form of an event: "AT KIND [NODE|BUDGET|MODE|LOSS]",
// for example "10d node-down vpn-03", "20d rebalance 200", "25d failover crash".
func ParseEvent(s string) (Event, error) {
	f := strings.Fields(s)
	if len(f) < 2 || len(f) > 3 {
		return Event{}, fmt.Errorf("event %q: want AT KIND [ARG]", s)
	}
	at, err := ParseDuration(f[0])
	if err != nil {
		return Event{}, fmt.Errorf("event %q: at: %v", s, err)
	}
	e := Event{At: at, Kind: f[1]}
	arg := ""
	if len(f) == 3 {
		arg = f[2]
	}
	switch e.Kind {
	case EvRebalance:
		if e.Budget, err = strconv.Atoi(arg); err != nil {
			return Event{}, fmt.Errorf("event %q: budget %q: not an integer", s, arg)
		}
	case EvFailover:
		e.Mode = arg
	case EvLinkLoss:
		if e.Loss, err = strconv.ParseFloat(arg, 64); err != nil {
			return Event{}, fmt.Errorf("event %q: loss %q: not a number", s, arg)
		}
	default:
		e.Node = arg
	}
	return e, nil
}
