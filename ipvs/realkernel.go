package ipvs

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/google/nftables"
	mdnl "github.com/mdlayher/netlink"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// nsTarget names the network namespace to program: the zero value is the
// current one. Tests pass a namespace handle and its /proc path.
type nsTarget struct {
	fd   netns.NsHandle
	path string
}

func (t nsTarget) set() bool { return t.path != "" }

// realKernel is the kernel seam over netlink.
type realKernel struct {
	cfg  Config
	nl   *netlink.Handle
	nft  *nftables.Conn // reads (dumps)
	tx   *nftTransport
	wr   *nftables.Conn // transactions, through tx
	mode func() Mode
}

// batchBuf is the socket buffer for nftables batches: a full load of
// 200,000 elements is one sendmsg of several MB, which the kernel refuses
// (EMSGSIZE) above the socket's send buffer.
const batchBuf = 256 << 20

func forceBuffers(c *mdnl.Conn) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	err = rc.Control(func(fd uintptr) {
		if e := unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, batchBuf); e != nil {
			serr = fmt.Errorf("SO_SNDBUFFORCE: %w", e)
			return
		}
		if e := unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 32<<20); e != nil {
			serr = fmt.Errorf("SO_RCVBUFFORCE: %w", e)
		}
	})
	if err != nil {
		return err
	}
	return serr
}

func newRealKernel(cfg Config, ns nsTarget) (*realKernel, error) {
	k := &realKernel{cfg: cfg}
	var err error
	if ns.set() {
		k.nl, err = netlink.NewHandleAt(ns.fd)
	} else {
		k.nl, err = netlink.NewHandle()
	}
	if err != nil {
		return nil, fmt.Errorf("open rtnetlink handle: %w", err)
	}
	opts := []nftables.ConnOption{nftables.AsLasting(), nftables.WithSockOptions(forceBuffers)}
	if ns.set() {
		opts = append(opts, nftables.WithNetNSFd(int(ns.fd)))
	}
	k.nft, err = nftables.New(opts...)
	if err != nil {
		k.nl.Close()
		return nil, fmt.Errorf("open nftables connection: %w", err)
	}
	fd := 0
	if ns.set() {
		fd = int(ns.fd)
	}
	if k.tx, err = dialTransport(fd); err != nil {
		k.close()
		return nil, err
	}
	if k.wr, err = k.tx.conn(); err != nil {
		k.close()
		return nil, err
	}
	return k, nil
}

func (k *realKernel) close() error {
	var errs []error
	if k.nft != nil {
		errs = append(errs, k.nft.CloseLasting())
	}
	if k.tx != nil {
		errs = append(errs, k.tx.close())
	}
	if k.nl != nil {
		k.nl.Close()
	}
	return errors.Join(errs...)
}

func (k *realKernel) readNft() (*nftState, error) {
	return readNft(k.nft, k.cfg, func(s *nftables.Set) ([]nftables.SetElement, error) {
		return k.tx.dumpElems(s.Table.Name, s.Name)
	})
}

func (k *realKernel) applyNft(p *nftPlan) error {
	// A fresh connection per transaction: a half-built batch (buildNft
	// failed) is then dropped with it instead of being sent later.
	c, err := k.tx.conn()
	if err != nil {
		return err
	}
	if err := buildNft(c, k.cfg, k.mode(), p); err != nil {
		return err
	}
	return c.Flush()
}

func (k *realKernel) deleteTable() error {
	tables, err := k.nft.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		return err
	}
	for _, t := range tables {
		if t.Name == k.cfg.Table {
			k.wr.DelTable(t)
			return k.wr.Flush()
		}
	}
	return nil
}

func family(v6 bool) int {
	if v6 {
		return unix.AF_INET6
	}
	return unix.AF_INET
}

func (k *realKernel) listRules() ([]kRule, error) {
	var out []kRule
	for _, v6 := range []bool{false, true} {
		rs, err := k.nl.RuleListFiltered(family(v6), nil, 0)
		if err != nil {
			return nil, fmt.Errorf("list %s rules: %w", famName(v6), err)
		}
		for _, r := range rs {
			kr := kRule{v6: v6, prio: r.Priority, mark: r.Mark, table: r.Table, proto: r.Protocol}
			if r.Mask != nil {
				kr.mask = *r.Mask
			} else if r.Mark != 0 {
				kr.mask = 0xffffffff
			}
			if r.Priority < 0 {
				kr.prio = 0
			}
			out = append(out, kr)
		}
	}
	return out, nil
}

func (k *realKernel) toRule(r kRule) *netlink.Rule {
	nr := netlink.NewRule()
	nr.Family = family(r.v6)
	nr.Priority = r.prio
	nr.Table = r.table
	nr.Protocol = r.proto
	if r.mark != 0 {
		nr.Mark = r.mark
		m := r.mask
		nr.Mask = &m
	}
	return nr
}

func (k *realKernel) addRule(r kRule) error { return k.nl.RuleAdd(k.toRule(r)) }

func (k *realKernel) delRule(r kRule) error {
	nr := k.toRule(r)
	nr.Protocol = 0 // not a delete selector in older kernels
	return k.nl.RuleDel(nr)
}

func (k *realKernel) listRoutes() ([]kRoute, error) {
	var out []kRoute
	for _, v6 := range []bool{false, true} {
		rs, err := k.nl.RouteListFiltered(family(v6), &netlink.Route{Table: unix.RT_TABLE_UNSPEC}, netlink.RT_FILTER_TABLE)
		if err != nil {
			return nil, fmt.Errorf("list %s routes: %w", famName(v6), err)
		}
		for _, r := range rs {
			kr := kRoute{v6: v6, table: r.Table, proto: uint8(r.Protocol), dst: defaultPrefix(v6)}
			if r.Dst != nil {
				a, _ := netip.AddrFromSlice(r.Dst.IP)
				ones, _ := r.Dst.Mask.Size()
				if !v6 {
					a = a.Unmap()
				}
				kr.dst = netip.PrefixFrom(a, ones)
			}
			if r.Gw != nil {
				a, _ := netip.AddrFromSlice(r.Gw)
				if a.Is4In6() {
					a = a.Unmap()
				}
				kr.gw = a
			} else if r.Via != nil {
				if v, ok := r.Via.(*netlink.Via); ok {
					a, _ := netip.AddrFromSlice(v.Addr)
					kr.gw = a.Unmap()
				}
			}
			out = append(out, kr)
		}
	}
	return out, nil
}

func (k *realKernel) toRoute(r kRoute) (*netlink.Route, error) {
	nr := &netlink.Route{
		Family:   family(r.v6),
		Table:    r.table,
		Protocol: netlink.RouteProtocol(r.proto),
		Dst:      &net.IPNet{IP: r.dst.Addr().AsSlice(), Mask: net.CIDRMask(r.dst.Bits(), r.dst.Addr().BitLen())},
	}
	if r.gw.Is4() == r.v6 {
		// IPv4 route through an IPv6 next hop (RFC 5549).
		nr.Via = &netlink.Via{AddrFamily: netlink.FAMILY_V6, Addr: r.gw.AsSlice()}
	} else {
		nr.Gw = r.gw.AsSlice()
	}
	if k.cfg.InsideIface != "" {
		l, err := k.nl.LinkByName(k.cfg.InsideIface)
		if err != nil {
			return nil, fmt.Errorf("inside interface %s: %w", k.cfg.InsideIface, err)
		}
		nr.LinkIndex = l.Attrs().Index
		nr.Flags = int(netlink.FLAG_ONLINK)
	}
	return nr, nil
}

func (k *realKernel) replaceRoute(r kRoute) error {
	nr, err := k.toRoute(r)
	if err != nil {
		return err
	}
	return k.nl.RouteReplace(nr)
}

func (k *realKernel) delRoute(r kRoute) error {
	nr := &netlink.Route{Family: family(r.v6), Table: r.table,
		Dst: &net.IPNet{IP: r.dst.Addr().AsSlice(), Mask: net.CIDRMask(r.dst.Bits(), r.dst.Addr().BitLen())}}
	return k.nl.RouteDel(nr)
}
