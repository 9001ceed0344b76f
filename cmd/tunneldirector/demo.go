package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"

	"github.com/tunneldirector/tunneldirector/affinity/nms"
	"github.com/tunneldirector/tunneldirector/sim"
)

// newDemoCmd runs the main job on an embedded default: a generated farm is
// imported into a store in a temporary folder, then shown, looked up, and
// put through a node failure, all with the real commands.
func newDemoCmd(g *globals) *cobra.Command {
	var spec sim.FarmSpec
	var keep bool
	cmd := &cobra.Command{
		Use:   "demo",
		Short: "Import a generated farm into a temporary store and show what the director knows",
		Args:  cobra.NoArgs,
		RunE: func(_ *cobra.Command, _ []string) error {
			dir, err := os.MkdirTemp("", "tunneldirector-demo-")
			if err != nil {
				return err
			}
			if keep {
				fmt.Fprintf(g.out, "# working in %s (kept)\n", dir)
			} else {
				defer os.RemoveAll(dir)
			}
			nodesPath, tunnelsPath, err := writeFarm(spec, dir, nms.FormatCSV)
			if err != nil {
				return err
			}
			db := filepath.Join(dir, "tunneldirector.db")
			exportPath := filepath.Join(dir, "export.csv")
			farm, _ := sim.GenerateFarm(spec)
			peer := farm.Tunnels[len(farm.Tunnels)/2].Peer.String()
			inside := farm.Tunnels[len(farm.Tunnels)/3].Subnets[0].Addr().Next().String()
			fmt.Fprintf(g.out, "# a farm of %d nodes and %d tunnels, written as NMS files in %s\n", spec.Nodes, spec.Tunnels, dir)
			steps := [][]string{
				{"import", nodesPath},
				{"import", tunnelsPath},
				{"show", "nodes"},
				{"show", "tunnels", "--limit", "5"},
				{"lookup", peer},
				{"lookup", inside},
				{"node", "down", "vpn-03"},
				{"show", "nodes"},
				{"import", tunnelsPath}, // the same file again: nothing changes
				{"node", "add", "vpn-99", "172.16.0.99"},
				{"rebalance", "--max-moves", "50", "--show", "5"},
				{"export", "-o", exportPath},
				{"import", "--dry-run", exportPath},
				{"store", "check"},
			}
			for _, args := range steps {
				fmt.Fprintf(g.out, "\n$ tunneldirector %s\n", strings.Join(args, " "))
				sub := newRoot(&globals{out: g.out, errOut: g.errOut})
				sub.SetArgs(append([]string{"--db", db}, args...))
				if err := sub.Execute(); err != nil {
					return fmt.Errorf("demo step %q: %w", strings.Join(args, " "), err)
				}
			}
			return nil
		},
	}
	fl := cmd.Flags()
	farmFlags(fl, &spec)
	fl.BoolVar(&keep, "keep", false, "keep the temporary folder")
	return cmd
}
