// Command tunneldirector is the director for IPsec tunnel termination
// farms: it keeps the affinity table (peer and protected subnets -> node),
// imports the NMS's tunnels, and answers who owns an address. This file
// and its siblings only parse flags and wire packages together.
package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/director"
	"github.com/tunneldirector/tunneldirector/store"
)

// defaultDB is where the store lives unless --db or TUNNELDIRECTOR_DB says
// otherwise.
const defaultDB = "/var/lib/tunneldirector/tunneldirector.db"

// globals are the flags every command shares.
type globals struct {
	db       string
	socket   string
	tcp      string
	token    string
	json     bool
	logLevel string
	epsilon  float64
	out      io.Writer
	errOut   io.Writer
}

func main() {
	g := &globals{out: os.Stdout, errOut: os.Stderr}
	root := newRoot(g)
	if err := root.Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "tunneldirector:", err)
		os.Exit(director.ExitCode(err))
	}
}

func newRoot(g *globals) *cobra.Command {
	root := &cobra.Command{
		Use:           "tunneldirector",
		Short:         "Director for IPsec tunnel termination farms",
		Long:          "tunneldirector keeps every packet of an IPsec tunnel (IKE, NAT-T, ESP, AH) and its return traffic on the one node that holds its SAs.",
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error {
			var lvl slog.Level
			if err := lvl.UnmarshalText([]byte(g.logLevel)); err != nil {
				return &director.RequestError{Param: "--log-level", Value: g.logLevel, Msg: "want debug, info, warn or error"}
			}
			slog.SetDefault(slog.New(slog.NewTextHandler(g.errOut, &slog.HandlerOptions{Level: lvl})))
			return nil
		},
	}
	root.SetOut(g.out)
	root.SetErr(g.errOut)
	// A bad flag is refused input, like a bad file (exit status 2).
	root.SetFlagErrorFunc(func(c *cobra.Command, err error) error {
		return &director.RequestError{Param: c.CommandPath(), Msg: err.Error()}
	})
	db := os.Getenv("TUNNELDIRECTOR_DB")
	if db == "" {
		db = defaultDB
	}
	pf := root.PersistentFlags()
	pf.StringVar(&g.db, "db", db, "store file (env TUNNELDIRECTOR_DB); given explicitly, the CLI works on the file even when a daemon runs")
	pf.StringVar(&g.socket, "socket", director.DefaultSocket, "a running daemon's API socket: used when it exists and --db is not given")
	pf.StringVar(&g.tcp, "api", "", "a daemon's TCP API address:port (needs --token-file)")
	pf.StringVar(&g.token, "token-file", "", "file holding the TCP API token")
	pf.BoolVar(&g.json, "json", false, "print JSON for scripts instead of tables")
	pf.StringVar(&g.logLevel, "log-level", "warn", "log level: debug, info, warn, error")
	pf.Float64Var(&g.epsilon, "epsilon", affinity.DefaultEpsilon, "bounded-load slack for scheduling: no node above ceil((1+epsilon) x its share)")
	root.AddCommand(
		newImportCmd(g), newExportCmd(g), newShowCmd(g), newLookupCmd(g),
		newNodeCmd(g), newRebalanceCmd(g), newStoreCmd(g), newGenCmd(g), newDemoCmd(g), newSimCmd(g),
		newRunCmd(g), newTeardownCmd(g), newLabCmd(g), newConfigCmd(g), newStatusCmd(g), newCtlCmd(g), newAgentCmd(g),
	)
	return root
}

// openStore opens the store named by --db.
func (g *globals) openStore(readOnly bool) (*store.Store, error) {
	return store.Open(store.Options{
		Path:     g.db,
		ReadOnly: readOnly,
		Table:    affinity.Options{Epsilon: g.epsilon},
	})
}

// withOperator runs fn against a running daemon's API when one answers
// (--api, or --socket when it exists and --db was not given), else against
// the store file.
func (g *globals) withOperator(cmd *cobra.Command, readOnly bool, fn func(director.Operator) error) error {
	if c, err := g.client(cmd, false); err != nil || c != nil {
		if err != nil {
			return err
		}
		return fn(c)
	}
	st, err := g.openStore(readOnly)
	if err != nil {
		return err
	}
	defer st.Close()
	return fn(director.NewService(st))
}

// client returns an API client when the CLI should talk to a daemon, nil
// when it should open the store itself. Commands only a daemon can answer
// pass daemonOnly and ignore --db.
func (g *globals) client(cmd *cobra.Command, daemonOnly bool) (*director.Client, error) {
	if g.tcp != "" {
		if g.token == "" {
			return nil, errors.New("--api needs --token-file")
		}
		tok, err := os.ReadFile(g.token)
		if err != nil {
			return nil, fmt.Errorf("token file: %w", err)
		}
		return director.NewTCPClient(g.tcp, strings.TrimSpace(string(tok))), nil
	}
	if cmd.Flags().Changed("db") && !daemonOnly {
		return nil, nil
	}
	fi, err := os.Stat(g.socket)
	switch {
	case err == nil && fi.Mode()&os.ModeSocket != 0:
		return director.NewUnixClient(g.socket), nil
	case errors.Is(err, os.ErrPermission):
		// The socket's directory is root-only: a daemon may well run.
		return nil, fmt.Errorf("API socket %s: permission denied: the daemon's API is root-only (run as root, or use --api with a token)", g.socket)
	}
	return nil, nil
}

// emitJSON prints v as indented JSON.
func (g *globals) emitJSON(v any) error {
	enc := json.NewEncoder(g.out)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// table starts an aligned table on the command's output.
func (g *globals) table() *tabwriter.Writer {
	return tabwriter.NewWriter(g.out, 0, 0, 2, ' ', 0)
}
