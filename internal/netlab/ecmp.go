package netlab

import (
	"fmt"
	"net"
	"net/netip"
	"testing"

	"github.com/vishvananda/netlink"
)

// Networks of the ECMP farm (IPv4: the router's multipath hash spreads
// peers by address).
var (
	TransitNet4 = netip.MustParsePrefix("198.19.0.0/24") // router and directors
	CtlNet4     = netip.MustParsePrefix("198.19.1.0/24") // directors and etcd members
)

// Interfaces of the ECMP farm besides those of Topology.
const (
	IfTransit = "tr0"  // router and directors
	IfCtl     = "ctl0" // directors and etcd members
	IfPeer    = "pe0"  // router and peers
)

// ECMPOptions sizes an active-active farm.
type ECMPOptions struct {
	Peers     int // peer namespaces
	Addrs     int // source addresses per peer (so ECMP spreads them)
	Directors int
	Nodes     int
	Etcd      int // namespaces for etcd members
}

// ECMP is a farm of N active directors behind an upstream router whose
// route to the VIP has one next hop per director, as an operator's router
// would have from BGP anycast or static ECMP:
//
//	peers ── sw-peer ── router ══ECMP══ sw-tr ── directors ── sw-in ── nodes (VIP on lo)
//	                                    directors ── sw-tgt ── target (ECMP back over the directors)
//	                                    directors ── sw-ctl ── etcd members
//
// Nodes route back over the directors too (multipath default route).
type ECMP struct {
	Lab       *Lab
	Router    *Host
	Peers     []*Host
	PeerAddrs [][]netip.Addr
	Directors []*Host
	Nodes     []*Host
	Etcd      []*Host
	Target    *Host
	VIP4      netip.Addr
}

// BuildECMP builds the farm in a new lab registered with t.
func BuildECMP(t testing.TB, o ECMPOptions) *ECMP {
	t.Helper()
	l := New(t)
	f, err := l.buildECMP(o)
	if err != nil {
		t.Fatalf("netlab: build ECMP farm: %v", err)
	}
	return f
}

func (l *Lab) buildECMP(o ECMPOptions) (*ECMP, error) {
	if o.Peers*o.Addrs > 200 || o.Directors > 20 || o.Nodes > 50 || o.Etcd > 9 {
		return nil, fmt.Errorf("ECMP farm too large: %+v", o)
	}
	f := &ECMP{Lab: l, VIP4: DefaultVIP4}
	sw := map[string]*Switch{}
	for _, name := range []string{"sw-peer", "sw-tr", "sw-in", "sw-tgt", "sw-ctl"} {
		s, err := l.AddSwitch(name)
		if err != nil {
			return nil, err
		}
		sw[name] = s
	}
	host := func(name string) (*Host, error) {
		n, err := l.AddNS(name)
		if err != nil {
			return nil, err
		}
		return &Host{NS: n, Ifaces: map[string]Iface{}}, nil
	}
	attach := func(h *Host, s string, ifname string, n4 netip.Prefix, i int) error {
		if err := sw[s].Attach(h.NS, ifname); err != nil {
			return err
		}
		a := nth(n4, i)
		h.Ifaces[ifname] = Iface{Name: ifname, Addr4: a}
		return h.AddAddr(ifname, netip.PrefixFrom(a, n4.Bits()))
	}
	var err error
	if f.Router, err = host("router"); err != nil {
		return nil, err
	}
	if err := f.Router.EnableForwarding(); err != nil {
		return nil, err
	}
	if err := attach(f.Router, "sw-peer", IfPeer, OutsideNet4, 1); err != nil {
		return nil, err
	}
	if err := attach(f.Router, "sw-tr", IfTransit, TransitNet4, 1); err != nil {
		return nil, err
	}
	for i := range o.Directors {
		d, err := host(fmt.Sprintf("dir%d", i))
		if err != nil {
			return nil, err
		}
		if err := d.EnableForwarding(); err != nil {
			return nil, err
		}
		for _, a := range []struct {
			sw, ifn string
			net     netip.Prefix
			i       int
		}{{"sw-tr", IfTransit, TransitNet4, 11 + i}, {"sw-in", IfInside, InsideNet4, 1 + i}, {"sw-tgt", IfTarget, TargetNet4, 1 + i}, {"sw-ctl", IfCtl, CtlNet4, 11 + i}} {
			if err := attach(d, a.sw, a.ifn, a.net, a.i); err != nil {
				return nil, err
			}
		}
		if err := d.AddRoute(Route{Dst: netip.MustParsePrefix("0.0.0.0/0"), Via: f.Router.If(IfTransit).Addr4}); err != nil {
			return nil, err
		}
		f.Directors = append(f.Directors, d)
	}
	for i := range o.Peers {
		p, err := host(fmt.Sprintf("peer%d", i))
		if err != nil {
			return nil, err
		}
		var addrs []netip.Addr
		for k := range o.Addrs {
			a := nth(OutsideNet4, 10+i*o.Addrs+k)
			if k == 0 {
				if err := attach(p, "sw-peer", IfPeer, OutsideNet4, 10+i*o.Addrs); err != nil {
					return nil, err
				}
			} else if err := p.AddAddr(IfPeer, netip.PrefixFrom(a, 32)); err != nil {
				return nil, err
			}
			addrs = append(addrs, a)
		}
		if err := p.AddRoute(Route{Dst: netip.MustParsePrefix("0.0.0.0/0"), Via: f.Router.If(IfPeer).Addr4}); err != nil {
			return nil, err
		}
		f.Peers = append(f.Peers, p)
		f.PeerAddrs = append(f.PeerAddrs, addrs)
	}
	for i := range o.Nodes {
		nd, err := host(fmt.Sprintf("node%d", i))
		if err != nil {
			return nil, err
		}
		if err := attach(nd, "sw-in", IfInside, InsideNet4, 11+i); err != nil {
			return nil, err
		}
		if err := nd.AddAddr("lo", netip.PrefixFrom(f.VIP4, 32)); err != nil {
			return nil, err
		}
		f.Nodes = append(f.Nodes, nd)
	}
	if f.Target, err = host("target"); err != nil {
		return nil, err
	}
	if err := attach(f.Target, "sw-tgt", IfTarget, TargetNet4, 100); err != nil {
		return nil, err
	}
	for i := range o.Etcd {
		e, err := host(fmt.Sprintf("etcd%d", i))
		if err != nil {
			return nil, err
		}
		if err := attach(e, "sw-ctl", IfCtl, CtlNet4, 1+i); err != nil {
			return nil, err
		}
		f.Etcd = append(f.Etcd, e)
	}
	all := make([]int, o.Directors)
	for i := range all {
		all[i] = i
	}
	return f, f.RouteOver(all)
}

// RouteOver points every multipath route of the farm at the given
// directors: the router's route to the VIP, the target's and the nodes'
// default routes. Taking a director out is what the routers do when it
// dies (its BGP session or BFD goes down).
func (f *ECMP) RouteOver(dirs []int) error {
	set := func(h *Host, dst netip.Prefix, ifname string) error {
		var hops []*netlink.NexthopInfo
		for _, i := range dirs {
			hops = append(hops, &netlink.NexthopInfo{Gw: f.Directors[i].If(ifname).Addr4.AsSlice()})
		}
		r := &netlink.Route{Dst: &net.IPNet{IP: dst.Addr().AsSlice(), Mask: net.CIDRMask(dst.Bits(), 32)}, MultiPath: hops}
		if err := h.Handle().RouteReplace(r); err != nil {
			return fmt.Errorf("netns %s: route %s over directors %v: %w", h.Name, dst, dirs, err)
		}
		return nil
	}
	if err := set(f.Router, netip.PrefixFrom(f.VIP4, 32), IfTransit); err != nil {
		return err
	}
	if err := set(f.Target, netip.MustParsePrefix("0.0.0.0/0"), IfTarget); err != nil {
		return err
	}
	for _, n := range f.Nodes {
		if err := set(n, netip.MustParsePrefix("0.0.0.0/0"), IfInside); err != nil {
			return err
		}
	}
	return nil
}
