package affinity

import (
	"cmp"
	"fmt"
	"math"
	"slices"
	"time"
)

// Buckets steers the first packets of unknown peers. The kernel hashes an
// unknown peer's source address into one of Count buckets (nftables: jhash
// of the address modulo Count, with the director's seed) and marks the
// packet with the node of that bucket, through a map bucket -> mark; the
// learner then pins the peer on that node in the table. Buckets decides the
// map: each node gets a number of buckets in proportion to its headroom
// below a common load level (tunnels per unit of weight), so that arrivals
// of unknown peers fill the emptiest nodes first, as placement by load does
// for known peers.
//
// The assignment changes only through Step, one event at a time with the
// caller's clock:
//   - buckets of nodes that stopped taking tunnels (down, draining, full,
//     removed) move at once; all others move at most MaxChanges per step
//     and at most one step per Interval;
//   - a move changes as few buckets as it can: a bucket moves only from a
//     node above its target number to one below;
//   - a bucket in which an unpinned first packet was seen (Seen) within
//     Quiet does not move, unless its node is down or gone. Together with
//     the learner pinning the mark the packet actually got, this keeps the
//     window between a peer's first packet and its pin safe: every packet
//     of that window follows the same bucket to the same node.
//
// A bucket change never moves a pinned tunnel: pinned peers are looked up
// in the peer map before the buckets. Buckets is not safe for concurrent
// use; it holds no kernel state and touches no disk.
type Buckets struct {
	opts   BucketOptions
	marks  []uint16
	seen   []int64 // Unix nanoseconds of the last unpinned first packet
	last   time.Time
	cursor int // where the last balancing step stopped
}

// BucketChange is one bucket given to another node.
type BucketChange struct {
	Bucket int    `json:"bucket"`
	From   uint16 `json:"from"` // 0: no node before
	To     uint16 `json:"to"`   // 0: no node takes tunnels
}

// NodeLoad is a node as the buckets see it: its weight, capacity, state
// and the tunnels it holds.
type NodeLoad struct {
	Name     string
	Mark     uint16
	Weight   uint32
	Capacity int
	State    NodeState
	Tunnels  int
}

// takes reports whether the node can be given new tunnels.
func (n *NodeLoad) takes() bool {
	return n.State == NodeActive && n.Weight > 0 && (n.Capacity == 0 || n.Tunnels < n.Capacity)
}

// Loads returns every node with its tunnel count, by mark: what Buckets
// steps on.
func (t *Table) Loads() []NodeLoad {
	t.mu.RLock()
	defer t.mu.RUnlock()
	out := make([]NodeLoad, 0, len(t.nodes))
	for _, n := range t.nodes {
		out = append(out, NodeLoad{Name: n.Name, Mark: n.Mark, Weight: n.Weight, Capacity: n.Capacity, State: n.State, Tunnels: t.count[n.Mark]})
	}
	slices.SortFunc(out, func(a, b NodeLoad) int { return cmp.Compare(a.Mark, b.Mark) })
	return out
}

// NewBuckets returns buckets with no node assigned (mark 0 everywhere):
// the first Step assigns them all.
func NewBuckets(o BucketOptions) (*Buckets, error) {
	if err := o.Validate(); err != nil {
		return nil, err
	}
	o = o.withDefaults()
	return &Buckets{opts: o, marks: make([]uint16, o.Count), seen: make([]int64, o.Count)}, nil
}

// Options returns the options in force, defaults filled in.
func (b *Buckets) Options() BucketOptions { return b.opts }

// Len returns the number of buckets.
func (b *Buckets) Len() int { return len(b.marks) }

// Index maps a 32-bit hash of an address to its bucket the way nftables'
// hash expression does with a modulus of Len (reciprocal_scale).
func (b *Buckets) Index(hash uint32) int {
	return int(uint64(hash) * uint64(len(b.marks)) >> 32)
}

// Mark returns the node mark of bucket i (0: no node).
func (b *Buckets) Mark(i int) uint16 { return b.marks[i] }

// Marks returns a copy of the assignment, bucket by bucket: the map the
// dataplane programs, and what a director pair replicates.
func (b *Buckets) Marks() []uint16 { return slices.Clone(b.marks) }

// Restore sets the assignment from a copy (Marks of the director that
// made it), keeping this side's seen times.
func (b *Buckets) Restore(marks []uint16) error {
	if len(marks) != len(b.marks) {
		return fmt.Errorf("restore buckets: %d buckets, want %d", len(marks), len(b.marks))
	}
	copy(b.marks, marks)
	return nil
}

// Defer holds the next balancing step back until Interval after now: a
// director that just took the assignment over (a restart, a takeover)
// keeps it for an interval, as the director that made it would have.
// Buckets of nodes that stopped taking tunnels still move at the next
// Step.
func (b *Buckets) Defer(now time.Time) { b.last = now }

// Seen records an unpinned first packet in bucket i at now: the bucket
// keeps its node for Quiet.
func (b *Buckets) Seen(i int, now time.Time) {
	b.seen[i] = now.UnixNano()
}

// quiet reports whether no unpinned first packet was seen in bucket i
// within Quiet of now.
func (b *Buckets) quiet(i int, now int64) bool {
	return b.seen[i] == 0 || now-b.seen[i] >= int64(b.opts.Quiet)
}

// Targets returns how many buckets each node should hold (by mark): the
// shares of the arrivals that would lift the least loaded nodes to a
// common level, from Horizon x the tunnels held.
func (b *Buckets) Targets(nodes []NodeLoad) map[uint16]int {
	var take []*NodeLoad
	total := 0
	for i := range nodes {
		if nodes[i].takes() {
			take = append(take, &nodes[i])
			total += nodes[i].Tunnels
		}
	}
	out := make(map[uint16]int, len(take))
	if len(take) == 0 {
		return out
	}
	arrivals := max(b.opts.Horizon*float64(total), float64(len(take)))
	// room(l) is what each node takes to reach level l (tunnels per unit
	// of weight), within its capacity; find l where the sum is arrivals.
	room := func(n *NodeLoad, l float64) float64 {
		r := l*float64(n.Weight) - float64(n.Tunnels)
		if n.Capacity > 0 {
			r = min(r, float64(n.Capacity-n.Tunnels))
		}
		return max(r, 0)
	}
	sum := func(l float64) float64 {
		s := 0.0
		for _, n := range take {
			s += room(n, l)
		}
		return s
	}
	lo, hi := 0.0, 1.0
	for sum(hi) < arrivals && hi < 1e18 {
		hi *= 2
	}
	for range 100 {
		mid := (lo + hi) / 2
		if sum(mid) < arrivals {
			lo = mid
		} else {
			hi = mid
		}
	}
	shares := make([]float64, len(take))
	var s float64
	for i, n := range take {
		shares[i] = room(n, hi)
		s += shares[i]
	}
	// Largest remainder: the counts add up to Len exactly; ties go to the
	// lower mark, so two directors compute the same targets.
	type rem struct {
		i    int
		frac float64
	}
	rems := make([]rem, len(take))
	given := 0
	for i, n := range take {
		q := shares[i] / s * float64(len(b.marks))
		out[n.Mark] = int(math.Floor(q))
		given += out[n.Mark]
		rems[i] = rem{i, q - math.Floor(q)}
	}
	slices.SortStableFunc(rems, func(x, y rem) int { return cmp.Compare(y.frac, x.frac) })
	for k := 0; given < len(b.marks); k++ {
		out[take[rems[k%len(rems)].i].Mark]++
		given++
	}
	return out
}

// Step brings the assignment towards the targets the nodes' loads ask
// for, at time now, and returns the buckets it changed (in bucket order).
// It moves buckets off nodes that take no tunnels at once (buckets of a
// node that is down or gone even when a first packet was seen in them:
// those packets reach no one), and otherwise only when Interval has passed
// since the last balancing step, at most MaxChanges buckets, none seen
// within Quiet.
func (b *Buckets) Step(now time.Time, nodes []NodeLoad) []BucketChange {
	// What each mark's packets reach: by default nothing (gone).
	const (
		gone = iota
		down
		closed // alive but takes no new tunnels: draining or full
		open
	)
	var state [MaxMark + 1]uint8
	for i := range nodes {
		n := &nodes[i]
		if int(n.Mark) > MaxMark {
			continue
		}
		switch {
		case n.takes():
			state[n.Mark] = open
		case n.State == NodeDown:
			state[n.Mark] = down
		default:
			state[n.Mark] = closed
		}
	}
	t := now.UnixNano()
	balance := b.last.IsZero() || !now.Before(b.last.Add(b.opts.Interval))
	if !balance && !slices.ContainsFunc(b.marks, func(m uint16) bool { return state[m] != open }) {
		return nil
	}
	target := b.Targets(nodes)
	var out []BucketChange
	if len(target) == 0 {
		// No node takes tunnels: unknown peers go nowhere.
		for i, m := range b.marks {
			if m != 0 && (state[m] <= down || b.quiet(i, t)) {
				out = append(out, BucketChange{Bucket: i, From: m})
				b.marks[i] = 0
			}
		}
		return out
	}
	var want, have [MaxMark + 1]int32
	recv := make([]uint16, 0, len(target)) // receivers in mark order
	for m, n := range target {
		want[m] = int32(n)
		recv = append(recv, m)
	}
	slices.Sort(recv)
	for _, m := range b.marks {
		have[m]++
	}
	// give returns the receiver furthest below its target.
	give := func() uint16 {
		best, gap := uint16(0), int32(0)
		for _, m := range recv {
			if g := want[m] - have[m]; g > gap {
				best, gap = m, g
			}
		}
		return best
	}
	move := func(i int) bool {
		to := give()
		if to == 0 {
			return false
		}
		from := b.marks[i]
		have[from]--
		have[to]++
		b.marks[i] = to
		out = append(out, BucketChange{Bucket: i, From: from, To: to})
		return true
	}
	for i, m := range b.marks {
		if state[m] != open && (state[m] <= down || b.quiet(i, t)) {
			move(i)
		}
	}
	surplus := false
	for _, m := range recv {
		surplus = surplus || have[m] > want[m]
	}
	if balance {
		b.last = now
	}
	if balance && surplus {
		n := len(b.marks)
		budget := b.opts.MaxChanges
		start := b.cursor
		for k := 0; k < n && budget > 0; k++ {
			i := (start + k) % n
			m := b.marks[i]
			if state[m] != open || have[m] <= want[m] || !b.quiet(i, t) {
				continue
			}
			if !move(i) {
				break
			}
			budget--
			b.cursor = (i + 1) % n
		}
	}
	slices.SortFunc(out, func(x, y BucketChange) int { return cmp.Compare(x.Bucket, y.Bucket) })
	return out
}
