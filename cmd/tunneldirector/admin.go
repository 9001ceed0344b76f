package main

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/affinity/nms"
	"github.com/tunneldirector/tunneldirector/director"
	"github.com/tunneldirector/tunneldirector/ipvs"
	"github.com/tunneldirector/tunneldirector/sim"
)

func newNodeCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "node", Short: "Add, remove, drain, fail or reweight a node"}
	const show = 20 // moves printed
	run := func(c *cobra.Command, req director.NodeRequest) error {
		if !g.json {
			req.MovesLimit = show
		}
		return g.withOperator(c, false, func(s director.Operator) error {
			var res *director.NodeResult
			start := time.Now()
			err := busy(fmt.Sprintf("node %s %s: planning and committing", req.Action, req.Name), func() (err error) {
				res, err = s.NodeAction(req)
				return err
			})
			if err != nil {
				return err
			}
			if g.json {
				return g.emitJSON(res)
			}
			if !res.Changed {
				fmt.Fprintf(g.out, "node %s: nothing to change (revision %d)\n", req.Name, res.Revision)
				return nil
			}
			fmt.Fprintf(g.out, "node %s: %s done, revision %d, committed in %s\n", req.Name, req.Action, res.Revision, time.Since(start).Round(time.Millisecond))
			if res.Plan != nil {
				printMoves(g, res.Plan, show, res.MovesOmitted)
			}
			g.kernelFeedback(s, res.Revision)
			return nil
		})
	}
	var weight uint32
	var capacity int
	var comment string
	add := &cobra.Command{
		Use:   "add NAME ADDRESS",
		Short: "Add a node (it takes new tunnels; nothing moves to it until a rebalance)",
		Args:  cobra.ExactArgs(2),
		RunE: func(c *cobra.Command, args []string) error {
			a, err := netip.ParseAddr(args[1])
			if err != nil {
				return &director.RequestError{Param: "node add " + args[0] + ": address", Value: args[1], Msg: "not an IP address"}
			}
			return run(c, director.NodeRequest{Action: "add", Name: args[0], Addr: a, Weight: weight, Capacity: capacity, Comment: comment})
		},
	}
	add.Flags().Uint32Var(&weight, "weight", affinity.DefaultWeight, "relative share of scheduled tunnels (1..10000)")
	add.Flags().IntVar(&capacity, "capacity", 0, "most tunnels the node may hold (0: no limit)")
	add.Flags().StringVar(&comment, "comment", "", "free text")
	simple := func(action, short string) *cobra.Command {
		return &cobra.Command{
			Use:   action + " NAME",
			Short: short,
			Args:  cobra.ExactArgs(1),
			RunE: func(c *cobra.Command, args []string) error {
				return run(c, director.NodeRequest{Action: action, Name: args[0]})
			},
		}
	}
	setWeight := &cobra.Command{
		Use:   "set-weight NAME WEIGHT",
		Short: "Change a node's weight (affects new tunnels and rebalances only)",
		Args:  cobra.ExactArgs(2),
		RunE: func(c *cobra.Command, args []string) error {
			w, err := strconv.ParseUint(args[1], 10, 32)
			if err != nil || w == 0 || w > 10000 {
				return &director.RequestError{Param: "set-weight " + args[0] + ": weight", Value: args[1], Msg: "want 1..10000"}
			}
			return run(c, director.NodeRequest{Action: "set-weight", Name: args[0], Weight: uint32(w)})
		},
	}
	cmd.AddCommand(add,
		simple("remove", "Remove a node; its tunnels move to the scheduler's choice first"),
		simple("drain", "Stop giving the node new tunnels; its tunnels stay until a rebalance"),
		simple("undrain", "Let a draining node take new tunnels again"),
		simple("down", "Mark a node failed: its tunnels, and only those, move now"),
		simple("up", "Mark a failed node active again (nothing moves back until a rebalance)"),
		setWeight)
	return cmd
}

func printMoves(g *globals, p *affinity.Plan, max, omitted int) {
	fmt.Fprintf(g.out, "%d tunnel(s) move", len(p.Moves)+omitted)
	if p.Remaining > 0 {
		fmt.Fprintf(g.out, ", %d more wanted beyond the budget", p.Remaining)
	}
	if len(p.Unplaced) > 0 {
		fmt.Fprintf(g.out, ", %d cannot be placed", len(p.Unplaced))
	}
	fmt.Fprintln(g.out)
	w := g.table()
	if len(p.Moves) > 0 {
		fmt.Fprintln(w, "TUNNEL\tPEER\tFROM\tTO\tREASON")
	}
	for i, m := range p.Moves {
		if i == max {
			break
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\n", m.Tunnel, m.Peer, m.From, m.To, m.Reason)
	}
	if more := len(p.Moves) + omitted - max; more > 0 {
		fmt.Fprintf(w, "...\t(%d more)\t\t\t\n", more)
	}
	for i, m := range p.Unplaced {
		if i == max {
			break
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t-\t%s\n", m.Tunnel, m.Peer, m.From, m.Reason)
	}
	w.Flush()
}

func newRebalanceCmd(g *globals) *cobra.Command {
	var maxMoves, show int
	var apply bool
	cmd := &cobra.Command{
		Use:   "rebalance --max-moves N [--apply]",
		Short: "Plan (and with --apply, make) at most N tunnel moves to even the load",
		Long: `Plan tunnel moves, most urgent first: tunnels stranded on down nodes, tunnels on
draining nodes, tunnels on nodes above their bounded-load limit, then tunnels whose
preferred node is below its fair share. Without --apply nothing changes. Moving a live
tunnel breaks it until it re-establishes on its new node: keep the budget small.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if !cmd.Flags().Changed("max-moves") {
				return fmt.Errorf("rebalance: --max-moves is required (moving live tunnels breaks them; choose a budget)")
			}
			return g.withOperator(cmd, !apply, func(s director.Operator) error {
				var res *director.RebalanceResult
				start := time.Now()
				err := busy(fmt.Sprintf("rebalance of at most %d moves: planning", maxMoves), func() (err error) {
					res, err = s.Rebalance(maxMoves, apply)
					return err
				})
				if err != nil {
					return err
				}
				if g.json {
					return g.emitJSON(res)
				}
				printMoves(g, res.Plan, show, 0)
				if apply {
					fmt.Fprintf(g.out, "applied: revision %d, committed in %s\n", res.Revision, time.Since(start).Round(time.Millisecond))
					if len(res.Plan.Moves) > 0 {
						g.kernelFeedback(s, res.Revision)
					}
				} else {
					fmt.Fprintln(g.out, "plan only: run again with --apply to move them")
				}
				return nil
			})
		},
	}
	cmd.Flags().IntVar(&maxMoves, "max-moves", 0, "most tunnels to move")
	cmd.Flags().BoolVar(&apply, "apply", false, "carry the plan out")
	cmd.Flags().IntVar(&show, "show", 20, "moves to list")
	return cmd
}

func newStoreCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "store", Short: "Back up or check the store file"}
	var force bool
	backup := &cobra.Command{
		Use:   "backup FILE",
		Short: "Write a consistent copy of the store while it is in use",
		Long: `Write a consistent copy of the store while it is in use. Through a running
daemon, FILE is on the daemon's machine and must lie inside its backup_dir (a
relative name is taken there). The live store itself is never overwritten; an
existing file only with --force.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.withOperator(cmd, true, func(s director.Operator) error {
				rev, n, err := s.Backup(args[0], force)
				if err != nil {
					return err
				}
				fmt.Fprintf(g.out, "backed up revision %d (%d bytes) to %s\n", rev, n, args[0])
				return nil
			})
		},
	}
	backup.Flags().BoolVar(&force, "force", false, "overwrite an existing backup file")
	check := &cobra.Command{
		Use:   "check",
		Short: "Check the store's pages, invariants and indexes",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return g.withOperator(cmd, true, func(s director.Operator) error {
				r, err := s.Check()
				if err != nil {
					return err
				}
				if g.json {
					if err := g.emitJSON(r); err != nil {
						return err
					}
				} else {
					fmt.Fprintf(g.out, "%s: schema %d, revision %d, %d nodes, %d tunnels, %d subnets, %d unknown-peer buckets, journal %d entries from revision %d, %d changes pending (records written up to revision %d)\n",
						r.Path, r.Schema, r.Revision, r.Nodes, r.Tunnels, r.Subnets, r.Buckets, r.Journal, r.Oldest, r.Pending, r.Folded)
					for _, p := range r.Problems {
						fmt.Fprintln(g.out, "problem:", p)
					}
				}
				if !r.OK() {
					return fmt.Errorf("store %s: %d problem(s)", r.Path, len(r.Problems))
				}
				if !g.json {
					fmt.Fprintln(g.out, "ok")
				}
				return nil
			})
		},
	}
	cmd.AddCommand(backup, check)
	return cmd
}

// newGenCmd writes a generated farm as NMS files: for demos, benchmarks and
// the simulator.
func newGenCmd(g *globals) *cobra.Command {
	var spec sim.FarmSpec
	var dir, format string
	cmd := &cobra.Command{
		Use:   "gen --dir DIR",
		Short: "Generate an example farm as NMS files (nodes and tunnels)",
		Args:  cobra.NoArgs,
		RunE: func(_ *cobra.Command, _ []string) error {
			f, err := parseFormat(format)
			if err != nil {
				return err
			}
			if f == nms.FormatAuto {
				f = nms.FormatCSV
			}
			nodesPath, tunnelsPath, err := writeFarm(spec, dir, f)
			if err != nil {
				return err
			}
			fmt.Fprintf(g.out, "wrote %s and %s\n", nodesPath, tunnelsPath)
			return nil
		},
	}
	fl := cmd.Flags()
	farmFlags(fl, &spec)
	fl.StringVar(&dir, "dir", ".", "where to write nodes.EXT and tunnels.EXT")
	fl.StringVar(&format, "format", "csv", "csv or json")
	return cmd
}

// farmFlags declares the flags that describe a generated farm.
func farmFlags(fl *pflag.FlagSet, spec *sim.FarmSpec) {
	fl.Uint64Var(&spec.Seed, "seed", 1, "random seed")
	fl.IntVar(&spec.Nodes, "nodes", 8, "nodes")
	fl.IntVar(&spec.Tunnels, "tunnels", 10000, "tunnels")
	fl.IntVar(&spec.MaxSubnets, "max-subnets", 4, "protected subnets per tunnel: 1 to this")
	fl.IntVar(&spec.Subnet4Bits, "subnet-bits", 0, "length of the IPv4 subnets (0: /27, or the shortest from /27 on that fits every tunnel's subnets in 10.0.0.0/7)")
	fl.Float64Var(&spec.IPv6Share, "ipv6", 0.1, "share of IPv6 tunnels")
	fl.Float64Var(&spec.PinnedShare, "pinned", 0.2, "share of tunnels the NMS pins to a node")
}

func writeFarm(spec sim.FarmSpec, dir string, f nms.Format) (string, string, error) {
	farm, err := sim.GenerateFarm(spec)
	if err != nil {
		return "", "", err
	}
	ext := "." + f.String()
	nodesPath := filepath.Join(dir, "nodes"+ext)
	tunnelsPath := filepath.Join(dir, "tunnels"+ext)
	write := func(path string, fn func(*os.File) error) error {
		file, err := os.Create(path)
		if err != nil {
			return err
		}
		if err := fn(file); err != nil {
			file.Close()
			return fmt.Errorf("write %s: %w", path, err)
		}
		return file.Close()
	}
	if err := write(nodesPath, func(w *os.File) error { return nms.WriteNodes(w, f, farm.Nodes) }); err != nil {
		return "", "", err
	}
	// Generated tunnels name an owner only when pinned, as an NMS would.
	if err := write(tunnelsPath, func(w *os.File) error { return nms.WriteTunnels(w, f, farm.Tunnels) }); err != nil {
		return "", "", err
	}
	return nodesPath, tunnelsPath, nil
}

func newTeardownCmd(g *globals) *cobra.Command {
	var path string
	var force bool
	cmd := &cobra.Command{
		Use:   "teardown",
		Short: "Remove everything the director programmed into the kernel, and nothing else",
		Long: `Remove the director's nftables table, fwmark rules, routes and IPVS services.
Refused while a daemon owns them (its API socket answers, or it holds the store's
lock): the daemon would re-create them at its next verify, and in between the
farm is unsteered. Stop the daemon first, or pass --force.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := director.LoadConfig(path)
			if err != nil {
				return err
			}
			if owner := daemonOwner(cfg); owner != "" && !force {
				return fmt.Errorf("teardown refused: %s, which owns the kernel objects (it would re-create them at its next verify, and until then the farm is unsteered); stop the daemon first, or pass --force", owner)
			}
			dp, err := ipvs.New(cfg.Dataplane())
			if err != nil {
				return err
			}
			defer dp.Close()
			if err := dp.Teardown(cmd.Context()); err != nil {
				return err
			}
			fmt.Fprintln(g.out, "removed the director's nftables table, rules, routes and IPVS services")
			return nil
		},
	}
	cmd.Flags().StringVarP(&path, "config", "c", defaultConfig, "configuration file (YAML)")
	cmd.Flags().BoolVar(&force, "force", false, "tear down even while a daemon runs")
	return cmd
}

// daemonOwner says which running daemon owns the kernel objects of cfg, or
// "" when none does: one that answers on the API socket, or one that holds
// the store's lock (a hung daemon still holds it).
func daemonOwner(cfg *director.Config) string {
	if st, err := director.NewUnixClient(cfg.API.Socket).Status(); err == nil {
		return fmt.Sprintf("a daemon answers on %s (mode %s, revision %d)", cfg.API.Socket, st.Mode, st.Revision)
	}
	f, err := os.Open(cfg.Store)
	if err != nil {
		return ""
	}
	defer f.Close()
	// bbolt takes an exclusive flock for a writer: a shared one that would
	// block means a daemon (or another writer) has the store open.
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_SH|syscall.LOCK_NB); err != nil {
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return fmt.Sprintf("the store %s is locked by a running process", cfg.Store)
		}
		return ""
	}
	_ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
	return ""
}
