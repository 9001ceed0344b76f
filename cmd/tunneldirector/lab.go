package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/tunneldirector/tunneldirector/internal/farmlab"
)

// newLabCmd runs a farm in network namespaces on this kernel with the real
// daemon on a director pair, and shows every packet reach its owner.
func newLabCmd(g *globals) *cobra.Command {
	var o farmlab.Options
	var preflight bool
	cmd := &cobra.Command{
		Use:   "lab",
		Short: "Run a farm in network namespaces with a real director pair and show every packet reach its owner (root)",
		Long: `Build a farm in network namespaces on this machine's kernel: peer hosts, a director
pair running 'tunneldirector run' with replication, terminator nodes, a target
network. Import a generated NMS file, send IKE, NAT-T, ESP and return traffic for
every tunnel and count, per node, the packets that arrived against the tunnels it
owns; then fail a node, move a tunnel and fail the director over, counting after
each event. Route-only mode (the host kernel has no IPVS). The host's own network
namespace is never touched; everything is gone when the command ends (Ctrl-C too).
Needs root and nf_tables; --preflight only checks that.`,
		Args: cobra.NoArgs,
		RunE: func(_ *cobra.Command, _ []string) error {
			if preflight {
				if err := farmlab.Preflight(); err != nil {
					return err
				}
				fmt.Fprintln(g.out, "lab: this machine can run it (root, network namespaces, nf_tables)")
				return nil
			}
			exe, err := os.Executable()
			if err != nil {
				return err
			}
			o.Binary, o.Out = exe, g.out
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			_, err = farmlab.Run(ctx, o)
			if errors.Is(err, context.Canceled) {
				fmt.Fprintln(g.errOut, "lab: interrupted; the farm is torn down")
				return nil
			}
			return err
		},
	}
	fl := cmd.Flags()
	fl.IntVar(&o.Nodes, "nodes", 4, "terminator nodes (at least 3)")
	fl.IntVar(&o.PeerHosts, "peer-hosts", 8, "peer namespaces")
	fl.IntVar(&o.TunnelsPerHost, "tunnels-per-host", 32, "tunnel endpoint addresses on each peer namespace (1..250)")
	fl.StringVar(&o.Dir, "dir", "", "keep the stores, configurations, logs and NMS file here (default: a temporary directory, removed)")
	fl.BoolVar(&o.Hold, "hold", false, "keep the farm up after the events until Ctrl-C")
	fl.BoolVar(&preflight, "preflight", false, "only check that this machine can run the lab")
	return cmd
}
