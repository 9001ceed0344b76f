package ipvs

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"sync"
	"time"
)

// Call is one recorded call on a Fake.
type Call struct {
	Op    string // "Sync", "Update", "Verify", "Read", "Teardown", "Close"
	Sync  *Desired
	Delta *Delta
}

// Fake is a recording Dataplane for the director's unit tests: it records
// every call, holds the state a real kernel would hold, and can be told to
// fail. It is safe for concurrent use.
type Fake struct {
	mu    sync.Mutex
	mode  Mode
	calls []Call
	state *Desired
	// Err, when set, is returned (and nothing changes) by the next call
	// that would change state; it is then cleared.
	Err error
	// Drift, when set, is what the next Verify reports as repaired.
	Drift Stats
}

// NewFake returns an empty Fake running in mode (ModeAuto counts as
// ModeRouteOnly, as on a kernel without IPVS).
func NewFake(mode Mode) *Fake {
	if mode == ModeAuto {
		mode = ModeRouteOnly
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
func (f *Fake) State() *Desired {
	f.mu.Lock()
	defer f.mu.Unlock()
	return cloneDesired(f.state)
}

// Mode implements Dataplane.
func (f *Fake) Mode() Mode { return f.mode }

func (f *Fake) record(c Call) error {
	f.calls = append(f.calls, c)
	if f.Err != nil {
		err := f.Err
		f.Err = nil
		return err
	}
	return nil
}

// Sync implements Dataplane; Stats count the peer and subnet differences.
func (f *Fake) Sync(ctx context.Context, d *Desired) (Stats, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	start := time.Now()
	if err := f.record(Call{Op: "Sync", Sync: cloneDesired(d)}); err != nil {
		return Stats{}, err
	}
	if err := ctx.Err(); err != nil {
		return Stats{}, err
	}
	known := map[uint16]bool{}
	for _, n := range d.Nodes {
		known[n.Mark] = true
	}
	for a, m := range d.Peers {
		if !known[m] {
			return Stats{}, fmt.Errorf("sync: peer %s: owner mark %d is not a node", a, m)
		}
	}
	for p, m := range d.Subnets {
		if !known[m] {
			return Stats{}, fmt.Errorf("sync: subnet %s: owner mark %d is not a node", p, m)
		}
	}
	var st Stats
	old := f.state
	if old == nil {
		old = &Desired{}
	}
	countDiff(&st, old.Peers, d.Peers)
	countDiff(&st, old.Subnets, d.Subnets)
	f.state = cloneDesired(d)
	st.Duration = time.Since(start)
	return st, nil
}

func countDiff[K comparable](st *Stats, old, new map[K]uint16) {
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
func (f *Fake) Update(ctx context.Context, d *Delta) (Stats, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.record(Call{Op: "Update", Delta: cloneDelta(d)}); err != nil {
		return Stats{}, err
	}
	if f.state == nil {
		return Stats{}, errors.New("update: no Sync yet")
	}
	next := cloneDesired(f.state)
	for _, a := range d.DeletePeers {
		delete(next.Peers, a)
	}
	for _, p := range d.DeleteSubnets {
		delete(next.Subnets, p)
	}
	maps.Copy(next.Peers, d.SetPeers)
	maps.Copy(next.Subnets, d.SetSubnets)
	var st Stats
	countDiff(&st, f.state.Peers, next.Peers)
	countDiff(&st, f.state.Subnets, next.Subnets)
	f.state = next
	return st, nil
}

// Verify implements Dataplane: it reports Drift and clears it.
func (f *Fake) Verify(ctx context.Context) (Stats, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.record(Call{Op: "Verify"}); err != nil {
		return Stats{}, err
	}
	st := f.Drift
	f.Drift = Stats{}
	return st, nil
}

// Read implements Dataplane.
func (f *Fake) Read(ctx context.Context) (*Desired, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, Call{Op: "Read"})
	if f.state == nil {
		return &Desired{Peers: map[netip.Addr]uint16{}, Subnets: map[netip.Prefix]uint16{}}, nil
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

func cloneDesired(d *Desired) *Desired {
	if d == nil {
		return nil
	}
	c := *d
	c.VIPs = append([]netip.Addr(nil), d.VIPs...)
	c.Nodes = append([]Node(nil), d.Nodes...)
	c.Peers = maps.Clone(d.Peers)
	c.Subnets = maps.Clone(d.Subnets)
	if c.Peers == nil {
		c.Peers = map[netip.Addr]uint16{}
	}
	if c.Subnets == nil {
		c.Subnets = map[netip.Prefix]uint16{}
	}
	return &c
}

func cloneDelta(d *Delta) *Delta {
	if d == nil {
		return nil
	}
	c := *d
	c.SetPeers = maps.Clone(d.SetPeers)
	c.SetSubnets = maps.Clone(d.SetSubnets)
	c.DeletePeers = append([]netip.Addr(nil), d.DeletePeers...)
	c.DeleteSubnets = append([]netip.Prefix(nil), d.DeleteSubnets...)
	return &c
}

var _ Dataplane = (*Fake)(nil)
var _ Dataplane = (*dataplane)(nil)
