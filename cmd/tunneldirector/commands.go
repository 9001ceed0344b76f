package main

import (
	"encoding/binary"
	"fmt"
	"io"
	"maps"
	"net/netip"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/affinity/nms"
	"github.com/tunneldirector/tunneldirector/director"
	"github.com/tunneldirector/tunneldirector/internal/atomicfile"
	"github.com/tunneldirector/tunneldirector/xfrm"
)

func newImportCmd(g *globals) *cobra.Command {
	var (
		kind, format     string
		dryRun, replace  bool
		show, maxRecords int
		prof             profileFlags
	)
	cmd := &cobra.Command{
		Use:   "import FILE",
		Short: "Import NMS tunnels or nodes (CSV or JSON) into the store, all or nothing",
		Long: `Import a tunnels or nodes file. The whole file is validated and committed as one
transaction: any error aborts it and nothing changes. The default merges the file
into the table; --replace makes the table equal to it. Re-importing the same file
changes nothing. FILE "-" reads standard input.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			k, err := nms.ParseKind(kind)
			if err != nil {
				return &director.RequestError{Param: "--kind", Value: kind, Msg: "want tunnels, nodes or auto"}
			}
			f, err := parseFormat(format)
			if err != nil {
				return err
			}
			stop, err := prof.start()
			if err != nil {
				return err
			}
			defer stop()
			name := args[0]
			in, size, err := openInput(name)
			if err != nil {
				return err
			}
			defer in.Close()
			req := director.ImportRequest{Name: name, Kind: k, Format: f, DryRun: dryRun, Replace: replace, MaxRecords: maxRecords}
			bar := newProgress(size, "reading "+name)
			var commit *progressbar.ProgressBar
			if bar != nil {
				req.Progress = func(n int64) {
					bar.Set64(n)
					if n >= size && commit == nil {
						// Read (or sent to the daemon) in full: what
						// remains is planning and committing.
						bar.Finish()
						commit = newSpinner("planning and committing "+name, false)
					}
				}
				defer bar.Finish()
			}
			return g.withOperator(cmd, dryRun, func(s director.Operator) error {
				start := time.Now()
				res, err := s.Import(in, req)
				if bar != nil {
					bar.Finish()
				}
				if commit != nil {
					commit.Finish()
				}
				if err != nil {
					return err
				}
				if g.json {
					return g.emitJSON(res)
				}
				fmt.Fprintln(g.out, res.Diff.Summary(show))
				switch {
				case res.DryRun:
					fmt.Fprintln(g.out, "dry run: nothing changed")
				case res.Changed:
					fmt.Fprintf(g.out, "committed revision %d in %s\n", res.Revision, time.Since(start).Round(time.Millisecond))
					g.kernelFeedback(s, res.Revision)
				default:
					fmt.Fprintf(g.out, "nothing to change: the table already matches (revision %d)\n", res.Revision)
				}
				return nil
			})
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&kind, "kind", "auto", "file kind: tunnels, nodes or auto (from the header)")
	fl.StringVar(&format, "format", "auto", "file format: csv, json or auto (from the name or content)")
	fl.BoolVar(&dryRun, "dry-run", false, "print what would change and change nothing")
	fl.BoolVar(&replace, "replace", false, "make the table equal to the file: remove what the file does not list")
	fl.IntVar(&show, "show", 10, "how many ids of each kind of change to list")
	fl.IntVar(&maxRecords, "max-records", 0, fmt.Sprintf("refuse files with more records (0: %d)", nms.DefaultMaxRecords))
	prof.register(cmd)
	return cmd
}

func parseFormat(s string) (nms.Format, error) {
	f, err := nms.ParseFormat(s)
	if err != nil {
		return 0, &director.RequestError{Param: "--format", Value: s, Msg: "want csv, json or auto"}
	}
	return f, nil
}

// openInput opens a file or, for "-", standard input; size is -1 when not
// known.
func openInput(name string) (*os.File, int64, error) {
	if name == "-" {
		return os.Stdin, -1, nil
	}
	f, err := os.Open(name)
	if err != nil {
		return nil, 0, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, 0, err
	}
	if st.IsDir() {
		f.Close()
		return nil, 0, fmt.Errorf("import %s: is a directory", name)
	}
	return f, st.Size(), nil
}

func newExportCmd(g *globals) *cobra.Command {
	var kind, format, out string
	cmd := &cobra.Command{
		Use:   "export",
		Short: "Export the tunnels or nodes as CSV or JSON (re-importable as is)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			k, err := nms.ParseKind(kind)
			if err != nil {
				return &director.RequestError{Param: "--kind", Value: kind, Msg: "want tunnels or nodes"}
			}
			if k == nms.KindAuto {
				k = nms.KindTunnels
			}
			f, err := parseFormat(format)
			if err != nil {
				return err
			}
			if f == nms.FormatAuto {
				f = nms.DetectFormat(out, nil)
				if f == nms.FormatAuto {
					f = nms.FormatCSV
				}
			}
			return g.withOperator(cmd, true, func(s director.Operator) error {
				if out != "" && out != "-" {
					return writeAtomic(out, func(w io.Writer) error {
						w, done := withByteCount(w, "exporting to "+out)
						defer done()
						return s.Export(w, k, f)
					})
				}
				return s.Export(g.out, k, f)
			})
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&kind, "kind", "tunnels", "what to export: tunnels or nodes")
	fl.StringVar(&format, "format", "auto", "csv or json (auto: from -o's extension, else csv)")
	fl.StringVarP(&out, "output", "o", "", "write to this file (atomically) instead of standard output")
	return cmd
}

// writeAtomic writes a file through atomicfile, so a failed write leaves
// the old file.
// A bbolt file (a store: the live one, or a backup) is never overwritten
// with an export.
func writeAtomic(path string, fn func(io.Writer) error) error {
	if f, err := os.Open(path); err == nil {
		var hdr [20]byte
		n, _ := io.ReadFull(f, hdr[:])
		f.Close()
		if n == len(hdr) && binary.LittleEndian.Uint32(hdr[16:]) == 0xED0CDAED {
			return &director.RequestError{Param: "--output", Value: path, Msg: "is a bbolt file (a tunneldirector store?): refusing to overwrite it with an export"}
		}
	}
	if err := atomicfile.Write(path, 0o644, fn); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

func newShowCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "show", Short: "Show tunnels, nodes or one tunnel"}
	var node string
	var limit int
	var misplaced bool
	tunnels := &cobra.Command{
		Use:   "tunnels",
		Short: "List tunnels (all, or one node's)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if misplaced {
				return showMisplaced(g, cmd)
			}
			return g.withOperator(cmd, true, func(s director.Operator) error {
				res, err := s.Tunnels(node, limit)
				if err != nil {
					return err
				}
				list, total := res.Tunnels, res.Total
				if g.json {
					return g.emitJSON(list)
				}
				w := g.table()
				fmt.Fprintln(w, "ID\tPEER\tSUBNETS\tNODE\tPINNED\tREVISION\tUPDATED")
				for _, tu := range list {
					fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%v\t%d\t%s\n", tu.ID, tu.Peer, joinPrefixes(tu.Subnets), tu.Node, tu.Pinned, tu.Revision, tu.Updated.Format(time.RFC3339))
				}
				w.Flush()
				if total > len(list) {
					fmt.Fprintf(g.out, "(%d of %d shown; --limit 0 for all)\n", len(list), total)
				}
				return nil
			})
		},
	}
	tunnels.Flags().StringVar(&node, "node", "", "only this node's tunnels")
	tunnels.Flags().IntVar(&limit, "limit", 50, "show at most this many (0: all)")
	tunnels.Flags().BoolVar(&misplaced, "misplaced", false, "only tunnels whose SAs the node agents report on a node other than their owner (a running master daemon)")
	nodes := &cobra.Command{
		Use:   "nodes",
		Short: "List nodes with their tunnel counts, load bounds and health",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return g.withOperator(cmd, true, func(s director.Operator) error {
				res, err := s.Nodes()
				if err != nil {
					return err
				}
				rows := res.Nodes
				if g.json {
					return g.emitJSON(rows)
				}
				w := g.table()
				// The agents' columns appear when a daemon has agent
				// reports to show.
				agentCols := slices.ContainsFunc(rows, func(r director.NodeInfo) bool { return r.Agent != nil })
				head := "NAME\tADDRESS\tSTATE\tWEIGHT\tCAPACITY\tMARK\tTUNNELS\tBOUND\tHEALTH"
				if agentCols {
					head += "\tSAS\tSA-TUNNELS\tMISPLACED\tLAST-REPORT"
				}
				fmt.Fprintln(w, head)
				for _, r := range rows {
					capacity := "-"
					if r.Capacity > 0 {
						capacity = fmt.Sprint(r.Capacity)
					}
					bound := "-"
					if r.Bound > 0 {
						bound = fmt.Sprint(r.Bound)
					}
					fmt.Fprintf(w, "%s\t%s\t%s\t%d\t%s\t%d\t%d\t%s\t%s", r.Name, r.Addr, r.State, r.Weight, capacity, r.Mark, r.Tunnels, bound, r.HealthSummary)
					switch a := r.Agent; {
					case !agentCols:
					case a == nil:
						fmt.Fprint(w, "\t-\t-\t-\tnever")
					default:
						fmt.Fprintf(w, "\t%d\t%d\t%d\t%s ago", a.SAs, a.Tunnels, a.Misplaced, time.Since(a.LastReport).Round(time.Second))
					}
					fmt.Fprintln(w)
				}
				w.Flush()
				fmt.Fprintf(g.out, "%d tunnels, revision %d\n", res.Tunnels, res.Revision)
				return nil
			})
		},
	}
	one := &cobra.Command{
		Use:   "tunnel ID",
		Short: "Show one tunnel",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.withOperator(cmd, true, func(s director.Operator) error {
				tu, err := s.Tunnel(args[0])
				if err != nil {
					return err
				}
				if g.json {
					return g.emitJSON(tu)
				}
				w := g.table()
				fmt.Fprintf(w, "id\t%s\npeer\t%s\nsubnets\t%s\nnode\t%s\npinned\t%v\ncomment\t%s\ncreated\t%s\nupdated\t%s\nrevision\t%d\n",
					tu.ID, tu.Peer, joinPrefixes(tu.Subnets), tu.Node, tu.Pinned, tu.Comment,
					tu.Created.Format(time.RFC3339), tu.Updated.Format(time.RFC3339), tu.Revision)
				if tu.Learned {
					seen := "never"
					if !tu.Seen.IsZero() {
						seen = tu.Seen.Format(time.RFC3339)
					}
					fmt.Fprintf(w, "learned\ttrue (subnets from its owner's agent)\nSA last seen\t%s\n", seen)
				}
				// A daemon also knows what the node agents report of
				// the peer.
				if c, ok := s.(*director.Client); ok {
					if facts, err := c.PeerFacts(tu.Peer); err == nil {
						for _, f := range facts {
							fmt.Fprintf(w, "SAs on %s\t%s\n", f.Node, describeFacts(&f.Tunnel))
						}
					}
				}
				return w.Flush()
			})
		},
	}
	agentsCmd := &cobra.Command{
		Use:   "agents",
		Short: "Show the node agents: per node SAs and tunnels, the merge's counters, and what was reported but not applied",
		Args:  cobra.NoArgs,
		RunE: askDaemon(g, "show agents", agentsHint, (*director.Client).Agents, func(res *director.AgentsResult) error {
			w := g.table()
			fmt.Fprintln(w, "NODE\tSAS\tTUNNELS\tMISPLACED\tLAST-REPORT\tLAST-FULL")
			for _, name := range slices.Sorted(maps.Keys(res.Nodes)) {
				v := res.Nodes[name]
				fmt.Fprintf(w, "%s\t%d\t%d\t%d\t%s\t%s\n", name, v.SAs, v.Tunnels, v.Misplaced, v.LastReport.Format(time.RFC3339), v.LastFull.Format(time.RFC3339))
			}
			w.Flush()
			s := res.Status
			fmt.Fprintf(g.out, "adopt %s; merges %d (%d failed); learned %d, subnets applied %d, followed %d, expired %d\n",
				s.Adopt, s.Merges, s.MergeErrors, s.Learned, s.SubnetsApplied, s.Followed, s.Expired)
			if len(res.Unapplied) > 0 {
				fmt.Fprintln(g.out, "\nreported, not applied:")
				w = g.table()
				fmt.Fprintln(w, "TUNNEL\tPEER\tNODE\tSUBNET\tSINCE\tREASON")
				for _, u := range res.Unapplied {
					sub := "-"
					if u.Subnet.IsValid() {
						sub = u.Subnet.String()
					}
					fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\n", u.Tunnel, u.Peer, u.Node, sub, u.Since.Format(time.RFC3339), u.Reason)
				}
				w.Flush()
			}
			return nil
		}),
	}
	cmd.AddCommand(tunnels, nodes, one, agentsCmd)
	return cmd
}

// agentsHint says why the agents' commands need a daemon: the agents'
// facts live in the master daemon's memory, not in the store.
const agentsHint = ": the agents' reports live in the running master daemon (pass --socket or --api)"

// daemonClient returns the client of a running daemon, or, when none
// answers, an error naming the command (what) with hint after it.
func daemonClient(g *globals, cmd *cobra.Command, what, hint string) (*director.Client, error) {
	c, err := g.client(cmd, true)
	if err != nil {
		return nil, err
	}
	if c == nil {
		return nil, fmt.Errorf("%s: no daemon answers on %s%s", what, g.socket, hint)
	}
	return c, nil
}

// askDaemon is the RunE of a command only a running daemon answers: it
// asks the daemon and prints the answer as JSON with --json, else with
// text.
func askDaemon[T any](g *globals, what, hint string, ask func(*director.Client) (T, error), text func(T) error) func(*cobra.Command, []string) error {
	return func(cmd *cobra.Command, _ []string) error {
		c, err := daemonClient(g, cmd, what, hint)
		if err != nil {
			return err
		}
		r, err := ask(c)
		if err != nil {
			return err
		}
		if g.json {
			return g.emitJSON(r)
		}
		return text(r)
	}
}

// showMisplaced lists the tunnels whose SAs the agents report on a node
// other than their owner.
func showMisplaced(g *globals, cmd *cobra.Command) error {
	c, err := daemonClient(g, cmd, "show tunnels --misplaced", agentsHint)
	if err != nil {
		return err
	}
	res, err := c.Misplaced()
	if err != nil {
		return err
	}
	if g.json {
		return g.emitJSON(res.Misplaced)
	}
	w := g.table()
	fmt.Fprintln(w, "ID\tPEER\tOWNER\tSAS-ON\tSINCE\tACTION")
	for _, m := range res.Misplaced {
		since := "-"
		if !m.Since.IsZero() {
			since = m.Since.Format(time.RFC3339)
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\n", m.Tunnel, m.Peer, m.Owner, strings.Join(m.HeldOn, ","), since, m.Action)
	}
	w.Flush()
	fmt.Fprintf(g.out, "%d misplaced (adopt: %s)\n", len(res.Misplaced), res.Adopt)
	return nil
}

func joinPrefixes(ps []netip.Prefix) string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = p.String()
	}
	return strings.Join(s, " ")
}

func newLookupCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "lookup ADDRESS",
		Short: "Which tunnel and node own an address, and why (peer match or protected subnet)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			a, err := netip.ParseAddr(args[0])
			if err != nil {
				return &director.RequestError{Param: "lookup", Value: args[0], Msg: "not an IP address"}
			}
			return g.withOperator(cmd, true, func(s director.Operator) error {
				res, err := s.Lookup(a.Unmap())
				if err != nil {
					return err
				}
				if g.json {
					return g.emitJSON(res)
				}
				if !res.Found {
					return fmt.Errorf("%s: no tunnel's peer or protected subnet: %w", a, affinity.ErrNotFound)
				}
				m := res.Match
				switch m.By {
				case affinity.MatchPeer:
					fmt.Fprintf(g.out, "%s is the peer of tunnel %s, owned by node %s (%s, mark %d)\n", a, m.Tunnel.ID, m.Node.Name, m.Node.Addr, m.Node.Mark)
				default:
					fmt.Fprintf(g.out, "%s is inside %s, protected by tunnel %s (peer %s), owned by node %s (%s, mark %d)\n", a, m.Prefix, m.Tunnel.ID, m.Tunnel.Peer, m.Node.Name, m.Node.Addr, m.Node.Mark)
				}
				return nil
			})
		},
	}
}

// describeFacts says in one line what an agent reports of a peer.
func describeFacts(t *xfrm.Tunnel) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%d SAs, subnets %s, %d bytes, %d packets", t.SAs, joinPrefixes(t.Subnets), t.Bytes, t.Packets)
	for _, n := range t.NATT {
		fmt.Fprintf(&b, ", NAT-T from %s port %d to port %d", t.Peer, n.Port, n.LocalPort)
	}
	if t.LastUse > 0 {
		fmt.Fprintf(&b, ", last used %s", time.Unix(t.LastUse, 0).UTC().Format(time.RFC3339))
	}
	return b.String()
}
