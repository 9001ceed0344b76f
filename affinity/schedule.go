package affinity

import (
	"cmp"
	"fmt"
	"math"
	"net/netip"
	"slices"
)

// The scheduler is weighted rendezvous (highest-random-weight) hashing
// with a choice by load. Each active node gets a score for a tunnel's
// peer address, weight / -ln(u) with u a hash of (peer, node name) mapped
// into (0, 1). The d best-scoring nodes are the peer's candidates (power
// of d choices, d = Options.Choices; by default every active node); the
// tunnel goes to the least loaded candidate (tunnels per unit of weight,
// counting the new one) that is below its load bound and its capacity,
// the better score breaking ties. When no candidate has room, the next
// nodes in score order are tried, so the bound, ceil((1+epsilon) x
// weighted share), stays a hard cap while any node within its capacity
// is below it.
//
// The scores depend only on the peer and the node, so a peer keeps its
// preference, and adding a node changes no other node's score; the loads
// are the table's counts, which two directors with the same table share,
// so both choose the same node. Nothing placed moves when loads change:
// the choice by load only steers new and displaced tunnels, which is what
// fills an added or recovered node from arrivals. Choices 1 is the plain
// bounded-load rendezvous scheduler of earlier versions.

// hrwPeer is the FNV-1a state after a peer's 16 address bytes: the part of
// the (peer, node) hash that every node of one placement shares.
type hrwPeer uint64

func hrwOf(peer netip.Addr) hrwPeer {
	const (
		offset = 14695981039346656037
		prime  = 1099511628211
	)
	h := uint64(offset)
	b := peer.As16()
	for _, c := range b {
		h ^= uint64(c)
		h *= prime
	}
	return hrwPeer(h)
}

// hash finishes the (peer, node) hash: FNV-1a over the name, then a
// splitmix64 finalizer. The result is stable across processes and
// machines, unlike hash/maphash.
func (p hrwPeer) hash(node string) uint64 {
	const prime = 1099511628211
	h := uint64(p)
	for i := 0; i < len(node); i++ {
		h ^= uint64(node[i])
		h *= prime
	}
	h ^= h >> 30
	h *= 0xbf58476d1ce4e5b9
	h ^= h >> 27
	h *= 0x94d049bb133111eb
	h ^= h >> 31
	return h
}

// score is the weighted rendezvous score of a node for the peer. With
// uniform weights only the order matters, and u orders the nodes as
// weight / -ln(u) does, so the logarithm is skipped.
func (p hrwPeer) score(n *Node, uniform bool) float64 {
	h := float64(p.hash(n.Name) >> 11)
	if uniform {
		return h
	}
	u := (h + 0.5) / (1 << 53)
	return float64(n.Weight) / -math.Log(u)
}

type ranked struct {
	n     *Node
	score float64
}

// byScore orders candidates best first; equal scores fall back to the
// name so the order is total.
func byScore(a, b ranked) int {
	if c := cmp.Compare(b.score, a.score); c != 0 {
		return c
	}
	return cmp.Compare(a.n.Name, b.n.Name)
}

// refreshActive rebuilds the list of nodes that take tunnels. Apply calls
// it, under the write lock, whenever a node is put, deleted or restored.
func (t *Table) refreshActive() {
	t.active = t.active[:0]
	for _, n := range t.nodes {
		if n.State == NodeActive && n.Weight > 0 {
			t.active = append(t.active, n)
		}
	}
	slices.SortFunc(t.active, func(a, b *Node) int { return cmp.Compare(a.Mark, b.Mark) })
	t.uniform = true
	for _, n := range t.active {
		t.uniform = t.uniform && n.Weight == t.active[0].Weight
	}
}

// scoreLocked appends the active nodes with their scores for the peer to
// buf, in no order. Nodes named gone (a planner taking them out) or except
// (a tunnel's current node when moving it) are left out.
func (t *Table) scoreLocked(peer netip.Addr, buf []ranked, gone, except string) []ranked {
	h := hrwOf(peer)
	buf = buf[:0]
	for _, n := range t.active {
		if n.Name != gone && n.Name != except {
			buf = append(buf, ranked{n, h.score(n, t.uniform)})
		}
	}
	return buf
}

// rankLocked returns the active nodes ordered by score for the peer, best
// first. A node named in gone is treated as not active.
func (t *Table) rankLocked(peer netip.Addr, buf []ranked, gone string) []ranked {
	buf = t.scoreLocked(peer, buf, gone, "")
	slices.SortFunc(buf, byScore)
	return buf
}

// loadView is a set of per-node counts the scheduler places against: the
// live counts, or a planner's copy it updates as it plans moves.
type loadView struct {
	count       *[MaxMark + 1]int
	gone        string // a node the planner is taking out
	total       int    // tunnels on active nodes
	totalWeight uint64 // weights of active nodes
}

func (t *Table) liveLoad() loadView {
	v := loadView{count: &t.count}
	t.fillTotals(&v)
	return v
}

func (t *Table) fillTotals(v *loadView) {
	v.total, v.totalWeight = 0, 0
	for _, n := range t.active {
		if n.Name != v.gone {
			v.total += v.count[n.Mark]
			v.totalWeight += uint64(n.Weight)
		}
	}
}

// bound is the most tunnels a node may hold after one more is placed.
func (t *Table) bound(v *loadView, n *Node) int {
	share := float64(v.total+1) * float64(n.Weight) / float64(v.totalWeight)
	return int(math.Ceil((1 + t.epsilon) * share))
}

func (t *Table) fits(v *loadView, n *Node) bool {
	c := v.count[n.Mark]
	return (n.Capacity == 0 || c < n.Capacity) && c < t.bound(v, n)
}

// lighter reports whether a is less loaded than b once each takes one
// more tunnel, per unit of weight: (ca+1)/wa < (cb+1)/wb, in integers.
func lighter(v *loadView, a, b *Node) bool {
	return uint64(v.count[a.Mark]+1)*uint64(b.Weight) < uint64(v.count[b.Mark]+1)*uint64(a.Weight)
}

// maxStackNodes sizes the candidate buffer kept on the stack; farms with
// more active nodes spill to the heap.
const maxStackNodes = 64

// pick chooses the node for a peer against a load view, excluding the
// node named except (a tunnel's current node when moving it).
func (t *Table) pick(peer netip.Addr, v *loadView, except string) (*Node, error) {
	if t.choices == 0 || t.choices >= len(t.active) {
		if n := t.pickLeast(peer, v, except); n != nil {
			return n, nil
		}
	}
	var buf [maxStackNodes]ranked
	r := t.scoreLocked(peer, buf[:0], v.gone, except)
	if len(r) == 0 {
		return nil, fmt.Errorf("%w: no active node to place peer %s on", ErrConflict, peer)
	}
	// The d best scores to the front, in order: a partial selection, so
	// a placement costs one pass per candidate, not a sort.
	d := min(t.choices, len(r))
	for i := 0; i < d; i++ {
		best := i
		for j := i + 1; j < len(r); j++ {
			if byScore(r[j], r[best]) < 0 {
				best = j
			}
		}
		r[i], r[best] = r[best], r[i]
	}
	var chosen *Node
	for _, c := range r[:d] {
		if t.fits(v, c.n) && (chosen == nil || lighter(v, c.n, chosen)) {
			chosen = c.n
		}
	}
	if chosen != nil {
		return chosen, nil
	}
	// No candidate has room: the next nodes by score, bound still kept.
	slices.SortFunc(r[d:], byScore)
	for _, c := range r[d:] {
		if t.fits(v, c.n) {
			return c.n, nil
		}
	}
	// Every node within its capacity is at its bound (heavy nodes at
	// capacity hold up the average): capacity is the last limit.
	for _, c := range r {
		if c.n.Capacity == 0 || v.count[c.n.Mark] < c.n.Capacity {
			return c.n, nil
		}
	}
	return nil, fmt.Errorf("%w: every active node is at capacity, no room for peer %s", ErrConflict, peer)
}

// pickLeast is pick with every active node a candidate: the least loaded
// node within its bound and capacity, the peer's best score among equally
// loaded ones. Only those are hashed. It returns nil when no node fits the
// bound, leaving the fallbacks to pick.
func (t *Table) pickLeast(peer netip.Addr, v *loadView, except string) *Node {
	var buf [maxStackNodes]*Node
	tied := buf[:0]
	for _, n := range t.active {
		if n.Name == v.gone || n.Name == except || !t.fits(v, n) {
			continue
		}
		switch {
		case len(tied) == 0 || lighter(v, n, tied[0]):
			tied = append(tied[:0], n)
		case !lighter(v, tied[0], n):
			tied = append(tied, n)
		}
	}
	switch len(tied) {
	case 0:
		return nil
	case 1:
		return tied[0]
	}
	h := hrwOf(peer)
	best := ranked{tied[0], h.score(tied[0], t.uniform)}
	for _, n := range tied[1:] {
		if c := (ranked{n, h.score(n, t.uniform)}); byScore(c, best) < 0 {
			best = c
		}
	}
	return best.n
}

// schedule places a new tunnel against the live counts.
func (t *Table) schedule(peer netip.Addr) (*Node, error) {
	v := t.liveLoad()
	return t.pick(peer, &v, "")
}

// Schedule says which node the scheduler would choose for a new tunnel
// with this peer, without changing anything.
func (t *Table) Schedule(peer netip.Addr) (string, error) {
	t.mu.RLock()
	defer t.mu.RUnlock()
	n, err := t.schedule(peer)
	if err != nil {
		return "", err
	}
	return n.Name, nil
}

// Bound returns the bounded-load limit of each active node for the next
// placement, by node name.
func (t *Table) Bound() map[string]int {
	t.mu.RLock()
	defer t.mu.RUnlock()
	v := t.liveLoad()
	out := map[string]int{}
	for _, n := range t.nodes {
		if n.State == NodeActive && n.Weight > 0 {
			out[n.Name] = t.bound(&v, n)
		}
	}
	return out
}

// Prefer returns the active node names in the scheduler's order of
// preference for a peer, ignoring load: the ideal placement.
func (t *Table) Prefer(peer netip.Addr) []string {
	t.mu.RLock()
	defer t.mu.RUnlock()
	r := t.rankLocked(peer, nil, "")
	out := make([]string, len(r))
	for i, c := range r {
		out[i] = c.n.Name
	}
	return out
}

// planner is a scratch copy of the counts that a plan updates as it decides
// moves, so that later moves see earlier ones.
type planner struct {
	t      *Table
	counts [MaxMark + 1]int
	view   loadView
}

// newPlanner starts a plan; gone names a node the plan takes out of
// service, so it neither receives tunnels nor counts towards the average.
func (t *Table) newPlanner(gone string) *planner {
	p := &planner{t: t, counts: t.count}
	p.view.count = &p.counts
	p.view.gone = gone
	t.fillTotals(&p.view)
	return p
}

// move records a tunnel leaving from for to.
func (p *planner) move(from, to *Node) {
	p.counts[from.Mark]--
	p.counts[to.Mark]++
	p.t.fillTotals(&p.view)
}
