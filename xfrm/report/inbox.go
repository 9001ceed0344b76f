package report

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/tunneldirector/tunneldirector/xfrm"
)

// ErrWrongNode is wrapped by Accept's error for a report that names
// another node than the one its token belongs to.
var ErrWrongNode = errors.New("report for another node")

// NodeFacts is what the director holds for one node from its agent.
type NodeFacts struct {
	Node    string
	Session string
	Seq     uint64
	Tunnels map[netip.Addr]xfrm.Tunnel
	Summary xfrm.Summary
	// LastSeen is when the last valid report of the node's agent (any kind,
	// also one answered with need_full) arrived: the agent's heartbeat for
	// the health checks.
	LastSeen time.Time
	// LastFull is when the last full report was applied.
	LastFull time.Time
}

// Change is what one accepted report changed in a node's facts: the merge
// on the director applies exactly this.
type Change struct {
	Node string
	// Full is set when a full report replaced the node's facts: Upserts
	// then holds every tunnel, and Removed the peers the node held before
	// and does not now.
	Full    bool
	Upserts []xfrm.Tunnel
	Removed []netip.Addr
}

// Empty reports whether the change changes nothing.
func (c *Change) Empty() bool { return !c.Full && len(c.Upserts) == 0 && len(c.Removed) == 0 }

// Inbox keeps every node's facts as its agent reported them, applying
// reports strictly in session order: a delta or heartbeat that does not
// follow what the inbox holds is answered with need_full and changes
// nothing, a repeated delta (a retry whose answer was lost) is
// acknowledged and changes nothing. It is safe for concurrent use.
type Inbox struct {
	mu    sync.Mutex
	nodes map[string]*NodeFacts
}

// NewInbox returns an empty inbox.
func NewInbox() *Inbox { return &Inbox{nodes: map[string]*NodeFacts{}} }

// Accept applies a decoded report from the agent authenticated as
// authNode, at the director's time now.
func (in *Inbox) Accept(authNode string, r *Report, now time.Time) (Ack, Change, error) {
	if r.Node != authNode {
		return Ack{}, Change{}, fmt.Errorf("%w: the report names node %q, its token belongs to %q", ErrWrongNode, r.Node, authNode)
	}
	in.mu.Lock()
	defer in.mu.Unlock()
	n := in.nodes[r.Node]
	if n == nil {
		n = &NodeFacts{Node: r.Node, Tunnels: map[netip.Addr]xfrm.Tunnel{}}
		in.nodes[r.Node] = n
	}
	n.LastSeen = now
	ch := Change{Node: r.Node}
	switch r.Kind {
	case KindFull:
		old := n.Tunnels
		n.Tunnels = make(map[netip.Addr]xfrm.Tunnel, len(r.Tunnels))
		for _, t := range r.Tunnels {
			n.Tunnels[t.Peer] = t
		}
		for p := range old {
			if _, ok := n.Tunnels[p]; !ok {
				ch.Removed = append(ch.Removed, p)
			}
		}
		slices.SortFunc(ch.Removed, netip.Addr.Compare)
		ch.Full, ch.Upserts = true, slices.Clone(r.Tunnels)
		n.Session, n.Seq, n.Summary, n.LastFull = r.Session, r.Seq, r.Summary, now
		return Ack{}, ch, nil
	case KindDelta:
		if r.Session == n.Session && r.Seq <= n.Seq {
			return Ack{}, ch, nil // a retry of a delta already applied
		}
		if r.Session != n.Session || r.Seq != n.Seq+1 {
			return Ack{NeedFull: true}, ch, nil
		}
		for _, t := range r.Tunnels {
			n.Tunnels[t.Peer] = t
		}
		for _, p := range r.Removed {
			if _, ok := n.Tunnels[p]; ok {
				delete(n.Tunnels, p)
				ch.Removed = append(ch.Removed, p)
			}
		}
		ch.Upserts = slices.Clone(r.Tunnels)
		n.Seq, n.Summary = r.Seq, r.Summary
		return Ack{}, ch, nil
	default: // heartbeat
		if r.Session != n.Session || r.Seq != n.Seq {
			return Ack{NeedFull: true}, ch, nil
		}
		n.Summary = r.Summary
		return Ack{}, ch, nil
	}
}

// Node returns a copy of a node's facts.
func (in *Inbox) Node(name string) (NodeFacts, bool) { return in.facts(name, true) }

// Nodes returns the names of the nodes that have reported, sorted.
func (in *Inbox) Nodes() []string {
	in.mu.Lock()
	defer in.mu.Unlock()
	out := make([]string, 0, len(in.nodes))
	for n := range in.nodes {
		out = append(out, n)
	}
	slices.Sort(out)
	return out
}

// Forget drops a node's facts and session (a node removed from the
// configuration; or every node when a director stops being master, so
// that agents start over with a full report when it is master again).
func (in *Inbox) Forget(node string) {
	in.mu.Lock()
	defer in.mu.Unlock()
	delete(in.nodes, node)
}

// Held is one node's facts of a peer.
type Held struct {
	Node   string
	Tunnel xfrm.Tunnel
}

// Holders returns the nodes whose facts hold the peer, sorted by node
// name. The tunnels' slices are shared with the inbox: read only.
func (in *Inbox) Holders(peer netip.Addr) []Held {
	in.mu.Lock()
	defer in.mu.Unlock()
	var out []Held
	for name, n := range in.nodes {
		if t, ok := n.Tunnels[peer]; ok {
			out = append(out, Held{Node: name, Tunnel: t})
		}
	}
	slices.SortFunc(out, func(a, b Held) int { return strings.Compare(a.Node, b.Node) })
	return out
}

// Peers returns the peers a node's facts hold, in no particular order.
func (in *Inbox) Peers(node string) []netip.Addr {
	in.mu.Lock()
	defer in.mu.Unlock()
	n, ok := in.nodes[node]
	if !ok {
		return nil
	}
	out := make([]netip.Addr, 0, len(n.Tunnels))
	for p := range n.Tunnels {
		out = append(out, p)
	}
	return out
}

// Summary returns a node's facts without their tunnels (Tunnels is nil):
// what status pages show, without copying thousands of tunnels.
func (in *Inbox) Summary(name string) (NodeFacts, bool) { return in.facts(name, false) }

// facts copies a node's facts, with a copy of its tunnels or with none.
func (in *Inbox) facts(name string, tunnels bool) (NodeFacts, bool) {
	in.mu.Lock()
	defer in.mu.Unlock()
	n, ok := in.nodes[name]
	if !ok {
		return NodeFacts{}, false
	}
	c := *n
	c.Tunnels = nil
	if tunnels {
		c.Tunnels = make(map[netip.Addr]xfrm.Tunnel, len(n.Tunnels))
		for k, v := range n.Tunnels {
			c.Tunnels[k] = v
		}
	}
	return c, true
}

// Reset forgets every node (a director that stops being master: the
// agents start over with a full report at the next master).
func (in *Inbox) Reset() {
	in.mu.Lock()
	defer in.mu.Unlock()
	clear(in.nodes)
}
