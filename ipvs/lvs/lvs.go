// Package lvs programs the director's IPVS fwmark services (one per node and
// family, that node its only destination) through github.com/cloudflare/ipvs,
// and reads IPVS's connection table.
//
// Kernel facts this package is built on (checked in the VM with Debian's
// kernel, see ipvs/vmtest):
//   - IPVS looks a packet up in its connection table by addresses and ports
//     BEFORE it looks at the fwmark. A service without one-packet scheduling
//     keeps an entry per peer and port (300 s for UDP, refreshed by every
//     packet), so a retransmitting IKE peer stays on its old node after its
//     mark changed. With one-packet scheduling (IP_VS_SVC_F_ONEPACKET,
//     `ipvsadm -o`) set when the service is CREATED, UDP entries are never
//     hashed and every datagram is scheduled by its current mark.
//   - Setting one-packet scheduling on an existing service does not clear its
//     entries. Removing the service does, with net.ipv4.vs.expire_nodest_conn=1
//     (kernel 5.9 and later queue a flush of every entry whose destination
//     went); re-adding the same destination before that flush ran revives the
//     old destination from IPVS's trash together with its entries. Replace
//     therefore waits for the entries to go before it adds the new service.
//   - The kernel offers no command to delete single connection entries (the
//     IPVS netlink family has none; /proc/net/ip_vs_conn is read-only).
package lvs

import (
	"bufio"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"

	cfipvs "github.com/cloudflare/ipvs"
	"github.com/cloudflare/ipvs/netmask"
	"github.com/vishvananda/netns"

	"github.com/tunneldirector/tunneldirector/ipvs/internal/nsdo"
)

// Method is how IPVS forwards to a destination.
type Method = cfipvs.ForwardType

// Forwarding methods, as ipvsadm names them (-g, -i, -m).
const (
	DirectRoute = cfipvs.DirectRoute
	Tunnel      = cfipvs.Tunnel
	Masquerade  = cfipvs.Masquerade
)

// Service is one fwmark service with its destinations.
type Service struct {
	V6   bool
	Mark uint32
	// OnePacket is one-packet scheduling: no connection entries for UDP.
	OnePacket bool
	Dests     []Dest
}

// Dest is one destination (real server) of a service.
type Dest struct {
	Addr   netip.Addr
	Method Method
}

// Conn is one entry of IPVS's connection table.
type Conn struct {
	Proto            string // "UDP", "TCP", ...
	Client, Virtual  netip.AddrPort
	Dest             netip.AddrPort
	ExpiresInSeconds int
}

// Kernel is the IPVS of one network namespace.
type Kernel interface {
	// Services lists the fwmark services (address services are not the
	// director's and are left out).
	Services() ([]Service, error)
	// Add creates s with its destinations; a failed destination leaves no
	// service behind.
	Add(s Service) error
	// Remove deletes the fwmark service of s.V6 and s.Mark.
	Remove(s Service) error
	// Replace removes old, waits (at most DrainTimeout) until no
	// connection entry points at old's destinations any more, then adds
	// new: the way to drop a service's connection entries.
	Replace(old, new Service) error
	// Conns reads the connection table.
	Conns() ([]Conn, error)
	Close() error
}

// ErrNoIPVS says the kernel has no IPVS.
var ErrNoIPVS = errors.New("the kernel has no IPVS generic netlink family (load the ip_vs module)")

// DrainTimeout bounds Replace's wait for connection entries to go.
const DrainTimeout = 2 * time.Second

// ExpireNodestSysctl is the setting every service removal relies on: with
// it, entries whose destination went are expired (and the packet that hits
// one is scheduled again) instead of black-holing their peer for up to the
// entry's timeout.
const ExpireNodestSysctl = "net/ipv4/vs/expire_nodest_conn"

type kernel struct {
	// ns is where the connection table is read: the namespace Open was
	// given or called in.
	ns    netns.NsHandle
	ownNS bool
	c     cfipvs.Client
}

// Open probes IPVS in namespace ns (0: the caller's) with Info and returns
// ErrNoIPVS when the kernel has none. It sets ExpireNodestSysctl to 1 in
// that namespace (the director owns IPVS there) and reports whether it had
// to.
func Open(ns netns.NsHandle) (Kernel, bool, error) {
	k := &kernel{ns: ns}
	changed := false
	err := nsdo.Do(ns, func() error {
		c, err := cfipvs.New()
		if err != nil {
			return fmt.Errorf("%w: %v", ErrNoIPVS, err)
		}
		if _, err := c.Info(); err != nil {
			closeClient(c)
			return fmt.Errorf("%w: info: %v", ErrNoIPVS, err)
		}
		k.c = c
		if ns <= 0 {
			h, err := netns.Get()
			if err != nil {
				return fmt.Errorf("get current network namespace: %w", err)
			}
			k.ns, k.ownNS = h, true
		}
		p := "/proc/sys/" + ExpireNodestSysctl
		b, err := os.ReadFile(p)
		if err != nil {
			return fmt.Errorf("read %s: %w", p, err)
		}
		if strings.TrimSpace(string(b)) != "1" {
			if err := os.WriteFile(p, []byte("1"), 0o644); err != nil {
				return fmt.Errorf("set %s=1: %w", strings.ReplaceAll(ExpireNodestSysctl, "/", "."), err)
			}
			changed = true
		}
		return nil
	})
	if err != nil {
		k.Close()
		return nil, false, err
	}
	return k, changed, nil
}

func closeClient(c cfipvs.Client) {
	if cl, ok := c.(interface{ Close() error }); ok {
		cl.Close()
	}
}

func (k *kernel) Close() error {
	if k.c != nil {
		closeClient(k.c)
	}
	if k.ownNS {
		return k.ns.Close()
	}
	return nil
}

func family(v6 bool) cfipvs.AddressFamily {
	if v6 {
		return cfipvs.INET6
	}
	return cfipvs.INET
}

func service(v6 bool, mark uint32, onePacket bool) cfipvs.Service {
	s := cfipvs.Service{FWMark: mark, Family: family(v6), Scheduler: "rr", Netmask: netmask.MaskFrom(32, 32)}
	if v6 {
		s.Netmask = netmask.MaskFrom(128, 128)
	}
	if onePacket {
		s.Flags = cfipvs.ServiceOnePacket
	}
	return s
}

func (k *kernel) Services() ([]Service, error) {
	svcs, err := k.c.Services()
	if errors.Is(err, os.ErrNotExist) {
		// cloudflare/ipvs answers an empty table with ErrNotExist.
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list IPVS services: %w", err)
	}
	var out []Service
	for _, s := range svcs {
		if s.FWMark == 0 {
			continue
		}
		ks := Service{V6: s.Family == cfipvs.INET6, Mark: s.FWMark, OnePacket: s.Flags&cfipvs.ServiceOnePacket != 0}
		dsts, err := k.c.Destinations(s.Service)
		if errors.Is(err, os.ErrNotExist) {
			err = nil // a service without destinations, likewise
		}
		if err != nil {
			return nil, fmt.Errorf("list destinations of fwmark service %#x: %w", s.FWMark, err)
		}
		for _, d := range dsts {
			ks.Dests = append(ks.Dests, Dest{Addr: d.Address.Unmap(), Method: d.FwdMethod})
		}
		out = append(out, ks)
	}
	return out, nil
}

func (k *kernel) Add(s Service) error {
	svc := service(s.V6, s.Mark, s.OnePacket)
	if err := k.c.CreateService(svc); err != nil {
		return fmt.Errorf("create fwmark service %#x: %w", s.Mark, err)
	}
	for _, d := range s.Dests {
		dst := cfipvs.Destination{Address: d.Addr, FwdMethod: d.Method, Weight: 1, Family: family(d.Addr.Is6())}
		if err := k.c.CreateDestination(svc, dst); err != nil {
			// Leave no half-made service behind.
			_ = k.c.RemoveService(svc)
			return fmt.Errorf("add destination %s (%s) to fwmark service %#x: %w", d.Addr, d.Method, s.Mark, err)
		}
	}
	return nil
}

func (k *kernel) Remove(s Service) error {
	if err := k.c.RemoveService(service(s.V6, s.Mark, false)); err != nil {
		return fmt.Errorf("remove fwmark service %#x: %w", s.Mark, err)
	}
	return nil
}

func (k *kernel) Replace(old, new Service) error {
	if err := k.Remove(old); err != nil {
		return err
	}
	gone := map[netip.Addr]bool{}
	for _, d := range old.Dests {
		gone[d.Addr] = true
	}
	for deadline := time.Now().Add(DrainTimeout); ; time.Sleep(5 * time.Millisecond) {
		conns, err := k.Conns()
		if err != nil {
			return err
		}
		left := 0
		for _, c := range conns {
			if gone[c.Dest.Addr()] {
				left++
			}
		}
		if left == 0 {
			break
		}
		if time.Now().After(deadline) {
			// Entries of another service to the same address, or
			// expire_nodest_conn turned off behind our back: add anyway
			// rather than leave the node without IKE.
			break
		}
	}
	return k.Add(new)
}

func (k *kernel) Conns() ([]Conn, error) {
	var out []Conn
	err := nsdo.Do(k.ns, func() error {
		f, err := os.Open("/proc/thread-self/net/ip_vs_conn")
		if err != nil {
			return err
		}
		defer f.Close()
		out, err = ParseConns(bufio.NewScanner(f))
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("read IPVS connection table: %w", err)
	}
	return out, nil
}

// ParseConns reads the lines of /proc/net/ip_vs_conn.
func ParseConns(sc *bufio.Scanner) ([]Conn, error) {
	var out []Conn
	line := 0
	for sc.Scan() {
		line++
		f := strings.Fields(sc.Text())
		if line == 1 && len(f) > 0 && f[0] == "Pro" {
			continue
		}
		if len(f) < 9 {
			return nil, fmt.Errorf("ip_vs_conn line %d: %d fields, want at least 9", line, len(f))
		}
		var c Conn
		c.Proto = f[0]
		var err error
		for i, dst := range []*netip.AddrPort{&c.Client, &c.Virtual, &c.Dest} {
			if *dst, err = procAddrPort(f[1+2*i], f[2+2*i]); err != nil {
				return nil, fmt.Errorf("ip_vs_conn line %d: %w", line, err)
			}
		}
		if c.ExpiresInSeconds, err = strconv.Atoi(f[8]); err != nil {
			return nil, fmt.Errorf("ip_vs_conn line %d: expires %q: %w", line, f[8], err)
		}
		out = append(out, c)
	}
	return out, sc.Err()
}

// procAddrPort decodes an address as ip_vs_conn prints it (IPv4 as eight
// hex digits, IPv6 in text) and a port in hex.
func procAddrPort(a, p string) (netip.AddrPort, error) {
	port, err := strconv.ParseUint(p, 16, 16)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("port %q: %w", p, err)
	}
	if strings.Contains(a, ":") {
		addr, err := netip.ParseAddr(a)
		if err != nil {
			return netip.AddrPort{}, err
		}
		return netip.AddrPortFrom(addr, uint16(port)), nil
	}
	v, err := strconv.ParseUint(a, 16, 32)
	if err != nil || len(a) != 8 {
		return netip.AddrPort{}, fmt.Errorf("address %q: not 8 hex digits", a)
	}
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)}), uint16(port)), nil
}
