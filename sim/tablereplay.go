package sim

import (
	"net/netip"
	"time"

	"github.com/tunneldirector/tunneldirector/affinity"
)

// tableReplayer replays the steps through a real affinity.Table in memory:
// the project's scheduler, its plans and rebalance, with unknown peers
// steered by a model of the kernel's hash and pinned where it sent them.
type tableReplayer struct {
	label    string
	t        *affinity.Table
	kernel   *unknownPeers
	interval time.Duration
	next     time.Duration
	dirty    bool
	nlearned int
	added    int
}

func newTableReplayer(label string, s *Scenario, choices int, u UnknownSpec) (*tableReplayer, error) {
	t, err := affinity.New(affinity.Options{Epsilon: s.Epsilon, Choices: choices, Now: func() time.Time { return Epoch }})
	if err != nil {
		return nil, err
	}
	k, err := newUnknownPeers(u)
	if err != nil {
		return nil, err
	}
	r := &tableReplayer{label: label, t: t, kernel: k}
	if k.buckets != nil {
		r.interval = k.buckets.Options().Interval
	}
	return r, nil
}

func (r *tableReplayer) name() string { return r.label }

func (r *tableReplayer) learned() (int, bool) { return r.nlearned, true }

func (r *tableReplayer) apply(batch []affinity.Change) *affinity.Applied {
	a, err := r.t.Apply(batch)
	if err != nil {
		return nil
	}
	r.dirty = true
	return a
}

func (r *tableReplayer) up(d *replay, ct *ctunnel) string {
	tu := affinity.Tunnel{ID: ct.id, Peer: ct.peer}
	if ct.pinned != "" {
		tu.Node, tu.Pinned = ct.pinned, true
	}
	if ct.unknown {
		n, ok := r.t.NodeByMark(r.kernel.mark(ct.peer))
		if !ok {
			return ""
		}
		tu.Node = n.Name
	}
	a := r.apply([]affinity.Change{{Kind: affinity.PutTunnel, Tunnel: &tu}})
	if a == nil || len(a.Changes) == 0 {
		return ""
	}
	if ct.unknown {
		r.nlearned++
	}
	return a.Changes[0].Tunnel.Node
}

func (r *tableReplayer) down(_ *replay, ct *ctunnel) {
	r.apply([]affinity.Change{{Kind: affinity.DeleteTunnel, Name: ct.id}})
}

// tick steps the buckets once per interval while loads have changed, as
// the director does.
func (r *tableReplayer) tick(d *replay) {
	if r.kernel.buckets == nil || !d.unknown || d.now < r.next {
		return
	}
	r.next = d.now + r.interval
	if r.dirty {
		r.dirty = r.kernel.update(d.now, r.t.Loads())
	}
}

func (r *tableReplayer) event(d *replay, e Event) int {
	var batch []affinity.Change
	plan := func(p *affinity.Plan, err error) {
		if err == nil {
			batch = p.Batch()
		}
	}
	switch e.Kind {
	case EvNodeAdd:
		r.added++
		batch = []affinity.Change{{Kind: affinity.PutNode, Node: &affinity.Node{Name: e.Node, Weight: e.Weight, Capacity: e.Capacity,
			Addr: netip.AddrFrom4([4]byte{172, 16, byte(r.added >> 8), byte(r.added)})}}}
	case EvNodeUp:
		plan(r.t.PlanNodeState(e.Node, affinity.NodeActive))
	case EvNodeDrain:
		plan(r.t.PlanNodeState(e.Node, affinity.NodeDraining))
	case EvNodeDown:
		plan(r.t.PlanNodeState(e.Node, affinity.NodeDown))
	case EvNodeRemove:
		plan(r.t.PlanRemoveNode(e.Node))
	case EvRebalance:
		plan(r.t.Rebalance(e.Budget), nil)
	}
	moved := 0
	if a := r.apply(batch); a != nil {
		for i := range a.Changes {
			c := &a.Changes[i]
			if c.Kind != affinity.PutTunnel || c.Old == nil {
				continue
			}
			if ct := d.byID[c.Tunnel.ID]; ct != nil && d.assign(ct, c.Tunnel.Node) {
				moved++
			}
		}
	}
	// Node changes take effect in the kernel at once.
	if d.unknown {
		r.kernel.update(d.now, r.t.Loads())
	}
	return moved
}
