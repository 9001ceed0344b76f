package director

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync/atomic"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/director/ctsync"
	"github.com/tunneldirector/tunneldirector/internal/clock"
	"github.com/tunneldirector/tunneldirector/ipvs/conntrack"
	"github.com/tunneldirector/tunneldirector/store"
)

// tableScope answers the conntrack filter's question "is this the
// director's traffic" from the affinity table: a VIP, an address inside a
// protected subnet, a peer, or a node's address. The node addresses are
// kept as a set rebuilt when the table's revision moves, so an event
// costs map lookups, not a copy of the nodes.
type tableScope struct {
	t     *affinity.Table
	nodes atomic.Pointer[nodeSet]
}

type nodeSet struct {
	rev   uint64
	addrs map[netip.Addr]bool
}

func (s *tableScope) Covers(a netip.Addr) bool {
	if s.t.IsVIP(a) {
		return true
	}
	if _, ok := s.t.SubnetMark(a); ok {
		return true
	}
	if _, ok := s.t.PeerMark(a); ok {
		return true
	}
	ns := s.nodes.Load()
	if rev := s.t.Revision(); ns == nil || ns.rev != rev {
		ns = &nodeSet{rev: rev, addrs: map[netip.Addr]bool{}}
		for _, n := range s.t.Nodes() {
			ns.addrs[n.Addr] = true
			if n.Addr6.IsValid() {
				ns.addrs[n.Addr6] = true
			}
		}
		s.nodes.Store(ns)
	}
	return ns.addrs[a]
}

// NewConntrackSync wires conntrack replication for a daemon: the kernel's
// table in this network namespace, the filter's scope from the store's
// table. It returns nil when the configuration turns it off.
func NewConntrackSync(c *Config, st *store.Store, log *slog.Logger, clk clock.Clock) (*ctsync.Syncer, error) {
	rc := &c.Replication
	if !rc.Enabled() || !rc.Conntrack.Enabled {
		return nil, nil
	}
	k, err := conntrack.Open(0)
	if err != nil {
		return nil, fmt.Errorf("replication.conntrack: %w", err)
	}
	return ctsync.New(ctsync.Options{Config: rc.Conntrack, Table: k, Scope: &tableScope{t: st.Table()}, Clock: clk,
		Logger: log.With("component", "conntrack-sync")}), nil
}

// ownAddresses lists the directors' own addresses, which the conntrack
// filter ignores: this director's interface addresses but the VIPs (a
// master holds them too), and both ends of the sync link.
func ownAddresses(c *Config) []netip.Addr {
	vip := map[netip.Addr]bool{}
	for _, v := range c.VIPs {
		vip[v] = true
	}
	var out []netip.Addr
	if as, err := net.InterfaceAddrs(); err == nil {
		for _, a := range as {
			if n, ok := a.(*net.IPNet); ok {
				if ip, ok := netip.AddrFromSlice(n.IP); ok && !vip[ip.Unmap()] {
					out = append(out, ip.Unmap())
				}
			}
		}
	}
	for _, ap := range []netip.AddrPort{c.Replication.Local, c.Replication.Peer} {
		if ap.IsValid() && !ap.Addr().IsMulticast() {
			out = append(out, ap.Addr())
		}
	}
	return out
}

// errNoConntrack refuses conntrack requests on a director without
// conntrack replication.
var errNoConntrack = fmt.Errorf("%w: conntrack replication is not configured on this director (replication.conntrack)", ErrRefused)

// ConntrackCommit commits the cached flows into the kernel now (`ctl
// conntrack commit`).
func (d *Daemon) ConntrackCommit(ctx context.Context) (*ctsync.CommitReport, error) {
	if d.ct == nil {
		return nil, errNoConntrack
	}
	return d.ct.Commit(ctx), nil
}

// FlushResult is what `ctl conntrack flush` did.
type FlushResult struct {
	Purged       int  `json:"purged"`
	CacheEmptied bool `json:"cache_emptied"`
}

// ConntrackFlush lets the synced entries in the kernel run out (their
// timers shortened), and with cache empties the cache (`ctl conntrack
// flush`).
func (d *Daemon) ConntrackFlush(ctx context.Context, cache bool) (*FlushResult, error) {
	if d.ct == nil {
		return nil, errNoConntrack
	}
	return &FlushResult{Purged: d.ct.Flush(ctx, cache), CacheEmptied: cache}, nil
}

// ConntrackResync asks for a full resync (`ctl conntrack resync`).
func (d *Daemon) ConntrackResync() (*ctsync.Status, error) {
	if d.ct == nil {
		return nil, errNoConntrack
	}
	d.ct.Resync()
	st := d.ct.Status()
	return &st, nil
}

// FlowInfo is a cached flow as the API shows it.
type FlowInfo struct {
	Flow    string `json:"flow"`
	Timeout uint32 `json:"timeout"`
	Mark    uint32 `json:"mark,omitempty"`
}

// ConntrackFlows lists up to limit cached flows (`ctl conntrack show`).
func (d *Daemon) ConntrackFlows(limit int) ([]FlowInfo, error) {
	if d.ct == nil {
		return nil, errNoConntrack
	}
	fs := d.ct.Flows(limit)
	out := make([]FlowInfo, len(fs))
	for i := range fs {
		out[i] = FlowInfo{Flow: fs[i].String(), Timeout: fs[i].Timeout, Mark: fs[i].Mark}
	}
	return out, nil
}
