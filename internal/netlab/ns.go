package netlab

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// NS is one network namespace of a Lab.
type NS struct {
	// Name is the lab-local name, used in errors and logs only: the
	// namespace is not bind-mounted under /run/netns.
	Name string
	h    netns.NsHandle
	nl   *netlink.Handle
	lab  *Lab
}

// Handle returns a netlink handle bound to the namespace; it is closed with
// the lab.
func (n *NS) Handle() *netlink.Handle { return n.nl }

// NsHandle returns the namespace file descriptor handle.
func (n *NS) NsHandle() netns.NsHandle { return n.h }

// Path returns a path that names the namespace while the test runs, for
// nsenter --net=PATH or setns(2) by other tools.
func (n *NS) Path() string { return fmt.Sprintf("/proc/%d/fd/%d", os.Getpid(), int(n.h)) }

// String returns the lab-local name.
func (n *NS) String() string { return n.Name }

// Do runs f on the calling goroutine with its OS thread switched into the
// namespace, and switches back afterwards (also when f panics or calls
// t.FailNow). Sockets created inside f stay in the namespace after Do
// returns, so Do is the way to open sockets there. Do not start goroutines
// inside f and expect them to be in the namespace: they are not.
func (n *NS) Do(f func() error) (err error) {
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("netns %s: get current netns: %w", n.Name, err)
	}
	if err := netns.Set(n.h); err != nil {
		orig.Close()
		runtime.UnlockOSThread()
		return fmt.Errorf("netns %s: enter: %w", n.Name, err)
	}
	defer func() {
		if rerr := netns.Set(orig); rerr != nil {
			// Leave the thread locked: the runtime kills it when the
			// goroutine exits rather than reuse a thread in the wrong netns.
			orig.Close()
			if err == nil {
				err = fmt.Errorf("netns %s: restore original netns: %w", n.Name, rerr)
			}
			return
		}
		orig.Close()
		runtime.UnlockOSThread()
	}()
	return f()
}

// Start starts cmd inside the namespace. The child inherits the network
// namespace of the thread that forks it, so no ip(8) or nsenter is needed.
// Wait for it as usual.
func (n *NS) Start(cmd *exec.Cmd) error {
	err := n.Do(func() error { return cmd.Start() })
	if err != nil {
		return fmt.Errorf("netns %s: start %s: %w", n.Name, cmd.Path, err)
	}
	if n.lab != nil {
		n.lab.track(cmd)
	}
	return nil
}

// Run runs a program inside the namespace and returns its combined output.
func (n *NS) Run(ctx context.Context, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	var out strings.Builder
	cmd.Stdout = &out
	cmd.Stderr = &out
	if err := n.Start(cmd); err != nil {
		return nil, err
	}
	if err := cmd.Wait(); err != nil {
		return []byte(out.String()), fmt.Errorf("netns %s: run %s %s: %w: %s", n.Name, name, strings.Join(args, " "), err, out.String())
	}
	return []byte(out.String()), nil
}

// Sysctl writes a sysctl of the namespace, e.g. "net/ipv4/ip_forward".
func (n *NS) Sysctl(key, value string) error {
	key = strings.ReplaceAll(key, ".", "/")
	p := filepath.Join("/proc/sys", key)
	return n.Do(func() error {
		if err := os.WriteFile(p, []byte(value), 0o644); err != nil {
			return fmt.Errorf("netns %s: sysctl %s=%s: %w", n.Name, key, value, err)
		}
		return nil
	})
}

// Link returns the named link of the namespace.
func (n *NS) Link(name string) (netlink.Link, error) {
	l, err := n.nl.LinkByName(name)
	if err != nil {
		return nil, fmt.Errorf("netns %s: link %s: %w", n.Name, name, err)
	}
	return l, nil
}

// LinkUp sets a link up.
func (n *NS) LinkUp(name string) error {
	l, err := n.Link(name)
	if err != nil {
		return err
	}
	if err := n.nl.LinkSetUp(l); err != nil {
		return fmt.Errorf("netns %s: set %s up: %w", n.Name, name, err)
	}
	return nil
}

// AddDummy creates a dummy link (for example to hold addresses) and sets it
// up. It needs the dummy module: present in the vmlab guest, absent from the
// build machines' kernel (use a veth pair there).
func (n *NS) AddDummy(name string) error {
	if err := n.nl.LinkAdd(&netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Name: name}}); err != nil {
		return fmt.Errorf("netns %s: add dummy %s: %w", n.Name, name, err)
	}
	return n.LinkUp(name)
}

// AddAddr adds an address to a link. IPv6 addresses skip duplicate address
// detection so they are usable at once (DAD would delay a test by ~1 s).
func (n *NS) AddAddr(ifname string, p netip.Prefix) error {
	l, err := n.Link(ifname)
	if err != nil {
		return err
	}
	a := &netlink.Addr{IPNet: prefixToIPNet(p)}
	if p.Addr().Is6() {
		a.Flags = unix.IFA_F_NODAD
	}
	if err := n.nl.AddrAdd(l, a); err != nil {
		return fmt.Errorf("netns %s: add address %s to %s: %w", n.Name, p, ifname, err)
	}
	return nil
}

// Route is a unicast route. Dst must be set (use 0.0.0.0/0 or ::/0 for a
// default route); Via or Dev or both; Table 0 means the main table.
type Route struct {
	Dst   netip.Prefix
	Via   netip.Addr
	Dev   string
	Table int
	// Src, when valid, is the preferred source address.
	Src netip.Addr
}

// AddRoute adds a route.
func (n *NS) AddRoute(r Route) error { return n.routeOp(r, "add", n.nl.RouteAdd) }

// ReplaceRoute adds a route or replaces the one to the same destination:
// a test moves a host's default gateway with it (a VIP takeover).
func (n *NS) ReplaceRoute(r Route) error { return n.routeOp(r, "replace", n.nl.RouteReplace) }

// routeOp builds r and hands it to op (verb names op in the error).
func (n *NS) routeOp(r Route, verb string, op func(*netlink.Route) error) error {
	nr, err := n.route(r)
	if err != nil {
		return err
	}
	if err := op(nr); err != nil {
		return fmt.Errorf("netns %s: %s route %s via %v dev %q table %d: %w", n.Name, verb, r.Dst, r.Via, r.Dev, r.Table, err)
	}
	return nil
}

func (n *NS) route(r Route) (*netlink.Route, error) {
	nr := &netlink.Route{Dst: prefixToIPNet(r.Dst), Table: r.Table}
	if r.Via.IsValid() {
		nr.Gw = r.Via.AsSlice()
	}
	if r.Src.IsValid() {
		nr.Src = r.Src.AsSlice()
	}
	if r.Dev != "" {
		l, err := n.Link(r.Dev)
		if err != nil {
			return nil, err
		}
		nr.LinkIndex = l.Attrs().Index
	}
	return nr, nil
}

// Rule is a policy routing rule "fwmark Mark lookup Table" at Priority.
type Rule struct {
	IPv6     bool
	Priority int
	Mark     uint32
	Table    int
}

// AddRule adds a fwmark policy routing rule.
func (n *NS) AddRule(r Rule) error {
	nr := netlink.NewRule()
	nr.Family = unix.AF_INET
	if r.IPv6 {
		nr.Family = unix.AF_INET6
	}
	nr.Priority = r.Priority
	nr.Mark = r.Mark
	mask := uint32(0xffffffff)
	nr.Mask = &mask
	nr.Table = r.Table
	if err := n.nl.RuleAdd(nr); err != nil {
		return fmt.Errorf("netns %s: add rule pref %d fwmark %#x lookup %d (ipv6=%v): %w", n.Name, r.Priority, r.Mark, r.Table, r.IPv6, err)
	}
	return nil
}

// MoveLocalRule moves the "lookup local" rule of both families from
// preference 0 to pref, so that rules with a smaller preference (fwmark
// steering) are consulted before local delivery. This is what a director
// needs when the VIP is also a local address on it (keepalived puts it there).
func (n *NS) MoveLocalRule(pref int) error {
	for _, fam := range []int{unix.AF_INET, unix.AF_INET6} {
		add := netlink.NewRule()
		add.Family = fam
		add.Priority = pref
		add.Table = unix.RT_TABLE_LOCAL
		if err := n.nl.RuleAdd(add); err != nil {
			return fmt.Errorf("netns %s: add local rule at pref %d (family %d): %w", n.Name, pref, fam, err)
		}
		del := netlink.NewRule()
		del.Family = fam
		del.Priority = 0
		del.Table = unix.RT_TABLE_LOCAL
		if err := n.nl.RuleDel(del); err != nil {
			return fmt.Errorf("netns %s: delete local rule at pref 0 (family %d): %w", n.Name, fam, err)
		}
	}
	return nil
}

// EnableForwarding turns on IPv4 and IPv6 forwarding in the namespace.
func (n *NS) EnableForwarding() error {
	if err := n.Sysctl("net/ipv4/ip_forward", "1"); err != nil {
		return err
	}
	return n.Sysctl("net/ipv6/conf/all/forwarding", "1")
}

func prefixToIPNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}
