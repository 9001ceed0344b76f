package netlab

import (
	"errors"
	"fmt"
	"os/exec"
	"sync"
	"testing"

	"github.com/vishvananda/netlink"
)

// Lab is a set of namespaces owned by one test. Close (registered with
// t.Cleanup by New) kills processes started in them and drops the
// namespaces; the kernel then deletes their links, so no state is left.
type Lab struct {
	mu     sync.Mutex
	order  []*NS
	byNam  map[string]*NS
	procs  []*exec.Cmd
	closed bool
}

// New returns an empty lab whose cleanup is registered with t. It stops the
// test through RequireRoot when namespaces cannot be made.
func New(t testing.TB) *Lab {
	t.Helper()
	RequireRoot(t)
	l := NewLab()
	t.Cleanup(func() {
		if err := l.Close(); err != nil {
			t.Errorf("netlab cleanup: %v", err)
		}
	})
	return l
}

// NewLab returns an empty lab without a testing.TB (for benchmarks and
// tools); the caller must Close it.
func NewLab() *Lab { return &Lab{byNam: map[string]*NS{}} }

// AddNS creates a fresh network namespace with lo up.
func (l *Lab) AddNS(name string) (*NS, error) {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil, fmt.Errorf("netns %s: lab is closed", name)
	}
	if _, ok := l.byNam[name]; ok {
		l.mu.Unlock()
		return nil, fmt.Errorf("netns %s: already exists in lab", name)
	}
	l.mu.Unlock()
	h, err := newNetns()
	if err != nil {
		return nil, fmt.Errorf("netns %s: %w", name, err)
	}
	nl, err := netlink.NewHandleAt(h)
	if err != nil {
		h.Close()
		return nil, fmt.Errorf("netns %s: open netlink handle: %w", name, err)
	}
	n := &NS{Name: name, h: h, nl: nl, lab: l}
	l.mu.Lock()
	l.order = append(l.order, n)
	l.byNam[name] = n
	l.mu.Unlock()
	// Duplicate address detection would keep new IPv6 addresses (link-local
	// ones too, which neighbor discovery needs) tentative for a second or
	// more; a lab has no duplicates, so turn it off before links exist.
	for _, k := range []string{"net/ipv6/conf/all/accept_dad", "net/ipv6/conf/default/accept_dad"} {
		if err := n.Sysctl(k, "0"); err != nil {
			return nil, err
		}
	}
	if err := n.LinkUp("lo"); err != nil {
		return nil, err
	}
	return n, nil
}

// NS returns the namespace called name, or nil.
func (l *Lab) NS(name string) *NS {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.byNam[name]
}

// Namespaces returns the lab's namespaces in creation order.
func (l *Lab) Namespaces() []*NS {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]*NS(nil), l.order...)
}

func (l *Lab) track(c *exec.Cmd) {
	l.mu.Lock()
	l.procs = append(l.procs, c)
	l.mu.Unlock()
}

// Close kills the processes started through NS.Start and releases all
// namespaces. It is safe to call more than once.
func (l *Lab) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	l.closed = true
	procs, order := l.procs, l.order
	l.mu.Unlock()
	var errs []error
	for _, c := range procs {
		if c.Process != nil && c.ProcessState == nil {
			_ = c.Process.Kill()
		}
	}
	for i := len(order) - 1; i >= 0; i-- {
		n := order[i]
		n.nl.Close()
		if err := n.h.Close(); err != nil {
			errs = append(errs, fmt.Errorf("netns %s: close: %w", n.Name, err))
		}
	}
	return errors.Join(errs...)
}

// Veth joins two namespaces with a veth pair, aName in a and bName in b,
// and sets both ends up. The pair is created directly in the two
// namespaces (never in the host's).
func (l *Lab) Veth(a *NS, aName string, b *NS, bName string) error {
	v := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: aName},
		PeerName:      bName,
		PeerNamespace: netlink.NsFd(int(b.h)),
	}
	if err := a.nl.LinkAdd(v); err != nil {
		return fmt.Errorf("veth %s/%s <-> %s/%s: create: %w", a.Name, aName, b.Name, bName, err)
	}
	if err := a.LinkUp(aName); err != nil {
		return err
	}
	return b.LinkUp(bName)
}

// Switch is a Linux bridge in a namespace of its own: an Ethernet segment
// that any number of namespaces can be attached to.
type Switch struct {
	NS    *NS
	br    netlink.Link
	ports int
}

// Pair adds namespaces a and b joined by a veth pair with ifname at both
// ends, failing t when the kernel refuses any of it.
func (l *Lab) Pair(t testing.TB, a, b, ifname string) (*NS, *NS) {
	t.Helper()
	na, err := l.AddNS(a)
	if err != nil {
		t.Fatal(err)
	}
	nb, err := l.AddNS(b)
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Veth(na, ifname, nb, ifname); err != nil {
		t.Fatal(err)
	}
	return na, nb
}

// AddSwitch creates a namespace holding one bridge br0 (no STP, no
// multicast snooping: ports forward at once and flood ND/ARP).
func (l *Lab) AddSwitch(name string) (*Switch, error) {
	n, err := l.AddNS(name)
	if err != nil {
		return nil, err
	}
	// IPv6 on the bridge ports would only add link-local chatter.
	if err := n.Sysctl("net/ipv6/conf/default/disable_ipv6", "1"); err != nil {
		return nil, err
	}
	off := false
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "br0"}, MulticastSnooping: &off}
	if err := n.nl.LinkAdd(br); err != nil {
		return nil, fmt.Errorf("switch %s: create bridge br0: %w", name, err)
	}
	if err := n.LinkUp("br0"); err != nil {
		return nil, err
	}
	link, err := n.Link("br0")
	if err != nil {
		return nil, err
	}
	return &Switch{NS: n, br: link}, nil
}

// Attach connects member to the switch through a veth pair whose member end
// is called ifname, and sets it up.
func (s *Switch) Attach(member *NS, ifname string) error {
	s.ports++
	port := fmt.Sprintf("p%d", s.ports)
	v := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: port, MasterIndex: s.br.Attrs().Index},
		PeerName:      ifname,
		PeerNamespace: netlink.NsFd(int(member.h)),
	}
	if err := s.NS.nl.LinkAdd(v); err != nil {
		return fmt.Errorf("switch %s: attach %s/%s: %w", s.NS.Name, member.Name, ifname, err)
	}
	if err := s.NS.LinkUp(port); err != nil {
		return err
	}
	return member.LinkUp(ifname)
}

// ifName resolves an interface index of the namespace to its name.
func (n *NS) ifName(index int) string {
	l, err := n.nl.LinkByIndex(index)
	if err != nil {
		return fmt.Sprintf("if%d", index)
	}
	return l.Attrs().Name
}
