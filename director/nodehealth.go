package director

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"time"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/director/health"
	"github.com/tunneldirector/tunneldirector/store"
)

// The daemon's side of the node health checks (package director/health):
// it feeds the Monitor the table's nodes and the pair role, and commits
// the master's decisions as `node down` / `node up` would.

// newHealth wires the health monitor: its checks run from the inside
// interface's own (non-VIP) addresses, and its decisions come back to
// d.Apply. Run starts it.
func (d *Daemon) newHealth(c *Config) *health.Monitor {
	o := health.Options{Config: c.Health, Sink: d, Log: d.log.With("component", "health"), Clock: d.clk, Interface: c.Interfaces.Inside}
	if c.Interfaces.Inside != "" {
		var err error
		o.Source4, o.Source6, err = insideSources(c.Interfaces.Inside, c.VIPs)
		if err != nil {
			d.log.Warn("health: checks leave from the address the kernel chooses", "err", err)
		}
	}
	return health.New(o)
}

// insideSources returns the first IPv4 and the first global IPv6 address of
// the interface that is not a VIP: a probe sent from a VIP would be
// answered to whichever director holds the VIP.
func insideSources(name string, vips []netip.Addr) (v4, v6 netip.Addr, err error) {
	ifi, err := net.InterfaceByName(name)
	if err != nil {
		return v4, v6, fmt.Errorf("inside interface %s: %w", name, err)
	}
	addrs, err := ifi.Addrs()
	if err != nil {
		return v4, v6, fmt.Errorf("inside interface %s: addresses: %w", name, err)
	}
	for _, a := range addrs {
		p, err := netip.ParsePrefix(a.String())
		if err != nil {
			continue
		}
		ip := p.Addr()
		switch {
		case slices.Contains(vips, ip):
		case ip.Is4() && !v4.IsValid():
			v4 = ip
		case ip.Is6() && ip.IsGlobalUnicast() && !v6.IsValid():
			v6 = ip
		}
	}
	if !v4.IsValid() && !v6.IsValid() {
		return v4, v6, fmt.Errorf("inside interface %s has no address but VIPs", name)
	}
	return v4, v6, nil
}

// decidesHealth reports whether this director's health checks act: the
// pair's master, or the elected director of a table shared through etcd,
// so that N directors do not race to take the same node down. The others
// check and show.
func (d *Daemon) decidesHealth() bool {
	if d.writable() != nil {
		return false
	}
	return d.shared == nil || d.shared.IsLeader()
}

// runHealth runs the monitor and keeps it fed with the table's nodes until
// ctx ends.
func (d *Daemon) runHealth(ctx context.Context) {
	d.health.SetRole(d.decidesHealth())
	go func() {
		if err := d.health.Run(ctx); err != nil && ctx.Err() == nil {
			// Without the link watch the checks could not tell a
			// dead farm from a dead inside link: decide nothing.
			d.log.Error("health checks stopped: nodes are no longer taken down automatically", "err", err)
		}
	}()
	go d.followNodes(ctx)
}

// followNodes hands the monitor the table's nodes and health records at
// start and after every commit that changed them: the operator's, the
// monitor's own decisions, and on a backup the master's, by replication.
// It follows the change log through its own cursor and compares the node
// list, so that tunnel changes (most commits) cost a comparison of at most
// a few thousand nodes and decode nothing.
func (d *Daemon) followNodes(ctx context.Context) {
	var last []affinity.Node
	var cur store.Cursor
	defer func() {
		if cur != nil {
			cur.Close()
		}
	}()
	for {
		if cur == nil {
			var err error
			if cur, err = d.st.Changes(d.st.Revision()); err != nil {
				d.log.Error("health: follow the change log", "err", err)
				select {
				case <-ctx.Done():
					return
				case <-time.After(time.Second):
				}
				continue
			}
		}
		// The revision first: the nodes read after it are at least
		// that new, and the monitor ignores an older snapshot only.
		t := d.st.Table()
		rev := t.Revision()
		nodes := t.Nodes()
		if !slices.EqualFunc(nodes, last, func(a, b affinity.Node) bool { return a.Equal(&b) }) {
			last = nodes
			d.health.SetNodes(rev, healthNodes(nodes))
		}
		select {
		case <-ctx.Done():
			return
		case <-cur.Notify():
		}
		for {
			_, ok, err := cur.Next()
			if err != nil {
				// Fell behind the log: the table is read whole anyway.
				cur.Close()
				cur = nil
				break
			}
			if !ok {
				break
			}
		}
	}
}

func healthNodes(nodes []affinity.Node) []health.Node {
	out := make([]health.Node, len(nodes))
	for i, n := range nodes {
		out[i] = health.Node{Name: n.Name, Addr: n.Addr, State: n.State, Record: n.Health}
	}
	return out
}

// Apply commits a decision of the health checks (health.Sink): a down
// exactly as `node down` (the node's tunnels, and only those, move to the
// scheduler's choice), an up as `node up` (nothing moves back), in one
// store transaction, with the checks' reason in every change and the
// health record stored with the node. It refuses on a director that is
// not the master (the backup takes the master's decisions by
// replication), and when the node is no longer in the state the checks
// saw (the operator changed it meanwhile: operator states win); the
// monitor then decides again on the table as it is.
func (d *Daemon) Apply(dec health.Decision) error {
	op := fmt.Sprintf("health: node %s %s", dec.Node, dec.State)
	if err := d.writable(); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	if !d.decidesHealth() {
		return fmt.Errorf("%s: %w: another director of the shared table is elected to decide", op, ErrNotMaster)
	}
	rec := dec.Record.Clip()
	why := affinity.NodeHealth{Reason: dec.Reason}.Clip().Reason
	start := d.clk.Now()
	var plan *affinity.Plan
	a, err := d.st.Do(func(t *affinity.Table) ([]affinity.Change, error) {
		cur, ok := t.Node(dec.Node)
		if !ok {
			return nil, fmt.Errorf("%s: %w", op, affinity.ErrNotFound)
		}
		switch {
		case dec.State == affinity.NodeDown && cur.State != affinity.NodeActive:
			return nil, fmt.Errorf("%s: %w: the node is %s now", op, errStale, cur.State)
		case dec.State == affinity.NodeActive && (cur.State != affinity.NodeDown || !cur.Health.Down):
			return nil, fmt.Errorf("%s: %w: the node is %s and not down by health", op, errStale, cur.State)
		case dec.State != affinity.NodeDown && dec.State != affinity.NodeActive:
			return nil, fmt.Errorf("%s: health decides down or active only", op)
		}
		p, err := t.PlanHealthState(dec.Node, dec.State, rec, why)
		if err != nil {
			return nil, err
		}
		plan = p
		return p.Batch(), nil
	})
	if err != nil {
		return err
	}
	took := d.clk.Since(start)
	last := &HealthTransition{Node: dec.Node, State: dec.State, Reason: dec.Reason, Decided: dec.At,
		Committed: start.Add(took), Took: took, Moved: len(plan.Moves), Unplaced: len(plan.Unplaced), Revision: a.Revision}
	d.statMu.Lock()
	if dec.State == affinity.NodeDown {
		d.stat.HealthDowns++
		d.stat.HealthMoves += len(plan.Moves)
	} else {
		d.stat.HealthUps++
	}
	d.stat.HealthLast = last
	d.statMu.Unlock()
	if dec.State == affinity.NodeDown {
		d.log.Warn("health: node taken down, its tunnels moved", "node", dec.Node, "reason", dec.Reason,
			"moved", len(plan.Moves), "unplaced", len(plan.Unplaced), "revision", a.Revision, "took", took)
		if u := plan.Unplaced; len(u) > 0 {
			d.log.Error("health: tunnels of a dead node could not be placed: they stay dark until a node can take them (rebalance)",
				"node", dec.Node, "unplaced", len(u), "example", u[0].Tunnel, "why", u[0].Reason)
		}
	} else {
		d.log.Info("health: node up again; nothing moves back (rebalance moves tunnels to it)", "node", dec.Node, "reason", dec.Reason, "revision", a.Revision)
	}
	return nil
}

// HealthTransition is a node state change the health checks committed.
type HealthTransition struct {
	Node   string             `json:"node"`
	State  affinity.NodeState `json:"state"`
	Reason string             `json:"reason"`
	// Decided is the end of the round that decided it; Committed the end
	// of its store transaction, which Took.
	Decided   time.Time     `json:"decided"`
	Committed time.Time     `json:"committed"`
	Took      time.Duration `json:"took_ns"`
	// Moved and Unplaced count the tunnels a down moved and could not
	// place.
	Moved    int    `json:"moved"`
	Unplaced int    `json:"unplaced,omitempty"`
	Revision uint64 `json:"revision"`
}

// errStale: the node changed since the checks saw it.
var errStale = errors.New("the table changed since the checks saw the node")

// HealthStatus is the health checks' view of the farm.
func (d *Daemon) HealthStatus() health.Status { return d.health.Status() }
