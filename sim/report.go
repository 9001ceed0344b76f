package sim

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"strings"
	"text/tabwriter"
	"time"
)

// Report is the outcome of a run. It holds no wall-clock time, and every
// list is in a fixed order, so the same scenario and seed give the same
// report byte for byte.
type Report struct {
	Seed           uint64   `json:"seed"`
	Duration       string   `json:"duration"`
	Nodes          int      `json:"nodes"`
	InitialTunnels int      `json:"initial_tunnels"`
	Steps          int      `json:"steps"`
	Settings       Settings `json:"settings"`

	Totals      Totals            `json:"totals"`
	Balance     Balance           `json:"balance"`
	Events      []EventReport     `json:"events"`
	Traffic     Traffic           `json:"traffic"`
	Unknown     *UnknownReport    `json:"unknown,omitempty"`
	Replication ReplicationReport `json:"replication"`
	// Health is what the director's health checks did (scenarios with
	// node-dies events).
	Health   *HealthReport `json:"health,omitempty"`
	Refusals []Refusal     `json:"refusals,omitempty"`
	Compare  *Comparison   `json:"compare,omitempty"`
	Series   Series        `json:"series"`
}

// Settings echoes the parameters that shape the numbers.
type Settings struct {
	CommitEvery string  `json:"commit_every"`
	Reestablish string  `json:"reestablish"`
	Epsilon     float64 `json:"epsilon"`
	Choices     int     `json:"choices"`
	// ConnectionEntries: the modelled IPVS keeps connection entries (no
	// one-packet scheduling).
	ConnectionEntries bool    `json:"connection_entries"`
	LinkLatency       string  `json:"link_latency"`
	LinkLoss          float64 `json:"link_loss"`
	Retransmit        string  `json:"retransmit"`
	FullCheckEvery    string  `json:"full_check_every"`
	SampleEvery       string  `json:"sample_every"`
}

// Totals counts the workload as the directors saw it.
type Totals struct {
	Arrivals   int `json:"arrivals"`
	Departures int `json:"departures"`
	// Refused tunnels could not be placed (every node full or down).
	Refused int `json:"refused"`
	Commits int `json:"commits"`
	// UnattributedMoves are tunnels moved outside any timed event; the
	// scheduler never moves a tunnel when another comes or goes, so
	// anything but zero is a bug.
	UnattributedMoves int `json:"unattributed_moves"`
	FinalTunnels      int `json:"final_tunnels"`
	Live              int `json:"live"`
}

// Balance is the spread of tunnels over active nodes, sampled over time:
// the most loaded node against the mean, and the coefficient of variation.
// A node's load is its tunnels divided by its weight, so a farm balanced
// as its weights ask scores 1 and 0.
type Balance struct {
	MaxOverMean Stat `json:"max_over_mean"`
	CV          Stat `json:"cv"`
	n           int
	sumMM       float64
	sumCV       float64
}

// Stat summarises a sampled quantity.
type Stat struct {
	Mean  float64 `json:"mean"`
	Max   float64 `json:"max"`
	Final float64 `json:"final"`
}

func (b *Balance) add(counts []float64) {
	mm, cv, ok := spread(counts)
	if !ok {
		return
	}
	b.n++
	b.sumMM += mm
	b.sumCV += cv
	b.MaxOverMean.Max = max(b.MaxOverMean.Max, mm)
	b.CV.Max = max(b.CV.Max, cv)
	b.MaxOverMean.Final, b.CV.Final = mm, cv
}

func (b *Balance) finish() {
	if b.n > 0 {
		b.MaxOverMean.Mean = b.sumMM / float64(b.n)
		b.CV.Mean = b.sumCV / float64(b.n)
	}
	for _, s := range []*Stat{&b.MaxOverMean, &b.CV} {
		s.Mean, s.Max, s.Final = round3(s.Mean), round3(s.Max), round3(s.Final)
	}
}

// spread returns max/mean and the coefficient of variation of loads.
func spread(loads []float64) (maxOverMean, cv float64, ok bool) {
	if len(loads) == 0 {
		return 0, 0, false
	}
	sum, top := 0.0, 0.0
	for _, c := range loads {
		sum += c
		top = max(top, c)
	}
	if sum == 0 {
		return 0, 0, false
	}
	mean := sum / float64(len(loads))
	var v float64
	for _, c := range loads {
		d := c - mean
		v += d * d
	}
	return top / mean, math.Sqrt(v/float64(len(loads))) / mean, true
}

// load is tunnels per unit of weight.
func load(count int, weight uint32) float64 {
	if weight == 0 {
		weight = 100
	}
	return float64(count) / float64(weight)
}

func round3(f float64) float64 { return math.Round(f*1000) / 1000 }

// EventReport is what one timed event did.
type EventReport struct {
	Index int    `json:"index"`
	At    string `json:"at"`
	Kind  string `json:"kind"`
	Node  string `json:"node,omitempty"`
	Mode  string `json:"mode,omitempty"`
	// Moves are tunnels whose owner changed; Ideal is the fewest any
	// scheduler could move (the failed node's tunnels; zero for an
	// addition, recovery, drain or failover), absent for a rebalance,
	// whose moves are asked for.
	Moves  int  `json:"moves"`
	Ideal  *int `json:"ideal,omitempty"`
	Excess *int `json:"excess,omitempty"`
	// Wanted is what a plan wanted to move before its budget; Unplaced
	// the tunnels no node could take.
	Wanted int `json:"wanted,omitempty"`
	// MovedFrom counts the moved tunnels by the node they left, so a
	// failure can be seen to move only the failed node's tunnels.
	MovedFrom []NodeCount `json:"moved_from,omitempty"`
	Budget    int         `json:"budget,omitempty"`
	Unplaced  int         `json:"unplaced,omitempty"`
	// Lost are tunnels the new master did not know, or knew elsewhere,
	// at a failover.
	Lost       int `json:"lost,omitempty"`
	Violations int `json:"violations"`
	// Converge is how long until every moved tunnel was back up and the
	// backup held the event's revision.
	Converge     string   `json:"converge"`
	ReplicatedMs *float64 `json:"replicated_ms,omitempty"`
	// DetectedMs is, for node-dies and node-revives, how long the health
	// checks took to take the node down or bring it up.
	DetectedMs *float64 `json:"detected_ms,omitempty"`
	// Dark is, for node-dies, how long the node's tunnels were dark.
	Dark  *DarkStats `json:"dark,omitempty"`
	Error string     `json:"error,omitempty"`

	start      time.Duration
	from       map[string]int
	settled    time.Duration
	replicated time.Duration
	rev        uint64
}

// NodeCount is a number of tunnels on one node.
type NodeCount struct {
	Node    string `json:"node"`
	Tunnels int    `json:"tunnels"`
}

// Traffic is the outcome of the traffic check.
type Traffic struct {
	Packets int `json:"packets"`
	Sweeps  int `json:"sweeps"`
	// Violations are packets the table sent to a node other than the one
	// holding the tunnel's SAs, or to none, while the tunnel was up.
	Violations int `json:"violations"`
	// PinWindow are the violations of peers not yet pinned whose bucket
	// changed; ConnEntry those of IKE packets that an IPVS connection
	// entry sent to a node the tunnel left.
	PinWindow int `json:"pin_window"`
	ConnEntry int `json:"connection_entry"`
	// Disruptions are tunnel moves: each breaks the tunnel until its
	// peer re-establishes on the new node.
	Disruptions int         `json:"disruptions"`
	Examples    []Violation `json:"examples,omitempty"`
}

// Violation is one misdirected packet.
type Violation struct {
	At      string `json:"at"`
	Tunnel  string `json:"tunnel"`
	Packet  string `json:"packet"`
	SAsOn   string `json:"sas_on"`
	Reached string `json:"reached"`
}

// ReplicationReport is how the backup director followed the master.
type ReplicationReport struct {
	Mode               string    `json:"mode"`
	Link               LinkStats `json:"link"`
	MeanLagMs          float64   `json:"mean_lag_ms"`
	MaxLagMs           float64   `json:"max_lag_ms"`
	MaxRevisionsBehind int       `json:"max_revisions_behind"`
	Failovers          int       `json:"failovers"`
	FinalMaster        uint64    `json:"final_master_revision"`
	FinalBackup        uint64    `json:"final_backup_revision"`
	// Equal says the two tables ended equal (nodes, owners, peers,
	// subnets and revision).
	Equal bool `json:"equal"`
}

// HealthReport counts the health checks' rounds and decisions.
type HealthReport struct {
	Settings string `json:"settings"`
	Rounds   uint64 `json:"rounds"`
	Downs    uint64 `json:"downs"`
	Ups      uint64 `json:"ups"`
	// Held are downs that started a hold (a flapping node); Panics the
	// times too many nodes failed at once and nothing was moved.
	Held   uint64 `json:"held"`
	Panics uint64 `json:"panics"`
}

// UnknownReport is the unknown-peer side of a run.
type UnknownReport struct {
	// Dataplane is how the modelled kernel steers unknown peers.
	Dataplane string `json:"dataplane"`
	Buckets   int    `json:"buckets,omitempty"`
	// Learned are the peers pinned from their first packet; Share their
	// part of the tunnels that came up after the start.
	Learned int     `json:"learned"`
	Share   float64 `json:"share"`
	// Changes are the buckets (or, before buckets, node maps) that
	// changed, in Steps steps.
	Changes int `json:"bucket_changes"`
	Steps   int `json:"steps"`
}

// Refusal is a tunnel the director could not place.
type Refusal struct {
	At     string `json:"at"`
	Tunnel string `json:"tunnel"`
	Reason string `json:"reason"`
}

// Series is tunnels per node over time, for charts.
type Series struct {
	AtHours []float64    `json:"at_hours"`
	Nodes   []NodeSeries `json:"nodes"`
}

// NodeSeries is one node's tunnel count at each sample.
type NodeSeries struct {
	Node    string `json:"node"`
	Tunnels []int  `json:"tunnels"`
}

func newReport(s *Scenario, steps []Step) *Report {
	r := &Report{Seed: s.Seed, Steps: len(steps), Events: []EventReport{}}
	end := runEnd(steps, s.Duration)
	for _, st := range steps {
		if st.At != 0 {
			continue
		}
		switch st.Kind {
		case EvNodeAdd:
			r.Nodes++
		case StepTunnelUp:
			r.InitialTunnels++
		}
	}
	r.Duration = FormatDuration(end)
	r.Settings = Settings{
		CommitEvery: FormatDuration(s.CommitEvery), Reestablish: FormatDuration(s.Reestablish),
		Epsilon: s.Epsilon, Choices: s.Choices, ConnectionEntries: s.Dataplane.ConnectionEntries,
		LinkLatency: FormatDuration(s.Replication.Latency), LinkLoss: s.Replication.Loss,
		Retransmit: FormatDuration(s.Replication.Retransmit), FullCheckEvery: FormatDuration(s.FullCheckEvery),
		SampleEvery: FormatDuration(s.SampleEvery),
	}
	return r
}

func (r *Report) addRefusal(at time.Duration, id, reason string) {
	if len(r.Refusals) < maxExamples {
		r.Refusals = append(r.Refusals, Refusal{At: FormatDuration(at), Tunnel: id, Reason: reason})
	}
}

// WriteJSON writes the report as indented JSON.
func (r *Report) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	if err := enc.Encode(r); err != nil {
		return fmt.Errorf("write report: %w", err)
	}
	return nil
}

// WriteText writes the summary tables for a terminal.
func (r *Report) WriteText(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	p := func(format string, args ...any) { fmt.Fprintf(tw, format, args...) }
	p("simulated %s: %d nodes, %d tunnels at start, seed %d (%d steps)\n", r.Duration, r.Nodes, r.InitialTunnels, r.Seed, r.Steps)
	p("tunnels: %d arrived, %d departed, %d refused, %d live at the end (table holds %d), %d commits\n",
		r.Totals.Arrivals, r.Totals.Departures, r.Totals.Refused, r.Totals.Live, r.Totals.FinalTunnels, r.Totals.Commits)
	p("balance of tunnels per weight over active nodes (sampled every %s):\tmean\tmax\tfinal\n", r.Settings.SampleEvery)
	p("  max/mean\t%.3f\t%.3f\t%.3f\n", r.Balance.MaxOverMean.Mean, r.Balance.MaxOverMean.Max, r.Balance.MaxOverMean.Final)
	p("  coefficient of variation\t%.3f\t%.3f\t%.3f\n", r.Balance.CV.Mean, r.Balance.CV.Max, r.Balance.CV.Final)
	tw.Flush()

	fmt.Fprintln(w)
	p("EVENT\tAT\tKIND\tNODE\tMOVES\tIDEAL\tEXCESS\tVIOLATIONS\tCONVERGE\tNOTE\n")
	for _, e := range r.Events {
		ideal, excess := "-", "-"
		if e.Ideal != nil {
			ideal, excess = fmt.Sprint(*e.Ideal), fmt.Sprint(*e.Excess)
		}
		var note []string
		if e.Mode != "" {
			note = append(note, e.Mode)
		}
		if e.Budget > 0 {
			note = append(note, fmt.Sprintf("budget %d, wanted %d", e.Budget, e.Wanted))
		}
		if e.Unplaced > 0 {
			note = append(note, fmt.Sprintf("%d unplaced", e.Unplaced))
		}
		if e.Lost > 0 {
			note = append(note, fmt.Sprintf("%d lost by the backup", e.Lost))
		}
		if e.DetectedMs != nil {
			note = append(note, fmt.Sprintf("health took %s", FormatDuration(time.Duration(*e.DetectedMs*float64(time.Millisecond)))))
		} else if e.Kind == EvNodeDies || e.Kind == EvNodeRevives {
			note = append(note, "health decided nothing")
		}
		if d := e.Dark; d != nil && d.Tunnels > 0 {
			note = append(note, fmt.Sprintf("%d tunnels dark: mean %.1fs, max %.1fs (%.2f tunnel-hours)", d.Tunnels, d.MeanS, d.MaxS, d.TunnelHours))
		}
		if e.Error != "" {
			note = append(note, "error: "+e.Error)
		}
		node := e.Node
		if node == "" {
			node = "-"
		}
		p("%d\t%s\t%s\t%s\t%d\t%s\t%s\t%d\t%s\t%s\n", e.Index, e.At, e.Kind, node, e.Moves, ideal, excess, e.Violations, e.Converge, strings.Join(note, "; "))
	}
	tw.Flush()

	fmt.Fprintln(w)
	t := r.Traffic
	p("traffic check: %d packets in %d full sweeps and after every step; %d violation(s) (%d in a pin window, %d by an IPVS connection entry); %d disruption(s) (moved tunnels re-establishing for %s)\n",
		t.Packets, t.Sweeps, t.Violations, t.PinWindow, t.ConnEntry, t.Disruptions, r.Settings.Reestablish)
	if u := r.Unknown; u != nil {
		p("unknown peers: %d learned from their first packet (%.1f%% of the tunnels that came up after the start); kernel: %s; %d bucket change(s) in %d step(s)\n",
			u.Learned, 100*u.Share, u.Dataplane, u.Changes, u.Steps)
	}
	for _, v := range t.Examples {
		p("  violation at %s: tunnel %s: %s reached %s, SAs on %s\n", v.At, v.Tunnel, v.Packet, v.Reached, v.SAsOn)
	}
	if r.Totals.UnattributedMoves > 0 {
		p("  %d tunnel(s) moved outside any event\n", r.Totals.UnattributedMoves)
	}
	rp := r.Replication
	p("replication: %s\n", rp.Mode)
	p("  lag mean %.3f ms, max %.3f ms, at most %d revision(s) behind; %d message(s), %d lost, %d snapshot(s), %d apply error(s); %d failover(s); tables equal at the end: %v (revisions %d/%d)\n",
		rp.MeanLagMs, rp.MaxLagMs, rp.MaxRevisionsBehind, rp.Link.Messages, rp.Link.Lost, rp.Link.Snapshots, rp.Link.ApplyErrors, rp.Failovers, rp.Equal, rp.FinalMaster, rp.FinalBackup)
	if rp.Link.BackupState != "" {
		p("  backup's replication state at the end: %s\n", rp.Link.BackupState)
	}
	if h := r.Health; h != nil {
		p("health checks (%s): %d rounds, %d nodes taken down, %d brought up, %d held (flapping), %d panic(s) (too many nodes failing at once: nothing moved)\n",
			h.Settings, h.Rounds, h.Downs, h.Ups, h.Held, h.Panics)
	}
	for _, f := range r.Refusals {
		p("  refused at %s: %s: %s\n", f.At, f.Tunnel, f.Reason)
	}
	tw.Flush()
	if r.Compare != nil {
		fmt.Fprintln(w)
		r.Compare.writeText(tw)
		tw.Flush()
	}
	return nil
}
