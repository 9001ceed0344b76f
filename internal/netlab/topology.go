package netlab

import (
	"cmp"
	"fmt"
	"net/netip"
	"testing"
)

// Interface names used by BuildTopology.
const (
	IfOutside = "out0"  // peers and directors: the segment the tunnels arrive on
	IfInside  = "in0"   // directors and nodes: the terminator segment
	IfSync    = "sync0" // director to director: the dedicated sync link
	IfTarget  = "tgt0"  // directors and the target host: the protected side
)

// Addressing of BuildTopology. Only documentation and benchmark ranges are
// used, and only inside the lab's own namespaces.
var (
	OutsideNet4 = netip.MustParsePrefix("198.51.100.0/24")
	OutsideNet6 = netip.MustParsePrefix("2001:db8:100::/64")
	InsideNet4  = netip.MustParsePrefix("192.0.2.0/24")
	InsideNet6  = netip.MustParsePrefix("2001:db8:2::/64")
	SyncNet4    = netip.MustParsePrefix("198.18.0.0/24")
	SyncNet6    = netip.MustParsePrefix("2001:db8:5::/64")
	TargetNet4  = netip.MustParsePrefix("198.18.1.0/24")
	TargetNet6  = netip.MustParsePrefix("2001:db8:1::/64")
	DefaultVIP4 = netip.MustParseAddr("203.0.113.1")
	DefaultVIP6 = netip.MustParseAddr("2001:db8:ffff::1")
)

// Iface is one addressed interface of a Host.
type Iface struct {
	Name  string
	Addr4 netip.Addr
	Addr6 netip.Addr
}

// Addr returns the interface address of the family of like (IPv4 or IPv6).
func (i Iface) Addr(v6 bool) netip.Addr {
	if v6 {
		return i.Addr6
	}
	return i.Addr4
}

// Host is a namespace of a Topology with its addressed interfaces.
type Host struct {
	*NS
	Ifaces map[string]Iface
}

// If returns the interface called name; it panics on a name the host lacks
// because that is a bug in the test, not a runtime condition.
func (h *Host) If(name string) Iface {
	i, ok := h.Ifaces[name]
	if !ok {
		panic(fmt.Sprintf("netlab: host %s has no interface %s", h.Name, name))
	}
	return i
}

// TopologyOptions sizes a topology. Zero values give 2 peers, 2 directors
// and 3 nodes.
type TopologyOptions struct {
	Peers     int
	Directors int // 1 or 2
	Nodes     int
	// VIPOnDirectors also puts the VIPs on the directors' lo, as keepalived
	// would on the master. The kernel's local rule then delivers VIP traffic
	// locally unless it is moved behind the steering rules (MoveLocalRule).
	VIPOnDirectors bool
}

// Topology is a tunnel termination cluster in namespaces:
//
//	peers ── sw-out ── directors ── sw-in ── nodes (VIPs on lo)
//	                     │  └─ sync0 ─┘ (director 0 <-> director 1)
//	                   sw-tgt ── target
//
// Peers, nodes and the target route through director 0 (the master).
// Directors forward IPv4 and IPv6 but steer nothing: tests install their
// own nftables marks and policy routes.
type Topology struct {
	Lab       *Lab
	Peers     []*Host
	Directors []*Host
	Nodes     []*Host
	Target    *Host
	VIP4      netip.Addr
	VIP6      netip.Addr
	// The segments, for tests that attach more hosts to them (a NAT in
	// front of a peer, a second target).
	OutsideSwitch, InsideSwitch, TargetSwitch *Switch
}

func nth(p netip.Prefix, i int) netip.Addr {
	a := p.Addr()
	for ; i > 0; i-- {
		a = a.Next()
	}
	return a
}

// BuildTopology builds a topology in a new lab registered with t; it fails
// the test on error (and skips or fails through RequireRoot without root).
func BuildTopology(t testing.TB, o TopologyOptions) *Topology {
	t.Helper()
	l := New(t)
	top, err := l.BuildTopology(o)
	if err != nil {
		t.Fatalf("netlab: build topology: %v", err)
	}
	return top
}

// BuildTopology builds a topology in the lab.
func (l *Lab) BuildTopology(o TopologyOptions) (*Topology, error) {
	o.Peers = cmp.Or(o.Peers, 2)
	o.Directors = cmp.Or(o.Directors, 2)
	o.Nodes = cmp.Or(o.Nodes, 3)
	if o.Directors > 2 {
		return nil, fmt.Errorf("topology: %d directors: at most 2 supported", o.Directors)
	}
	top := &Topology{Lab: l, VIP4: DefaultVIP4, VIP6: DefaultVIP6}
	swOut, err := l.AddSwitch("sw-out")
	if err != nil {
		return nil, err
	}
	swIn, err := l.AddSwitch("sw-in")
	if err != nil {
		return nil, err
	}
	swTgt, err := l.AddSwitch("sw-tgt")
	if err != nil {
		return nil, err
	}
	top.OutsideSwitch, top.InsideSwitch, top.TargetSwitch = swOut, swIn, swTgt
	host := func(name string) (*Host, error) {
		n, err := l.AddNS(name)
		if err != nil {
			return nil, err
		}
		return &Host{NS: n, Ifaces: map[string]Iface{}}, nil
	}
	// attach joins h to sw as ifname with the i-th addresses of the nets.
	attach := func(h *Host, sw *Switch, ifname string, n4, n6 netip.Prefix, i int) error {
		if err := sw.Attach(h.NS, ifname); err != nil {
			return err
		}
		return h.addIface(ifname, n4, n6, i)
	}
	for i := 0; i < o.Directors; i++ {
		d, err := host(fmt.Sprintf("dir%d", i))
		if err != nil {
			return nil, err
		}
		if err := d.EnableForwarding(); err != nil {
			return nil, err
		}
		if err := attach(d, swOut, IfOutside, OutsideNet4, OutsideNet6, 1+i); err != nil {
			return nil, err
		}
		if err := attach(d, swIn, IfInside, InsideNet4, InsideNet6, 1+i); err != nil {
			return nil, err
		}
		if err := attach(d, swTgt, IfTarget, TargetNet4, TargetNet6, 1+i); err != nil {
			return nil, err
		}
		if o.VIPOnDirectors {
			if err := d.addVIPs(top.VIP4, top.VIP6); err != nil {
				return nil, err
			}
		}
		top.Directors = append(top.Directors, d)
	}
	if o.Directors == 2 {
		d0, d1 := top.Directors[0], top.Directors[1]
		if err := l.Veth(d0.NS, IfSync, d1.NS, IfSync); err != nil {
			return nil, err
		}
		for i, d := range []*Host{d0, d1} {
			if err := d.addIface(IfSync, SyncNet4, SyncNet6, 1+i); err != nil {
				return nil, err
			}
		}
	}
	d0 := top.Directors[0]
	defaults := func(h *Host, gw Iface) error {
		for _, r := range []Route{
			{Dst: netip.MustParsePrefix("0.0.0.0/0"), Via: gw.Addr4},
			{Dst: netip.MustParsePrefix("::/0"), Via: gw.Addr6},
		} {
			if err := h.AddRoute(r); err != nil {
				return err
			}
		}
		return nil
	}
	for i := 0; i < o.Peers; i++ {
		p, err := host(fmt.Sprintf("peer%d", i))
		if err != nil {
			return nil, err
		}
		if err := attach(p, swOut, IfOutside, OutsideNet4, OutsideNet6, 101+i); err != nil {
			return nil, err
		}
		if err := defaults(p, d0.If(IfOutside)); err != nil {
			return nil, err
		}
		top.Peers = append(top.Peers, p)
	}
	for i := 0; i < o.Nodes; i++ {
		nd, err := host(fmt.Sprintf("node%d", i))
		if err != nil {
			return nil, err
		}
		if err := attach(nd, swIn, IfInside, InsideNet4, InsideNet6, 11+i); err != nil {
			return nil, err
		}
		if err := nd.addVIPs(top.VIP4, top.VIP6); err != nil {
			return nil, err
		}
		if err := defaults(nd, d0.If(IfInside)); err != nil {
			return nil, err
		}
		top.Nodes = append(top.Nodes, nd)
	}
	tg, err := host("target")
	if err != nil {
		return nil, err
	}
	if err := attach(tg, swTgt, IfTarget, TargetNet4, TargetNet6, 100); err != nil {
		return nil, err
	}
	if err := defaults(tg, d0.If(IfTarget)); err != nil {
		return nil, err
	}
	top.Target = tg
	return top, nil
}

func (h *Host) addIface(ifname string, n4, n6 netip.Prefix, i int) error {
	ifc := Iface{Name: ifname, Addr4: nth(n4, i), Addr6: nth(n6, i)}
	if err := h.AddAddr(ifname, netip.PrefixFrom(ifc.Addr4, n4.Bits())); err != nil {
		return err
	}
	if err := h.AddAddr(ifname, netip.PrefixFrom(ifc.Addr6, n6.Bits())); err != nil {
		return err
	}
	h.Ifaces[ifname] = ifc
	return nil
}

func (h *Host) addVIPs(v4, v6 netip.Addr) error {
	if err := h.AddAddr("lo", netip.PrefixFrom(v4, 32)); err != nil {
		return err
	}
	return h.AddAddr("lo", netip.PrefixFrom(v6, 128))
}
