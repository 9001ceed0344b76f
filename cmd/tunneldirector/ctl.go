package main

import (
	"bufio"
	"fmt"
	"os"
	"time"

	"github.com/spf13/cobra"

	"github.com/tunneldirector/tunneldirector/director"
	"github.com/tunneldirector/tunneldirector/director/ctsync"
	"github.com/tunneldirector/tunneldirector/director/replication"
)

// newCtlCmd holds what keepalived calls: notify scripts, notify_fifo and
// the readiness check.
func newCtlCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "ctl", Short: "Control a running daemon from keepalived (role, notify_fifo, readiness)"}
	role := &cobra.Command{
		Use:   "role master|backup|fault",
		Short: "Set the pair role (for keepalived's notify_master, notify_backup, notify_fault)",
		Args:  cobra.ExactArgs(1),
		RunE: func(c *cobra.Command, args []string) error {
			cl, err := daemonClient(g, c, "ctl role", "")
			if err != nil {
				return err
			}
			if _, err := cl.SetRole(args[0]); err != nil {
				return err
			}
			fmt.Fprintf(g.out, "role %s\n", args[0])
			return nil
		},
	}
	var group, instance string
	fifo := &cobra.Command{
		Use:   "notify-fifo FIFO",
		Short: "Follow keepalived's notify_fifo and set the role on every state change",
		Long: `Read keepalived's notify_fifo (global_defs { notify_fifo FIFO }) and set the
director's role from the lines of the sync group (--group) or one instance
(--instance): MASTER -> master, BACKUP -> backup, FAULT/STOP/DELETED -> fault.
Events that are not state changes (MASTER_RX_LOWER_PRI, MASTER_PRIORITY,
BACKUP_PRIORITY) and lines of any other state leave the role as it is.`,
		Args: cobra.ExactArgs(1),
		RunE: func(c *cobra.Command, args []string) error {
			if (group == "") == (instance == "") {
				return fmt.Errorf("notify-fifo: give exactly one of --group and --instance")
			}
			cl, err := daemonClient(g, c, "ctl notify-fifo", "")
			if err != nil {
				return err
			}
			for {
				f, err := os.Open(args[0]) // blocks until keepalived opens it
				if err != nil {
					return fmt.Errorf("notify fifo %s: %w", args[0], err)
				}
				sc := bufio.NewScanner(f)
				for sc.Scan() {
					ev, err := director.ParseNotifyLine(sc.Text())
					if err != nil {
						fmt.Fprintln(g.errOut, "notify-fifo:", err)
						continue
					}
					if (group != "" && (ev.Kind != "GROUP" || ev.Name != group)) || (instance != "" && (ev.Kind != "INSTANCE" || ev.Name != instance)) {
						continue
					}
					role, ok := ev.RoleOf()
					if !ok {
						fmt.Fprintf(g.out, "%s %s %s: not a state change, role unchanged\n", ev.Kind, ev.Name, ev.State)
						continue
					}
					if _, err := cl.SetRole(role); err != nil {
						fmt.Fprintln(g.errOut, "notify-fifo: set role:", err)
						continue
					}
					fmt.Fprintf(g.out, "%s %s %s -> role %s\n", ev.Kind, ev.Name, ev.State, role)
				}
				f.Close()
				time.Sleep(100 * time.Millisecond) // keepalived restarted: reopen
			}
		},
	}
	fifo.Flags().StringVar(&group, "group", "", "the vrrp_sync_group to follow")
	fifo.Flags().StringVar(&instance, "instance", "", "the vrrp_instance to follow")
	ready := &cobra.Command{
		Use:   "ready",
		Short: "Exit 0 when the daemon is in sync with its peer (for a keepalived track_script)",
		Args:  cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			cl, err := daemonClient(g, c, "ctl ready", "")
			if err != nil {
				return err
			}
			return cl.Ready()
		},
	}
	conflicts := &cobra.Command{
		Use:   "conflicts",
		Short: "Show the split-brain merges this director made as master: every record both directors changed, the winner and why",
		Args:  cobra.NoArgs,
		RunE: askDaemon(g, "ctl conflicts", "", (*director.Client).Conflicts, func(reps []replication.MergeReport) error {
			for _, r := range reps {
				fmt.Fprintf(g.out, "%s merge of director %d (revision %d, epoch %d) into revision %d: %d conflicts, %d tunnels kept from the peer, %d adopted\n",
					r.At.Format(time.RFC3339), r.PeerID, r.PeerRevision, r.PeerEpoch, r.Revision, len(r.Conflicts), len(r.KeptFromPeer), len(r.AdoptedFromPeer))
				for _, cf := range r.Conflicts {
					fmt.Fprintf(g.out, "  %s %s: %s wins (%s)\n", cf.Kind, cf.Key, cf.Winner, cf.Why)
				}
			}
			return nil
		}),
	}
	cmd.AddCommand(role, fifo, ready, conflicts, newConntrackCmd(g))
	return cmd
}

// newConntrackCmd holds conntrackd's -c, -f, -n/-B and -e for operators
// who drive conntrack replication by hand (the daemon does all of them
// itself on role changes).
func newConntrackCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "conntrack", Short: "Conntrack replication by hand: commit, flush, resync, show"}
	commit := &cobra.Command{
		Use:   "commit",
		Short: "Commit the cache of the peer's flows into this director's kernel now (conntrackd -c)",
		Args:  cobra.NoArgs,
		RunE: askDaemon(g, "ctl conntrack commit", "", (*director.Client).ConntrackCommit, func(r *ctsync.CommitReport) error {
			fmt.Fprintf(g.out, "committed %d entries (%d failed) in %s\n", r.Entries-r.Failed, r.Failed, r.Took)
			if r.Error != "" {
				return fmt.Errorf("conntrack commit: %s", r.Error)
			}
			return nil
		}),
	}
	var cache bool
	flush := &cobra.Command{
		Use:   "flush",
		Short: "Let the synced entries in this director's kernel run out (conntrackd -t); --cache also empties the cache (conntrackd -f)",
		Args:  cobra.NoArgs,
		RunE: askDaemon(g, "ctl conntrack flush", "", func(cl *director.Client) (*director.FlushResult, error) { return cl.ConntrackFlush(cache) }, func(r *director.FlushResult) error {
			fmt.Fprintf(g.out, "%d entries left to run out; cache emptied: %v\n", r.Purged, r.CacheEmptied)
			return nil
		}),
	}
	flush.Flags().BoolVar(&cache, "cache", false, "also empty the cache of the peer's flows")
	resync := &cobra.Command{
		Use:   "resync",
		Short: "Full resync: a backup asks the master for every flow (conntrackd -n), a master sends them (conntrackd -B)",
		Args:  cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			cl, err := daemonClient(g, c, "ctl conntrack resync", "")
			if err != nil {
				return err
			}
			st, err := cl.ConntrackResync()
			if err != nil {
				return err
			}
			fmt.Fprintf(g.out, "resync asked (%s)\n", st.Role)
			return nil
		},
	}
	var limit int
	show := &cobra.Command{
		Use:   "show",
		Short: "List the cache of the peer's flows (conntrackd -e)",
		Args:  cobra.NoArgs,
		RunE: askDaemon(g, "ctl conntrack show", "", func(cl *director.Client) ([]director.FlowInfo, error) { return cl.ConntrackFlows(limit) }, func(fs []director.FlowInfo) error {
			for _, f := range fs {
				fmt.Fprintln(g.out, f.Flow)
			}
			return nil
		}),
	}
	show.Flags().IntVar(&limit, "limit", 100, "at most this many flows (0: all)")
	cmd.AddCommand(commit, flush, resync, show)
	return cmd
}
