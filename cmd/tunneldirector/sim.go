package main

import (
	"bytes"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/director"
	"github.com/tunneldirector/tunneldirector/sim"
)

// newSimCmd runs the farm simulator on a scenario file, on flags for the
// common case, or on a replayed trace.
func newSimCmd(g *globals) *cobra.Command {
	var (
		scenario, svgDir, traceOut, replay string
		events                             []string
		compare, noBar                     bool
		nodes, tunnels, maxSubnets, weight int
		capacity                           int
		seed                               uint64
		duration, commitEvery, reest, repl string
		pinned, ipv6, loss                 float64
	)
	cmd := &cobra.Command{
		Use:   "sim",
		Short: "Simulate weeks of a farm's life through the real table, scheduler and store",
		Long: `Simulate a farm on a virtual clock: tunnels come and go, nodes fail, recover, drain
and join, rebalances run, the directors fail over. Every decision is made by the real
affinity table and committed to two real stores (master and backup). The report shows
the balance over time, tunnels moved per event against the ideal, affinity violations
(packets that would reach a node without the tunnel's SAs; expected: none), the
replication lag and the time each event took to converge.

Without --scenario the standard scenario runs: 8 nodes, 10,000 tunnels, 30 days, a
node failure, an addition, a recovery, a rebalance and a failover. Flags override the
scenario's values; --event replaces its events (repeat it):
  --event "10d node-down vpn-03" --event "12d node-up vpn-03" --event "20d rebalance 200"
  --event "25d failover crash" --event "24d link-loss 1"
The backup follows the master through director/replication over its in-memory
lossy network (--replication journal: the simulator's own journal link instead).
The same seed gives the same report, byte for byte. --trace-out writes the run's steps
as CSV; --replay runs such a file instead of generating steps (give the same scenario
and flags to get the same report).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			s := sim.DefaultScenario()
			if scenario != "" {
				var err error
				if s, err = sim.LoadScenario(scenario); err != nil {
					return &director.RequestError{Param: "--scenario", Msg: err.Error()}
				}
			}
			fl := cmd.Flags()
			var errs []string
			dur := func(name, v string, dst *time.Duration) {
				if fl.Changed(name) {
					d, err := sim.ParseDuration(v)
					if err != nil {
						errs = append(errs, fmt.Sprintf("--%s: %v", name, err))
						return
					}
					*dst = d
				}
			}
			dur("duration", duration, &s.Duration)
			dur("commit-every", commitEvery, &s.CommitEvery)
			dur("reestablish", reest, &s.Reestablish)
			if f := cmd.Flag("epsilon"); f != nil && f.Changed {
				s.Epsilon = g.epsilon
			}
			if fl.Changed("seed") {
				s.Seed = seed
			}
			if fl.Changed("nodes") || fl.Changed("weight") || fl.Changed("capacity") {
				n := len(s.Nodes)
				if fl.Changed("nodes") {
					n = nodes
				}
				if n < 1 || n > 1000 {
					errs = append(errs, fmt.Sprintf("--nodes %d: want 1..1000", n))
					n = 1
				}
				s.Nodes = sim.GenNodes(n, uint32(weight), capacity)
			}
			if fl.Changed("tunnels") {
				s.Tunnels.Count = tunnels
			}
			if fl.Changed("pinned") {
				s.Tunnels.PinnedShare = pinned
			}
			if fl.Changed("ipv6") {
				s.Tunnels.IPv6Share = ipv6
			}
			if fl.Changed("max-subnets") {
				s.Tunnels.MaxSubnets = maxSubnets
			}
			if fl.Changed("replication") {
				s.Replication.Impl = repl
			}
			if fl.Changed("loss") {
				s.Replication.Loss = loss
			}
			if len(events) > 0 {
				s.Events = nil
				for _, ev := range events {
					e, err := sim.ParseEvent(ev)
					if err != nil {
						errs = append(errs, "--event: "+err.Error())
						continue
					}
					s.Events = append(s.Events, e)
				}
			} else if scenario == "" && (fl.Changed("duration") || fl.Changed("nodes")) {
				// The standard events follow the farm and the run's length.
				s.Events = sim.StandardEvents(s.Duration, s.Nodes)
			}
			if len(errs) > 0 {
				return &director.RequestError{Param: "sim", Msg: strings.Join(errs, "; ")}
			}
			if err := s.Validate(); err != nil {
				return &director.RequestError{Param: "sim scenario", Msg: err.Error()}
			}

			var steps []sim.Step
			var err error
			if replay != "" {
				f, err := os.Open(replay)
				if err != nil {
					return fmt.Errorf("replay: %w", err)
				}
				steps, err = sim.ReadTrace(replay, f)
				f.Close()
				if err != nil {
					return &director.RequestError{Param: "--replay", Msg: err.Error()}
				}
			} else if steps, err = sim.Workload(s); err != nil {
				return err
			}
			if traceOut != "" {
				var b bytes.Buffer
				if err := sim.WriteTrace(&b, steps); err != nil {
					return err
				}
				if err := os.WriteFile(traceOut, b.Bytes(), 0o644); err != nil {
					return fmt.Errorf("write trace: %w", err)
				}
			}

			opts := sim.Options{NoCompare: !compare}
			if !noBar && term.IsTerminal(int(os.Stderr.Fd())) {
				bar := progressbar.NewOptions64(1,
					progressbar.OptionSetWriter(os.Stderr),
					progressbar.OptionSetDescription("simulating"),
					progressbar.OptionThrottle(100*time.Millisecond),
					progressbar.OptionShowCount(),
					progressbar.OptionClearOnFinish(),
				)
				opts.Progress = func(done, total time.Duration) {
					bar.ChangeMax64(int64(total.Hours()))
					bar.Set64(int64(done.Hours()))
				}
				defer bar.Finish()
			}
			start := time.Now()
			rep, err := sim.Run(s, steps, opts)
			if err != nil {
				return err
			}
			took := time.Since(start)
			if svgDir != "" {
				if _, err := sim.WriteSVGs(rep, svgDir); err != nil {
					return err
				}
			}
			// Wall-clock time only on stderr: the report stays reproducible.
			fmt.Fprintf(g.errOut, "simulated %s of farm life in %s\n", rep.Duration, took.Round(time.Millisecond))
			if g.json {
				return rep.WriteJSON(g.out)
			}
			return rep.WriteText(g.out)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&scenario, "scenario", "", "scenario file (YAML; see sim/README.md)")
	fl.Uint64Var(&seed, "seed", 1, "random seed")
	fl.IntVar(&nodes, "nodes", 8, "nodes (vpn-01...)")
	fl.IntVar(&weight, "weight", affinity.DefaultWeight, "weight of every node")
	fl.IntVar(&capacity, "capacity", 0, "capacity of every node (0: no limit)")
	fl.IntVar(&tunnels, "tunnels", 10000, "tunnels up at the start (arrivals keep the population near it)")
	fl.Float64Var(&pinned, "pinned", 0.2, "share of the initial tunnels pinned by the NMS")
	fl.Float64Var(&ipv6, "ipv6", 0.1, "share of IPv6 tunnels")
	fl.IntVar(&maxSubnets, "max-subnets", 4, "protected subnets per tunnel: 1 to this")
	fl.StringVar(&duration, "duration", "30d", "simulated time (30d, 1w, 36h)")
	fl.StringVar(&commitEvery, "commit-every", "5m", "the director's group-commit interval for learned tunnels")
	fl.StringVar(&reest, "reestablish", "30s", "how long a moved tunnel takes to come back up")
	fl.Float64Var(&loss, "loss", 0.01, "loss rate of the sync link between the directors")
	fl.StringVar(&repl, "replication", "director", "replication between the directors: director (director/replication) or journal (the simulator's own link)")
	fl.StringArrayVar(&events, "event", nil, `timed event "AT KIND [ARG]" (repeat; replaces the scenario's events)`)
	fl.StringVar(&svgDir, "svg-dir", "", "write nodes.svg, moves.svg (and compare.svg) into this folder")
	fl.StringVar(&traceOut, "trace-out", "", "write the run's steps as a trace CSV")
	fl.StringVar(&replay, "replay", "", "replay a trace CSV instead of generating steps")
	fl.BoolVar(&compare, "compare", false, "compare with round-robin, hash-mod-N and Maglev on the same steps")
	fl.BoolVar(&noBar, "no-progress", false, "no progress bar")
	return cmd
}
