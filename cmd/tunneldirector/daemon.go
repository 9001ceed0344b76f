package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/tunneldirector/tunneldirector/director"
	"github.com/tunneldirector/tunneldirector/director/ctsync"
	"github.com/tunneldirector/tunneldirector/director/health"
	"github.com/tunneldirector/tunneldirector/director/metrics"
	"github.com/tunneldirector/tunneldirector/director/replication"
	"github.com/tunneldirector/tunneldirector/ipvs"
	"github.com/tunneldirector/tunneldirector/store"
	"github.com/tunneldirector/tunneldirector/store/etcdstore"
)

const defaultConfig = "/etc/tunneldirector/config.yaml"

func newRunCmd(g *globals) *cobra.Command {
	var path string
	var prof profileFlags
	cmd := &cobra.Command{
		Use:   "run",
		Short: "Run the director: program the kernel from the table and keep it so",
		Long: `Run the daemon. It loads the table, syncs the kernel (adopting what a previous run
left there, so a restart does not interrupt traffic), applies every table change,
reads the kernel back every verify_interval to repair drift, and serves the API.
SIGHUP reloads the configuration. SIGTERM stops the daemon and leaves the kernel
programmed; 'tunneldirector teardown' removes what the director owns.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			stopProfile, err := prof.start()
			if err != nil {
				return err
			}
			defer stopProfile()
			cfg, err := director.LoadConfig(path)
			if err != nil {
				return err
			}
			var lvl slog.LevelVar
			lvl.Set(cfg.LogLevel)
			log := slog.New(slog.NewTextHandler(g.errOut, &slog.HandlerOptions{Level: &lvl}))
			for _, w := range cfg.Warnings() {
				log.Warn("configuration: " + w)
			}
			if err := director.CheckKernel(cfg, log); err != nil {
				return err
			}
			// The metrics endpoint is bound first: an address that
			// cannot be bound refuses the start, naming the key.
			reg := metrics.NewRegistry()
			var metricsLn net.Listener
			if cfg.Metrics.Listen.IsValid() {
				if metricsLn, err = metrics.Listen(cfg.Metrics.Listen); err != nil {
					return err
				}
				defer metricsLn.Close()
			}
			st, bolt, err := openBackend(cfg, log)
			if err != nil {
				return err
			}
			defer st.Close()
			dp, err := ipvs.New(cfg.Dataplane())
			if err != nil {
				return err
			}
			defer dp.Close()
			log.Info("dataplane ready", "mode", dp.Mode().String())
			if dp.Mode() == ipvs.ModeRouteOnly && cfg.Mode == ipvs.ModeAuto {
				// Only auto falls back silently; a configured route-only is what the operator asked for.
				log.Warn("route-only mode: the kernel has no IPVS, so IKE and NAT-T are forwarded by fwmark policy routes too")
			}
			ct, err := director.NewConntrackSync(cfg, bolt, log, nil)
			if err != nil {
				return err
			}
			repl, err := newReplicator(cfg, bolt, ct, log)
			if err != nil {
				return err
			}
			d, err := director.NewDaemon(director.DaemonOptions{Config: cfg, Store: st, Dataplane: dp, Logger: log,
				Replicator: repl, Conntrack: ct, ReadyFile: cfg.Replication.ReadyFile, Watch: ipvs.FirstPackets(cfg.Dataplane()), Metrics: reg})
			if err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
			defer stop()
			hup := make(chan os.Signal, 1)
			signal.Notify(hup, syscall.SIGHUP)
			go func() {
				for range hup {
					nc, err := director.LoadConfig(path)
					if err == nil {
						err = d.Reload(nc)
					}
					if err != nil {
						log.Error("reload refused; keeping the running configuration", "config", path, "err", err)
						continue
					}
					lvl.Set(nc.LogLevel)
					if nc.Metrics.Listen != cfg.Metrics.Listen {
						log.Warn("metrics.listen changed: the endpoint moves at the next restart", "serving", cfg.Metrics.Listen, "configured", nc.Metrics.Listen)
					}
					log.Info("configuration reloaded", "config", path)
				}
			}()
			token := ""
			if cfg.API.TokenFile != "" {
				b, err := os.ReadFile(cfg.API.TokenFile)
				if err != nil {
					return fmt.Errorf("api.token_file: %w", err)
				}
				token = strings.TrimSpace(string(b))
			}
			errc := make(chan error, 2)
			go func() { errc <- d.ServeAPI(ctx, cfg.API.Socket, cfg.API.TCP, token) }()
			go func() { errc <- d.Run(ctx) }()
			if metricsLn != nil {
				log.Info("metrics endpoint", "listen", metricsLn.Addr().String(), "path", metrics.Path)
				go func() {
					if err := metrics.Serve(ctx, metricsLn, reg); err != nil {
						log.Error("metrics endpoint stopped", "err", err)
					}
				}()
			}
			err = <-errc
			stop()
			if err2 := waitOther(errc); err == nil {
				err = err2
			}
			log.Info("stopped; the kernel stays programmed")
			return err
		},
	}
	cmd.Flags().StringVarP(&path, "config", "c", defaultConfig, "configuration file (YAML)")
	prof.register(cmd)
	return cmd
}

// openBackend opens the configured store: the bbolt file (returned twice:
// the pair's replication needs it as such), or the table shared through
// etcd.
func openBackend(cfg *director.Config, log *slog.Logger) (store.Backend, *store.Store, error) {
	topts := cfg.TableOptions()
	if !etcdstore.IsURL(cfg.Store) {
		st, err := store.Open(store.Options{Path: cfg.Store, Table: topts, Logger: log.With("component", "store")})
		return st, st, err
	}
	loc, err := etcdstore.ParseURL(cfg.Store)
	if err != nil {
		return nil, nil, err
	}
	tlsCfg, err := cfg.Etcd.TLS()
	if err != nil {
		return nil, nil, fmt.Errorf("etcd: %w", err)
	}
	st, err := etcdstore.Open(etcdstore.Options{Location: loc, TLS: tlsCfg, Table: topts, Cache: cfg.Etcd.Cache,
		Name: cfg.Etcd.Name, ElectionTTL: cfg.Etcd.ElectionTTL, Logger: log.With("component", "etcd")})
	if err != nil {
		return nil, nil, err
	}
	log.Info("table shared through etcd", "store", loc.String(), "revision", st.Revision(), "tunnels", st.Table().Len())
	return st, nil, nil
}

// newReplicator wires replication over the sync link (with the conntrack
// stream when ct is not nil), or returns nil when the director runs alone.
func newReplicator(cfg *director.Config, st *store.Store, ct *ctsync.Syncer, log *slog.Logger) (*replication.Replicator, error) {
	rc := cfg.Replication
	if !rc.Enabled() {
		return nil, nil
	}
	key, err := os.ReadFile(rc.KeyFile)
	if err != nil {
		return nil, fmt.Errorf("replication.key_file: %w", err)
	}
	link, err := replication.ListenUDP(replication.UDPConfig{
		Local:     rc.Local,
		Peer:      rc.Peer,
		Group:     rc.Multicast,
		Interface: rc.Interface,
		MTU:       rc.MTU,
	})
	if err != nil {
		return nil, fmt.Errorf("replication link %s: %w", rc.Local, err)
	}
	rcfg := replication.Config{
		ID: rc.ID, Key: []byte(strings.TrimSpace(string(key))), Store: st, Transport: link,
		MTU: rc.MTU, StatePath: rc.StatePath,
		Logger: log.With("component", "replication"),
	}
	if ct != nil {
		rcfg.CT, rcfg.CTRate = ct, rc.Conntrack.Rate
	}
	r, err := replication.New(rcfg)
	if err != nil {
		return nil, err
	}
	if ct != nil {
		ct.Attach(r)
	}
	if rc.InitialRole != "" {
		role, err := replication.ParseRole(rc.InitialRole)
		if err != nil {
			return nil, err
		}
		r.SetRole(role)
		if ct != nil {
			ct.SetRole(context.Background(), role)
		}
	}
	return r, nil
}

func waitOther(errc chan error) error {
	select {
	case err := <-errc:
		return err
	case <-time.After(5 * time.Second):
		return errors.New("shutdown timed out")
	}
}

func newConfigCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "config", Short: "Check a configuration file"}
	var kernel bool
	check := &cobra.Command{
		Use:   "check FILE",
		Short: "Validate a configuration file and explain every error with its key path",
		Args:  cobra.ExactArgs(1),
		Long: `Validate a configuration file with exactly the checks 'run' makes: every key,
the VIPs and nodes against each other and, when the store exists and no daemon
holds it, against the stored table. Warnings (secrets others can read, a pair
whose ends are the same, intervals nobody means) are printed but do not fail.`,
		RunE: func(_ *cobra.Command, args []string) error {
			cfg, err := director.LoadConfig(args[0])
			if err != nil {
				return err
			}
			var local []netip.Addr
			if kernel {
				local = director.LocalAddrs()
			}
			stored, selfWarn, err := checkStored(cfg, local)
			if err != nil {
				return err
			}
			for _, w := range append(cfg.Warnings(), selfWarn...) {
				fmt.Fprintln(g.out, "warning:", w)
			}
			if kernel {
				for _, f := range director.KernelFindings(cfg) {
					fmt.Fprintln(g.out, "kernel:", f)
				}
				if err := director.CheckKernel(cfg, nil); err != nil {
					return err
				}
			}
			fmt.Fprintf(g.out, "%s: ok (%d VIPs, %d nodes, mode %s, store %s: %s)\n", args[0], len(cfg.VIPs), len(cfg.Nodes), cfg.Mode, cfg.Store, stored)
			return nil
		},
	}
	check.Flags().BoolVar(&kernel, "kernel", true, "also check this machine's kernel settings as run does (false to check a file for another machine)")
	cmd.AddCommand(check)
	return cmd
}

// checkStored checks the configuration against the stored table as 'run'
// would apply it, when the store exists and is free; it says what it
// checked, and warns about the director's own addresses (the configured
// ones and local) inside a stored protected subnet.
func checkStored(cfg *director.Config, local []netip.Addr) (string, []string, error) {
	if etcdstore.IsURL(cfg.Store) {
		return "shared through etcd, not checked against it", nil, nil
	}
	if _, err := os.Stat(cfg.Store); errors.Is(err, os.ErrNotExist) {
		return "not created yet", nil, nil
	}
	opts := cfg.TableOptions()
	opts.VIPs = nil // the stored ones: CheckAgainst checks the configured
	st, err := store.Open(store.Options{Path: cfg.Store, ReadOnly: true, LockTimeout: 100 * time.Millisecond, Table: opts})
	if err != nil {
		if errors.Is(err, store.ErrLocked) {
			return "in use by a running daemon, not checked against it", nil, nil
		}
		return "", nil, err
	}
	defer st.Close()
	if err := cfg.CheckAgainst(st.Table()); err != nil {
		return "", nil, &director.ConfigError{Path: cfg.Store, Errs: []error{fmt.Errorf("against the stored table: %w", err)}}
	}
	return fmt.Sprintf("checked against its %d tunnels", st.Table().Len()), cfg.SelfInSubnets(st.Table(), local), nil
}

func newStatusCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "status",
		Short: "Show a running daemon's status",
		Args:  cobra.NoArgs,
		RunE: askDaemon(g, "status", " (start one with 'tunneldirector run', or pass --socket)", (*director.Client).Status, func(s *director.Status) error {
			w := g.table()
			fmt.Fprintf(w, "mode\t%s\nrevision\t%d (kernel at %d)\ntunnels\t%d\nnodes\t%d\n", s.Mode, s.Revision, s.KernelRevision, s.Tunnels, s.Nodes)
			fmt.Fprintf(w, "last reconcile\t%s (took %s)\nreconciles\t%d (%d failed)\n", s.LastReconcile.Format(time.RFC3339), s.LastReconcileTook, s.Reconciles, s.ReconcileErrors)
			fmt.Fprintf(w, "last verify\t%s\ndrift repairs\t%d\nlearned peers\t%d\n", s.LastVerify.Format(time.RFC3339), s.DriftRepairs, s.Learned)
			if s.LastError != "" {
				fmt.Fprintf(w, "last error\t%s\n", s.LastError)
			}
			if h := s.Health; h != nil {
				printHealth(w, s, h)
			}
			if u := s.UnknownPeers; u != nil {
				fmt.Fprintf(w, "unknown-peer buckets\t%d %s, %d steps moved %d\n", u.Buckets, bucketShares(u.Nodes), u.Steps, u.Moved)
			}
			if a := s.Agents; a != nil {
				fmt.Fprintf(w, "agents\t%d nodes reporting, %d SAs, %d tunnels, %d misplaced, %d subnets not applied (adopt %s)\n",
					a.Nodes, a.SAs, a.Tunnels, a.Misplaced, a.Unapplied, a.Adopt)
				fmt.Fprintf(w, "agent merges\t%d (%d failed, last took %s): learned %d, subnets applied %d, followed %d, expired %d\n",
					a.Merges, a.MergeErrors, a.LastMergeTook.Round(time.Microsecond), a.Learned, a.SubnetsApplied, a.Followed, a.Expired)
				fmt.Fprintf(w, "agent reports\t%s; refused: %s\n", counts(a.Reports), counts(a.Refused))
			}
			if r := s.Replication; r != nil {
				fmt.Fprintf(w, "role\t%s (director %d, epoch %d)\n", r.Role, r.ID, r.Epoch)
				fmt.Fprintf(w, "peer\tdirector %d, %s, revision %d, alive %v\n", r.Peer.ID, r.Peer.Role, r.Peer.Revision, r.Peer.Alive)
				fmt.Fprintf(w, "sync\t%s, lag %d revisions / %.1fs, tables proven equal: %v, ready: %v\n", r.State, r.LagRevisions, r.LagSeconds, r.TablesEqual, r.Ready)
				if r.Reason != "" {
					fmt.Fprintf(w, "sync reason\t%s\n", r.Reason)
				}
			}
			if e := s.Etcd; e != nil {
				state := "connected"
				if !e.Connected {
					state = "UNREACHABLE: forwarding from the last table (stale), no writes"
				}
				fmt.Fprintf(w, "etcd\t%s since %s\n", state, e.Since.Format(time.RFC3339))
				fmt.Fprintf(w, "elected\t%v (leader: %s)\n", e.Leader, e.LeaderName)
				if e.LastError != "" {
					fmt.Fprintf(w, "etcd error\t%s\n", e.LastError)
				}
			}
			if c := s.Conntrack; c != nil {
				fmt.Fprintf(w, "conntrack\t%d cached (of %d), sent %d, received %d, resent %d, lost %d (events %d, queue %d)\n",
					c.Cached, c.CacheMax, c.Sent, c.Received, c.Stream.Resent, c.Stream.Lost, c.EventsLost, c.QueueFull+c.Stream.QueueDropped)
				if lc := c.LastCommit; lc != nil {
					fmt.Fprintf(w, "conntrack commit\t%s: %d entries, %d failed, took %s\n", lc.At.Format(time.RFC3339), lc.Entries, lc.Failed, lc.Took)
				}
				if c.LastError != "" {
					fmt.Fprintf(w, "conntrack error\t%s\n", c.LastError)
				}
			}
			return w.Flush()
		}),
	}
}

// counts prints a map of counters as "a 3, b 1", sorted by key ("none"
// when empty).
func counts[K ~string, V ~int | ~uint64](m map[K]V) string {
	if len(m) == 0 {
		return "none"
	}
	var parts []string
	for _, k := range slices.Sorted(maps.Keys(m)) {
		parts = append(parts, fmt.Sprintf("%s %d", k, m[k]))
	}
	return strings.Join(parts, ", ")
}

// printHealth writes the health checks' lines of `status`: whether they
// act, why nothing moves (panic, inside link), what they did, and every
// node that is not simply up.
func printHealth(w io.Writer, s *director.Status, h *health.Status) {
	if !h.Enabled {
		fmt.Fprintf(w, "health\toff (health.enabled: false)\n")
		return
	}
	who := "master: decides"
	if !h.Master {
		who = "backup: checks and shows, the master decides"
	}
	link := "inside link up"
	if !h.LinkUp {
		link = "INSIDE LINK DOWN"
	}
	fmt.Fprintf(w, "health\t%s, %s; since start %d nodes taken down, %d brought up, %d tunnels moved\n", who, link, s.HealthDowns, s.HealthUps, s.HealthMoves)
	if l := s.HealthLast; l != nil {
		fmt.Fprintf(w, "health last\t%s %s at %s (%s), %d tunnels moved, committed in %s\n",
			l.Node, l.State, l.Decided.Format(time.RFC3339), l.Reason, l.Moved, l.Took.Round(time.Microsecond))
	}
	if h.Panic != "" {
		fmt.Fprintf(w, "health panic\t%s\n", h.Panic)
	}
	for _, v := range h.Nodes {
		if col := v.Health(); col != "up" {
			fmt.Fprintf(w, "health %s\t%s\n", v.Name, col)
		}
	}
}

// bucketShares lists the buckets per node, by name: "(vpn-01 512, vpn-02 480)".
func bucketShares(nodes map[string]int) string {
	return "(" + counts(nodes) + ")"
}
