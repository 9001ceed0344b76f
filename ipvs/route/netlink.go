package route

import (
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

type kernel struct {
	nl     *netlink.Handle
	inside string
}

// Open returns the rules and routes of network namespace ns (0: the
// caller's) over rtnetlink. With insideIface set, node routes are made
// onlink through it.
func Open(ns netns.NsHandle, insideIface string) (Kernel, error) {
	var h *netlink.Handle
	var err error
	if ns > 0 {
		h, err = netlink.NewHandleAt(ns)
	} else {
		h, err = netlink.NewHandle()
	}
	if err != nil {
		return nil, fmt.Errorf("open rtnetlink handle: %w", err)
	}
	return &kernel{nl: h, inside: insideIface}, nil
}

func (k *kernel) Close() error {
	k.nl.Close()
	return nil
}

func family(v6 bool) int {
	if v6 {
		return unix.AF_INET6
	}
	return unix.AF_INET
}

func (k *kernel) Rules() ([]Rule, error) {
	var out []Rule
	for _, v6 := range []bool{false, true} {
		rs, err := k.nl.RuleListFiltered(family(v6), nil, 0)
		if err != nil {
			return nil, fmt.Errorf("list %s rules: %w", Family(v6), err)
		}
		for _, r := range rs {
			kr := Rule{V6: v6, Prio: r.Priority, Mark: r.Mark, Table: r.Table, Proto: r.Protocol}
			if r.Mask != nil {
				kr.Mask = *r.Mask
			} else if r.Mark != 0 {
				kr.Mask = 0xffffffff
			}
			if r.Priority < 0 {
				kr.Prio = 0
			}
			out = append(out, kr)
		}
	}
	return out, nil
}

func toRule(r Rule) *netlink.Rule {
	nr := netlink.NewRule()
	nr.Family = family(r.V6)
	nr.Priority = r.Prio
	nr.Table = r.Table
	nr.Protocol = r.Proto
	if r.Mark != 0 {
		nr.Mark = r.Mark
		m := r.Mask
		nr.Mask = &m
	}
	return nr
}

func (k *kernel) AddRule(r Rule) error { return k.nl.RuleAdd(toRule(r)) }

func (k *kernel) DelRule(r Rule) error {
	nr := toRule(r)
	nr.Protocol = 0 // not a delete selector in older kernels
	return k.nl.RuleDel(nr)
}

func (k *kernel) Routes() ([]Route, error) {
	var out []Route
	for _, v6 := range []bool{false, true} {
		rs, err := k.nl.RouteListFiltered(family(v6), &netlink.Route{Table: unix.RT_TABLE_UNSPEC}, netlink.RT_FILTER_TABLE)
		if err != nil {
			return nil, fmt.Errorf("list %s routes: %w", Family(v6), err)
		}
		for _, r := range rs {
			kr := Route{V6: v6, Table: r.Table, Proto: uint8(r.Protocol), Dst: DefaultPrefix(v6)}
			if r.Dst != nil {
				a, _ := netip.AddrFromSlice(r.Dst.IP)
				ones, _ := r.Dst.Mask.Size()
				if !v6 {
					a = a.Unmap()
				}
				kr.Dst = netip.PrefixFrom(a, ones)
			}
			if r.Gw != nil {
				a, _ := netip.AddrFromSlice(r.Gw)
				kr.Gw = a.Unmap()
			} else if v, ok := r.Via.(*netlink.Via); ok && v != nil {
				a, _ := netip.AddrFromSlice(v.Addr)
				kr.Gw = a.Unmap()
			}
			out = append(out, kr)
		}
	}
	return out, nil
}

func prefixNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

func (k *kernel) ReplaceRoute(r Route) error {
	nr := &netlink.Route{Family: family(r.V6), Table: r.Table, Protocol: netlink.RouteProtocol(r.Proto), Dst: prefixNet(r.Dst)}
	if r.Gw.Is4() == r.V6 {
		// IPv4 route through an IPv6 next hop (RFC 5549).
		nr.Via = &netlink.Via{AddrFamily: netlink.FAMILY_V6, Addr: r.Gw.AsSlice()}
	} else {
		nr.Gw = r.Gw.AsSlice()
	}
	if k.inside != "" {
		l, err := k.nl.LinkByName(k.inside)
		if err != nil {
			return fmt.Errorf("inside interface %s: %w", k.inside, err)
		}
		nr.LinkIndex = l.Attrs().Index
		nr.Flags = int(netlink.FLAG_ONLINK)
	}
	return k.nl.RouteReplace(nr)
}

func (k *kernel) DelRoute(r Route) error {
	return k.nl.RouteDel(&netlink.Route{Family: family(r.V6), Table: r.Table, Dst: prefixNet(r.Dst)})
}
