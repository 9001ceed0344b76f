// Package route holds the director's policy routing: per node, a fwmark
// rule `fwmark M/MASK lookup T` and a default route to the node in table T,
// for IPv4 and IPv6; and the kernel's `lookup local` rule moved after the
// fwmark rules, so a VIP the director holds is steered rather than
// delivered locally. Want says what a set of nodes needs (the route for
// node 3 is made there); AddMissing and RemoveStale apply a difference;
// the routes and rules the director owns carry its protocol tag.
package route

import (
	"cmp"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
)

// Rule is a policy routing rule.
type Rule struct {
	V6    bool
	Prio  int
	Mark  uint32
	Mask  uint32
	Table int
	Proto uint8
}

// Route is a route in some table.
type Route struct {
	V6    bool
	Table int
	Dst   netip.Prefix
	Gw    netip.Addr
	Proto uint8
}

// Kernel is the rules and routes of one network namespace.
type Kernel interface {
	Rules() ([]Rule, error)
	AddRule(r Rule) error
	DelRule(r Rule) error
	// Routes returns the routes of every table.
	Routes() ([]Route, error)
	ReplaceRoute(r Route) error
	DelRoute(r Route) error
	Close() error
}

// The kernel's numbers.
const (
	TableLocal  = 255 // the local table
	ProtoKernel = 2   // RTPROT_KERNEL: the local rule's own tag
	MaxMark     = 0x0fff
)

// Config places the director's rules and routes.
type Config struct {
	// TableBase: node m routes through table TableBase+m.
	TableBase int
	// RulePriority is the preference of the fwmark rules;
	// LocalRulePriority, above it, where the local rule moves to.
	RulePriority, LocalRulePriority int
	// MarkBase, MarkMask and NodeBits are the director's mark range:
	// rules match marks with MarkMask; NodeBits are the low bits that
	// name the node.
	MarkBase, MarkMask, NodeBits uint32
	// Protocol tags the director's routes and rules: the tag is how
	// ownership is recognised after a restart.
	Protocol uint8
}

// Node is one node as routing sees it.
type Node struct {
	Mark   uint16
	Fwmark uint32
	// Addr4 and Addr6 are the next hops (either may be invalid: no route
	// of that family).
	Addr4, Addr6 netip.Addr
}

// RouteKey names a node's default route: its table and family.
type RouteKey struct {
	V6    bool
	Table int
}

// RuleKey names a node's fwmark rule.
type RuleKey struct {
	V6    bool
	Mark  uint32
	Table int
}

// State is what the director holds (or should hold) in routing.
type State struct {
	Routes map[RouteKey]netip.Addr
	Rules  map[RuleKey]struct{}
	// Local[0] / Local[1]: the IPv4 / IPv6 local rule sits at
	// LocalRulePriority and not at 0.
	Local [2]bool
}

// NewState returns an empty state.
func NewState() *State {
	return &State{Routes: map[RouteKey]netip.Addr{}, Rules: map[RuleKey]struct{}{}}
}

// Clone returns a deep copy.
func (s *State) Clone() *State {
	c := *s
	c.Routes = maps.Clone(s.Routes)
	c.Rules = maps.Clone(s.Rules)
	return &c
}

// Table is node m's routing table.
func (c Config) Table(m uint16) int { return c.TableBase + int(m) }

// OwnsTable reports whether t is one of the director's tables.
func (c Config) OwnsTable(t int) bool { return t > c.TableBase && t <= c.TableBase+MaxMark }

// inRange reports whether a fwmark/mask pair overlaps the director's range.
func (c Config) inRange(mark, mask uint32) bool {
	common := mask & c.MarkMask &^ c.NodeBits
	return mark&common == c.MarkBase&common && mask&c.NodeBits != 0 && mark&c.NodeBits != 0
}

// Want is the routing the nodes need: for each node and family with an
// address, a default route to it in the node's table and a rule sending
// the node's fwmark there; and the local rule moved.
func (c Config) Want(nodes []Node) *State {
	s := NewState()
	s.Local = [2]bool{true, true}
	for _, n := range nodes {
		for _, a := range []netip.Addr{n.Addr4, n.Addr6} {
			if !a.IsValid() {
				continue
			}
			v6 := a.Is6()
			s.Routes[RouteKey{v6, c.Table(n.Mark)}] = a
			s.Rules[RuleKey{v6, n.Fwmark, c.Table(n.Mark)}] = struct{}{}
		}
	}
	return s
}

// Foreign refuses a configuration whose rule priority, mark range or
// routing tables already hold objects without the director's tag.
func (c Config) Foreign(k Kernel) error {
	rules, err := k.Rules()
	if err != nil {
		return err
	}
	for _, r := range rules {
		if r.Proto == c.Protocol {
			continue
		}
		desc := fmt.Sprintf("rule pref %d fwmark %#x/%#x lookup %d (ipv6=%v, proto %d)", r.Prio, r.Mark, r.Mask, r.Table, r.V6, r.Proto)
		switch {
		case r.Prio == c.RulePriority:
			return fmt.Errorf("rule priority %d is already used by %s, which the director does not own", c.RulePriority, desc)
		case r.Mark != 0 && c.inRange(r.Mark, r.Mask):
			return fmt.Errorf("mark range %#x/%#x is already used by %s, which the director does not own", c.MarkBase, c.MarkMask, desc)
		case c.OwnsTable(r.Table):
			return fmt.Errorf("routing table %d (range %d..%d) is already used by %s, which the director does not own", r.Table, c.TableBase+1, c.TableBase+MaxMark, desc)
		}
	}
	routes, err := k.Routes()
	if err != nil {
		return err
	}
	for _, r := range routes {
		if c.OwnsTable(r.Table) && r.Proto != c.Protocol {
			return fmt.Errorf("routing table %d (range %d..%d) already holds route %s via %v (proto %d), which the director does not own",
				r.Table, c.TableBase+1, c.TableBase+MaxMark, r.Dst, r.Gw, r.Proto)
		}
	}
	return nil
}

// Read returns the director's rules and routes as the kernel holds them.
func (c Config) Read(k Kernel) (*State, error) {
	s := NewState()
	rules, err := k.Rules()
	if err != nil {
		return nil, err
	}
	var localAt0, localOurs [2]bool
	for _, r := range rules {
		f := b2i(r.V6)
		if r.Table == TableLocal && r.Mark == 0 {
			if r.Prio == 0 {
				localAt0[f] = true
			} else if r.Prio == c.LocalRulePriority && r.Proto == c.Protocol {
				localOurs[f] = true
			}
			continue
		}
		if r.Proto == c.Protocol && r.Prio == c.RulePriority && r.Mask == c.MarkMask && c.OwnsTable(r.Table) {
			s.Rules[RuleKey{r.V6, r.Mark, r.Table}] = struct{}{}
		}
	}
	for f := range 2 {
		s.Local[f] = localOurs[f] && !localAt0[f]
	}
	routes, err := k.Routes()
	if err != nil {
		return nil, err
	}
	for _, r := range routes {
		if c.OwnsTable(r.Table) && r.Proto == c.Protocol && r.Dst.Bits() == 0 {
			s.Routes[RouteKey{r.V6, r.Table}] = r.Gw
		}
	}
	return s, nil
}

// Counts says what AddMissing or RemoveStale changed.
type Counts struct{ Added, Changed, Removed int }

// AddMissing adds (or changes) what want has and cur lacks: routes first
// (a rule should only point at a table that routes), then rules, then the
// local rule. An object the kernel refuses (a route to a node the director
// cannot reach) does not stop the others: its error goes into failed and
// cur keeps saying what the kernel really holds.
func (c Config) AddMissing(k Kernel, cur, want *State) (n Counts, failed []error) {
	for _, rk := range slices.SortedFunc(maps.Keys(want.Routes), routeKeyCmp) {
		gw := want.Routes[rk]
		old, ok := cur.Routes[rk]
		if ok && old == gw {
			continue
		}
		r := Route{V6: rk.V6, Table: rk.Table, Dst: DefaultPrefix(rk.V6), Gw: gw, Proto: c.Protocol}
		if err := k.ReplaceRoute(r); err != nil {
			failed = append(failed, fmt.Errorf("replace route %s via %s table %d (node mark %d): %w", r.Dst, gw, rk.Table, rk.Table-c.TableBase, err))
			continue
		}
		if ok {
			n.Changed++
		} else {
			n.Added++
		}
		cur.Routes[rk] = gw
	}
	for _, rk := range slices.SortedFunc(maps.Keys(want.Rules), ruleKeyCmp) {
		if _, ok := cur.Rules[rk]; ok {
			continue
		}
		r := Rule{V6: rk.V6, Prio: c.RulePriority, Mark: rk.Mark, Mask: c.MarkMask, Table: rk.Table, Proto: c.Protocol}
		if err := k.AddRule(r); err != nil {
			failed = append(failed, fmt.Errorf("add rule fwmark %#x/%#x lookup %d (%s): %w", rk.Mark, c.MarkMask, rk.Table, Family(rk.V6), err))
			continue
		}
		n.Added++
		cur.Rules[rk] = struct{}{}
	}
	for f := range 2 {
		if !want.Local[f] || cur.Local[f] {
			continue
		}
		if err := c.moveLocal(k, f == 1); err != nil {
			failed = append(failed, err)
			continue
		}
		n.Changed++
		cur.Local[f] = true
	}
	return n, failed
}

// moveLocal puts the local rule at LocalRulePriority first, then drops the
// one at 0, so local delivery never disappears in between.
func (c Config) moveLocal(k Kernel, v6 bool) error {
	rules, err := k.Rules()
	if err != nil {
		return err
	}
	have, at0 := false, false
	for _, r := range rules {
		if r.V6 != v6 || r.Table != TableLocal || r.Mark != 0 {
			continue
		}
		if r.Prio == c.LocalRulePriority && r.Proto == c.Protocol {
			have = true
		}
		if r.Prio == 0 {
			at0 = true
		}
	}
	if !have {
		if err := k.AddRule(Rule{V6: v6, Prio: c.LocalRulePriority, Table: TableLocal, Proto: c.Protocol}); err != nil {
			return fmt.Errorf("add local rule at pref %d (%s): %w", c.LocalRulePriority, Family(v6), err)
		}
	}
	if at0 {
		if err := k.DelRule(Rule{V6: v6, Prio: 0, Table: TableLocal}); err != nil {
			return fmt.Errorf("delete local rule at pref 0 (%s): %w", Family(v6), err)
		}
	}
	return nil
}

// RemoveStale removes what cur has and want does not: rules before the
// routes they point at.
func (c Config) RemoveStale(k Kernel, cur, want *State) (n Counts, failed []error) {
	for _, rk := range slices.SortedFunc(maps.Keys(cur.Rules), ruleKeyCmp) {
		if _, ok := want.Rules[rk]; ok {
			continue
		}
		r := Rule{V6: rk.V6, Prio: c.RulePriority, Mark: rk.Mark, Mask: c.MarkMask, Table: rk.Table, Proto: c.Protocol}
		if err := k.DelRule(r); err != nil {
			failed = append(failed, fmt.Errorf("delete rule fwmark %#x lookup %d (%s): %w", rk.Mark, rk.Table, Family(rk.V6), err))
			continue
		}
		n.Removed++
		delete(cur.Rules, rk)
	}
	for _, rk := range slices.SortedFunc(maps.Keys(cur.Routes), routeKeyCmp) {
		if _, ok := want.Routes[rk]; ok {
			continue
		}
		r := Route{V6: rk.V6, Table: rk.Table, Dst: DefaultPrefix(rk.V6), Gw: cur.Routes[rk], Proto: c.Protocol}
		if err := k.DelRoute(r); err != nil {
			failed = append(failed, fmt.Errorf("delete route %s table %d: %w", r.Dst, rk.Table, err))
			continue
		}
		n.Removed++
		delete(cur.Routes, rk)
	}
	return n, failed
}

// Teardown removes every rule and route the director owns and puts the
// local rule back at 0.
func (c Config) Teardown(k Kernel) error {
	var errs []error
	rules, err := k.Rules()
	if err != nil {
		errs = append(errs, err)
	}
	var at0, ours [2]bool
	for _, r := range rules {
		f := b2i(r.V6)
		if r.Table == TableLocal && r.Prio == 0 {
			at0[f] = true
		}
		if r.Proto != c.Protocol {
			continue
		}
		if r.Table == TableLocal && r.Prio == c.LocalRulePriority {
			ours[f] = true
			continue
		}
		if r.Prio == c.RulePriority && c.OwnsTable(r.Table) {
			if err := k.DelRule(r); err != nil {
				errs = append(errs, fmt.Errorf("delete rule fwmark %#x lookup %d: %w", r.Mark, r.Table, err))
			}
		}
	}
	for f := range 2 {
		v6 := f == 1
		if !at0[f] {
			if err := k.AddRule(Rule{V6: v6, Prio: 0, Table: TableLocal, Proto: ProtoKernel}); err != nil {
				errs = append(errs, fmt.Errorf("restore local rule at pref 0 (%s): %w", Family(v6), err))
				continue
			}
		}
		if ours[f] {
			if err := k.DelRule(Rule{V6: v6, Prio: c.LocalRulePriority, Table: TableLocal, Proto: c.Protocol}); err != nil {
				errs = append(errs, fmt.Errorf("delete moved local rule at pref %d (%s): %w", c.LocalRulePriority, Family(v6), err))
			}
		}
	}
	routes, err := k.Routes()
	if err != nil {
		errs = append(errs, err)
	}
	for _, r := range routes {
		if c.OwnsTable(r.Table) && r.Proto == c.Protocol {
			if err := k.DelRoute(r); err != nil {
				errs = append(errs, fmt.Errorf("delete route %s table %d: %w", r.Dst, r.Table, err))
			}
		}
	}
	return errors.Join(errs...)
}

// Family names an address family in errors.
func Family(v6 bool) string {
	if v6 {
		return "ipv6"
	}
	return "ipv4"
}

// DefaultPrefix is 0.0.0.0/0 or ::/0.
func DefaultPrefix(v6 bool) netip.Prefix {
	if v6 {
		return netip.PrefixFrom(netip.IPv6Unspecified(), 0)
	}
	return netip.PrefixFrom(netip.IPv4Unspecified(), 0)
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

func routeKeyCmp(a, b RouteKey) int {
	return cmp.Or(cmp.Compare(a.Table, b.Table), b2i(a.V6)-b2i(b.V6))
}

func ruleKeyCmp(a, b RuleKey) int {
	return cmp.Or(cmp.Compare(a.Table, b.Table), b2i(a.V6)-b2i(b.V6))
}
