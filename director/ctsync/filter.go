package ctsync

import (
	"net/netip"
	"sync/atomic"

	"github.com/tunneldirector/tunneldirector/ipvs/conntrack"
)

// Scope says which addresses the director serves: its VIPs, the
// protected subnets of its tunnels and its nodes. The daemon answers from
// the affinity table, so the filter follows every table change.
type Scope interface {
	Covers(a netip.Addr) bool
}

// ScopeFunc adapts a function to Scope.
type ScopeFunc func(netip.Addr) bool

// Covers calls f.
func (f ScopeFunc) Covers(a netip.Addr) bool { return f(a) }

// Filter decides which flows are synced, as conntrackd's filters do:
//
//   - a flow with an address in Ignore, or one of the directors' own
//     addresses (IgnoreTrafficFor), never;
//   - a flow of a protocol in IgnoreProtocols, never;
//   - otherwise a flow with an address the Scope covers (a VIP, a
//     protected subnet, a node) or one in Include;
//   - a TCP flow only in one of TCPStates: until then it is held back
//     (its later update, in an accepted state, carries it).
//
// Destroys pass the address and protocol rules only: a backup ignores a
// destroy of a flow it never got.
type Filter struct {
	scope   Scope
	own     atomic.Pointer[[]netip.Prefix]
	ignore  []netip.Prefix
	include []netip.Prefix
	protos  [256]bool
	states  [256]bool
}

// NewFilter builds a filter from the configuration and the scope.
func NewFilter(c *Config, scope Scope) *Filter {
	f := &Filter{scope: scope, ignore: c.Ignore, include: c.Include}
	for _, p := range c.IgnoreProtocols {
		f.protos[p] = true
	}
	for _, s := range c.TCPStates {
		f.states[s] = true
	}
	f.own.Store(&[]netip.Prefix{})
	return f
}

// SetOwn sets the directors' own addresses (both directors', but for the
// VIPs): flows to or from them are the directors' own traffic (the sync
// link, SSH, the API) and are never synced.
func (f *Filter) SetOwn(addrs []netip.Addr) {
	ps := make([]netip.Prefix, 0, len(addrs))
	for _, a := range addrs {
		ps = append(ps, netip.PrefixFrom(a.Unmap(), a.Unmap().BitLen()))
	}
	f.own.Store(&ps)
}

func inAny(ps []netip.Prefix, a netip.Addr) bool {
	for _, p := range ps {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// addrs lists a flow's distinct addresses: both tuples' (NAT makes the
// reply's differ).
func addrs(fl *conntrack.Flow, out *[4]netip.Addr) []netip.Addr {
	a := out[:0]
	a = append(a, fl.Orig.SrcAddr(), fl.Orig.DstAddr())
	if fl.NAT() {
		a = append(a, fl.Reply.SrcAddr(), fl.Reply.DstAddr())
	}
	return a
}

// Addresses reports whether the address and protocol rules let a flow
// through (the rules destroys are held to).
func (f *Filter) Addresses(fl *conntrack.Flow) bool {
	if f.protos[fl.Orig.Proto] {
		return false
	}
	var buf [4]netip.Addr
	as := addrs(fl, &buf)
	own := *f.own.Load()
	for _, a := range as {
		if inAny(own, a) || inAny(f.ignore, a) {
			return false
		}
	}
	for _, a := range as {
		if inAny(f.include, a) || f.scope.Covers(a) {
			return true
		}
	}
	return false
}

// State reports whether a flow's state is worth syncing (the TCP states
// rule).
func (f *Filter) State(fl *conntrack.Flow) bool {
	return fl.Orig.Proto != conntrack.ProtoTCP || !fl.TCP.Set || f.states[fl.TCP.State]
}

// Match reports whether a flow is synced now: the address, protocol and
// state rules.
func (f *Filter) Match(fl *conntrack.Flow) bool { return f.State(fl) && f.Addresses(fl) }
