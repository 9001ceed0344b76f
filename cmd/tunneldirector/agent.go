package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/tunneldirector/tunneldirector/xfrm/agent"
	"github.com/tunneldirector/tunneldirector/xfrm/report"
)

func newAgentCmd(g *globals) *cobra.Command {
	var (
		cfg       agent.Config
		caFile    string
		directors []string
	)
	cmd := &cobra.Command{
		Use:   "agent",
		Short: "Run on a terminator node: report its IPsec SAs and policies to the director",
		Long: `Run the node agent. It reads the node's XFRM states and policies over netlink,
follows their changes, groups them into tunnel facts (peer, negotiated subnets, SA
count, NAT-T ports, traffic) and POSTs them to ` + report.Path + ` on the master
director: a full report at start and after every reconnect, debounced deltas after
it, and a heartbeat when nothing else was sent for --heartbeat. Give both directors
of a pair (--director twice); the agent reports to whichever answers as master.
The token (--token-file) is this node's: the director accepts reports for this
node only. SIGTERM or SIGINT stops the agent; nothing on the node is changed.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if g.token == "" {
				return errors.New("agent: --token-file is required (the node's API token)")
			}
			tok, err := os.ReadFile(g.token)
			if err != nil {
				return fmt.Errorf("agent: token file: %w", err)
			}
			cfg.Token = strings.TrimSpace(string(tok))
			cfg.Endpoints = directors
			for _, d := range directors {
				if !strings.HasPrefix(d, "http://") && !strings.HasPrefix(d, "https://") {
					return fmt.Errorf("agent: --director %q: want http://host:port or https://host:port", d)
				}
			}
			var tc *tls.Config
			if caFile != "" {
				pem, err := os.ReadFile(caFile)
				if err != nil {
					return fmt.Errorf("agent: --ca-file: %w", err)
				}
				pool := x509.NewCertPool()
				if !pool.AppendCertsFromPEM(pem) {
					return fmt.Errorf("agent: --ca-file %s: no PEM certificate in it", caFile)
				}
				tc = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
			}
			log := slog.Default()
			a, err := agent.New(cfg, agent.Options{TLS: tc, Logger: log})
			if err != nil {
				return err
			}
			defer a.Close()
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
			defer stop()
			log.Info("agent running", "node", cfg.Node, "directors", directors)
			return a.Run(ctx)
		},
	}
	host, _ := os.Hostname()
	f := cmd.Flags()
	f.StringVar(&cfg.Node, "node", host, "this node's name as the director knows it")
	f.StringArrayVar(&directors, "director", nil, "a director's API base URL (http(s)://host:port); give both of a pair")
	f.StringVar(&caFile, "ca-file", "", "PEM file of the CA that signed the directors' certificates (https; default: the system's roots)")
	f.DurationVar(&cfg.Heartbeat, "heartbeat", 0, "send a heartbeat when nothing else was sent for this long (default 5s)")
	f.DurationVar(&cfg.Debounce, "debounce", 0, "send a change once the kernel was quiet this long (default 100ms)")
	f.DurationVar(&cfg.MaxDelay, "max-delay", 0, "send a change at the latest this long after it (default 500ms)")
	f.DurationVar(&cfg.RemoveHold, "remove-hold", 0, "report a peer gone only after it stayed gone this long (default 3s)")
	f.DurationVar(&cfg.Resync, "resync", 0, "read the whole XFRM database again this often (default 1m)")
	f.DurationVar(&cfg.Stats, "stats-interval", 0, "send traffic-counter changes this often (default 1m)")
	cmd.MarkFlagRequired("director")
	return cmd
}
