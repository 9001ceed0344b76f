package affinity

import (
	"cmp"
	"fmt"
	"math"
	"net/netip"
	"slices"
)

// The scheduler is weighted rendezvous (highest-random-weight) hashing with
// bounded loads. Each active node gets a score for a tunnel's peer address,
// weight / -ln(u) with u a hash of (peer, node name) mapped into (0, 1); the
// tunnel goes to the best-scoring node that is below its load bound and its
// capacity. The score depends only on the peer and the node, so adding a
// node never changes another node's score (nothing moves), and removing one
// only re-ranks the tunnels it held. The bound, ceil((1+epsilon) x weighted
// share), depends on the table's counts, which two directors with the same
// table share, so both choose the same node.

// hrwHash mixes a peer address and a node name into 64 bits. FNV-1a feeds
// the bytes and a splitmix64 finalizer spreads them; it is stable across
// processes and machines, unlike hash/maphash.
func hrwHash(peer netip.Addr, node string) uint64 { return hrwNode(hrwPeer(peer), node) }

const fnvPrime = 1099511628211

// hrwPeer is the FNV-1a state after the peer's bytes: ranking the nodes
// for one peer hashes them once, not once per node.
func hrwPeer(peer netip.Addr) uint64 {
	h := uint64(14695981039346656037)
	b := peer.As16()
	for _, c := range b {
		h ^= uint64(c)
		h *= fnvPrime
	}
	return h
}

// hrwNode continues a peer's hash state with a node name.
func hrwNode(h uint64, node string) uint64 {
	for i := 0; i < len(node); i++ {
		h ^= uint64(node[i])
		h *= fnvPrime
	}
	h ^= h >> 30
	h *= 0xbf58476d1ce4e5b9
	h ^= h >> 27
	h *= 0x94d049bb133111eb
	h ^= h >> 31
	return h
}

// hrwScore is the weighted rendezvous score of a node for a peer.
func hrwScore(peer netip.Addr, n *Node) float64 { return scoreOf(hrwPeer(peer), n) }

func scoreOf(ph uint64, n *Node) float64 {
	u := (float64(hrwNode(ph, n.Name)>>11) + 0.5) / (1 << 53)
	return float64(n.Weight) / -math.Log(u)
}

type ranked struct {
	n     *Node
	score float64
}

// rankLocked returns the active nodes ordered by score for the peer, best
// first; equal scores fall back to the name so the order is total. A node
// named in gone is treated as not active (a planner taking it out).
func (t *Table) rankLocked(peer netip.Addr, buf []ranked, gone string) []ranked {
	buf = t.scoreLocked(peer, buf, gone)
	slices.SortFunc(buf, rankCmp)
	return buf
}

// scoreLocked returns the active nodes with their scores for the peer,
// unordered.
func (t *Table) scoreLocked(peer netip.Addr, buf []ranked, gone string) []ranked {
	buf = buf[:0]
	ph := hrwPeer(peer)
	for _, n := range t.nodes {
		if n.State == NodeActive && n.Weight > 0 && n.Name != gone {
			buf = append(buf, ranked{n, scoreOf(ph, n)})
		}
	}
	return buf
}

// rankCmp orders by score, best first, then by name.
func rankCmp(a, b ranked) int {
	if c := cmp.Compare(b.score, a.score); c != 0 {
		return c
	}
	return cmp.Compare(a.n.Name, b.n.Name)
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
	for _, n := range t.nodes {
		if n.State == NodeActive && n.Weight > 0 && n.Name != v.gone {
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

// pick chooses the node for a peer against a load view, excluding the
// node named except (a tunnel's current node when moving it).
func (t *Table) pick(peer netip.Addr, v *loadView, except string) (*Node, error) {
	var buf [16]ranked
	r := t.scoreLocked(peer, buf[:0], v.gone)
	if len(r) == 0 {
		return nil, fmt.Errorf("%w: no active node to place peer %s on", ErrConflict, peer)
	}
	// Almost always the best-ranked node fits: find it without sorting
	// (a million placements in an import), and rank fully only if not.
	best := 0
	for i := range r {
		if rankCmp(r[i], r[best]) < 0 {
			best = i
		}
	}
	if c := r[best]; c.n.Name != except && t.fits(v, c.n) {
		return c.n, nil
	}
	slices.SortFunc(r, rankCmp)
	for _, c := range r {
		if c.n.Name != except && t.fits(v, c.n) {
			return c.n, nil
		}
	}
	// Every node is at its bound: capacity is the hard limit, the bound
	// is not, so take the best-ranked node with room.
	for _, c := range r {
		if c.n.Name != except && (c.n.Capacity == 0 || v.count[c.n.Mark] < c.n.Capacity) {
			return c.n, nil
		}
	}
	return nil, fmt.Errorf("%w: every active node is at capacity, no room for peer %s", ErrConflict, peer)
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
