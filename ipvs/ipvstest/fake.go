// Package ipvstest is a recording ipvs.Dataplane for the unit tests of code
// that drives a dataplane (the director's reconcile loop): the kernel itself
// is proven in ipvs's namespace and VM tests.
package ipvstest

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/tunneldirector/tunneldirector/ipvs"
)

// Call is one recorded call on a Fake.
type Call struct {
	Op    string // "Sync", "Update", "Verify", "Read", "Teardown", "Close"
	Sync  *ipvs.Desired
	Delta *ipvs.Delta
}

// Fake is a recording Dataplane for the director's unit tests: it records
// every call, holds the state a real kernel would hold, and can be told to
// fail. It is safe for concurrent use.
type Fake struct {
	mu    sync.Mutex
	mode  ipvs.Mode
	calls []Call
	state *ipvs.Desired
	// Err, when set, is returned (and nothing changes) by the next call
	// that would change state; it is then cleared.
	Err error
	// Partial, when set, is returned by the next Sync, Update or Verify,
	// which otherwise applies as usual (as the real dataplane does when
	// some objects fail); it is then cleared.
	Partial *ipvs.PartialError
	// Drift, when set, is what the next Verify reports as repaired.
	Drift ipvs.Stats
}

// NewFake returns an empty Fake running in mode (ModeAuto counts as
// ModeRouteOnly, as on a kernel without IPVS).
func NewFake(mode ipvs.Mode) *Fake {
	if mode == ipvs.ModeAuto {
		mode = ipvs.ModeRouteOnly
	}
	return &Fake{mode: mode}
}

// Calls returns a copy of the recorded calls.
func (f *Fake) Calls() []Call {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]Call(nil), f.calls...)
}

// State returns a copy of the state the fake kernel holds (nil before the
// first Sync or after Teardown).
func (f *Fake) State() *ipvs.Desired {
	f.mu.Lock()
	defer f.mu.Unlock()
	return cloneDesired(f.state)
}

// Mode implements Dataplane.
func (f *Fake) Mode() ipvs.Mode { return f.mode }

func (f *Fake) record(c Call) error {
	f.calls = append(f.calls, c)
	if f.Err != nil {
		err := f.Err
		f.Err = nil
		return err
	}
	return nil
}

// partial returns and clears Partial.
func (f *Fake) partial() error {
	if f.Partial == nil {
		return nil
	}
	p := f.Partial
	f.Partial = nil
	return p
}

// Sync implements Dataplane; Stats count the peer and subnet differences.
func (f *Fake) Sync(ctx context.Context, d *ipvs.Desired) (ipvs.Stats, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	start := time.Now()
	d = d.WithMaps()
	if err := f.record(Call{Op: "Sync", Sync: cloneDesired(d)}); err != nil {
		return ipvs.Stats{}, err
	}
	if err := ctx.Err(); err != nil {
		return ipvs.Stats{}, err
	}
	if err := checkOwners("sync", d.Nodes, d.Peers, d.Subnets); err != nil {
		return ipvs.Stats{}, err
	}
	var st ipvs.Stats
	old := f.state
	if old == nil {
		old = &ipvs.Desired{}
	}
	countDiff(&st, old.Peers, d.Peers)
	countDiff(&st, old.Subnets, d.Subnets)
	countBuckets(&st, old.Buckets, d.Buckets)
	f.state = cloneDesired(d)
	st.Duration = time.Since(start)
	return st, f.partial()
}

// checkOwners refuses, as the real dataplane does, a peer or subnet whose
// owner mark is not one of nodes' marks.
func checkOwners(op string, nodes []ipvs.Node, peers map[netip.Addr]uint16, subnets map[netip.Prefix]uint16) error {
	known := make(map[uint16]bool, len(nodes))
	for _, n := range nodes {
		known[n.Mark] = true
	}
	for a, m := range peers {
		if !known[m] {
			return fmt.Errorf("%s: peer %s: owner mark %d is not a node", op, a, m)
		}
	}
	for p, m := range subnets {
		if !known[m] {
			return fmt.Errorf("%s: subnet %s: owner mark %d is not a node", op, p, m)
		}
	}
	return nil
}

// countBuckets counts changed buckets (all of them when the count
// changes).
func countBuckets(st *ipvs.Stats, old, new []uint16) {
	if len(old) != len(new) {
		st.Changed += max(len(old), len(new))
		return
	}
	for i := range old {
		if old[i] != new[i] {
			st.Changed++
		}
	}
}

func countDiff[K comparable](st *ipvs.Stats, old, new map[K]uint16) {
	for k, v := range new {
		if ov, ok := old[k]; !ok {
			st.Added++
		} else if ov != v {
			st.Changed++
		}
	}
	for k := range old {
		if _, ok := new[k]; !ok {
			st.Removed++
		}
	}
}

// Update implements Dataplane.
func (f *Fake) Update(ctx context.Context, d *ipvs.Delta) (ipvs.Stats, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.record(Call{Op: "Update", Delta: cloneDelta(d)}); err != nil {
		return ipvs.Stats{}, err
	}
	if f.state == nil {
		return ipvs.Stats{}, errors.New("update: no Sync yet")
	}
	next := cloneDesired(f.state)
	if d.Nodes != nil {
		next.Nodes = append([]ipvs.Node{}, d.Nodes...)
	}
	if err := checkOwners("update", next.Nodes, d.SetPeers, d.SetSubnets); err != nil {
		return ipvs.Stats{}, err
	}
	for _, a := range d.DeletePeers {
		delete(next.Peers, a)
	}
	for _, p := range d.DeleteSubnets {
		delete(next.Subnets, p)
	}
	maps.Copy(next.Peers, d.SetPeers)
	maps.Copy(next.Subnets, d.SetSubnets)
	for i, m := range d.Buckets {
		if i < 0 || i >= len(next.Buckets) {
			return ipvs.Stats{}, fmt.Errorf("update: unknown-peer bucket %d outside the %d of the last sync", i, len(next.Buckets))
		}
		next.Buckets[i] = m
	}
	var st ipvs.Stats
	countDiff(&st, f.state.Peers, next.Peers)
	countDiff(&st, f.state.Subnets, next.Subnets)
	countBuckets(&st, f.state.Buckets, next.Buckets)
	f.state = next
	return st, f.partial()
}

// Verify implements Dataplane: it reports Drift and clears it.
func (f *Fake) Verify(ctx context.Context) (ipvs.Stats, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.record(Call{Op: "Verify"}); err != nil {
		return ipvs.Stats{}, err
	}
	st := f.Drift
	f.Drift = ipvs.Stats{}
	return st, f.partial()
}

// Read implements Dataplane.
func (f *Fake) Read(ctx context.Context) (*ipvs.Desired, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, Call{Op: "Read"})
	if f.state == nil {
		return &ipvs.Desired{Peers: map[netip.Addr]uint16{}, Subnets: map[netip.Prefix]uint16{}}, nil
	}
	return cloneDesired(f.state), nil
}

// Teardown implements Dataplane.
func (f *Fake) Teardown(ctx context.Context) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.record(Call{Op: "Teardown"}); err != nil {
		return err
	}
	f.state = nil
	return nil
}

// Close implements Dataplane.
func (f *Fake) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, Call{Op: "Close"})
	return nil
}

func cloneDesired(d *ipvs.Desired) *ipvs.Desired {
	if d == nil {
		return nil
	}
	c := *d
	c.VIPs = append([]netip.Addr(nil), d.VIPs...)
	c.Nodes = append([]ipvs.Node(nil), d.Nodes...)
	c.Peers = maps.Clone(d.Peers)
	c.Subnets = maps.Clone(d.Subnets)
	c.Buckets = slices.Clone(d.Buckets)
	if c.Peers == nil {
		c.Peers = map[netip.Addr]uint16{}
	}
	if c.Subnets == nil {
		c.Subnets = map[netip.Prefix]uint16{}
	}
	return &c
}

func cloneDelta(d *ipvs.Delta) *ipvs.Delta {
	if d == nil {
		return nil
	}
	c := *d
	c.SetPeers = maps.Clone(d.SetPeers)
	c.SetSubnets = maps.Clone(d.SetSubnets)
	c.DeletePeers = append([]netip.Addr(nil), d.DeletePeers...)
	c.DeleteSubnets = append([]netip.Prefix(nil), d.DeleteSubnets...)
	if d.Nodes != nil {
		c.Nodes = append([]ipvs.Node{}, d.Nodes...)
	}
	c.Buckets = maps.Clone(d.Buckets)
	return &c
}

var _ ipvs.Dataplane = (*Fake)(nil)
