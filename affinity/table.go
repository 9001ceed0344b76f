package affinity

import (
	"cmp"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/gaissmai/bart"
)

// DefaultEpsilon is the bounded-load slack: no node is scheduled above
// ceil((1+epsilon) x its weighted share of the tunnels).
const DefaultEpsilon = 0.25

// Options configures a Table.
type Options struct {
	// Epsilon is the bounded-load slack; 0 means DefaultEpsilon.
	Epsilon float64
	// Choices is d, the number of best-scoring nodes a placement weighs
	// by load (power of d choices). 0, the default, weighs every active
	// node: the least loaded takes the tunnel, the peer's rendezvous order
	// breaking ties. 1 places by score alone (the scheduler before
	// choices existed).
	Choices int
	// VIPs are the director's virtual addresses; no protected subnet may
	// contain one, and no peer or node may use one.
	VIPs []netip.Addr
	// Now stamps changes; nil means time.Now. Tests inject a clock.
	Now func() time.Time
}

// Table is the affinity table: nodes, tunnels, and the indexes that answer
// "which node owns this packet". It is safe for concurrent use; every
// change goes through Apply, which is all-or-nothing.
type Table struct {
	mu      sync.RWMutex
	epsilon float64
	choices int
	vips    []netip.Addr
	now     func() time.Time
	rev     uint64

	nodes  map[string]*Node
	byMark [MaxMark + 1]*Node
	// active lists the nodes that take tunnels (active, weight > 0) by
	// mark, rebuilt on every change of nodes: placement reads it instead
	// of walking the map. uniform says their weights are all equal.
	active  []*Node
	uniform bool
	count   [MaxMark + 1]int // tunnels per node mark
	// tunnels holds each entry beside its owner's mark (owned), so that a
	// scan for one node's tunnels reads the map alone: at a million
	// tunnels, following every entry pointer for its mark cost a node
	// down a third of a second in cache misses.
	tunnels map[string]owned
	peers   peerIndex
	subnets bart.Table[*entry]
	// buckets is the unknown-peer bucket assignment (buckettable.go);
	// nil: none.
	buckets []uint16
}

// entry is the stored form of a tunnel, kept to 96 bytes because a million
// of them are held: the owner as a mark, times as Unix seconds (uint32
// lasts until 2106), the usually empty comment behind a pointer.
// Entries are immutable once indexed; a change replaces the pointer.
type entry struct {
	id      string
	peer    netip.Addr
	subnets []netip.Prefix
	comment *string
	rev     uint64
	created uint32
	updated uint32
	mark    uint16
	pinned  bool
	learned bool
	seen    uint32 // Tunnel.Seen; fills the padding: still 96 bytes
}

// owned is an entry as the tunnel map holds it: with a copy of its
// immutable mark, set together by index and reindex.
type owned struct {
	e    *entry
	mark uint16
}

func (e *entry) commentText() string {
	if e.comment == nil {
		return ""
	}
	return *e.comment
}

func (t *Table) peer(a netip.Addr) (*entry, bool) { return t.peers.get(a) }

func (t *Table) setPeer(e *entry) { t.peers.put(e) }

func (t *Table) deletePeer(a netip.Addr) { t.peers.del(a) }

// New returns an empty table.
func New(opts Options) (*Table, error) {
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	opts = opts.withDefaults()
	t := &Table{
		epsilon: opts.Epsilon,
		choices: opts.Choices,
		now:     opts.Now,
		nodes:   make(map[string]*Node),
		tunnels: make(map[string]owned),
		peers:   newPeerIndex(0),
	}
	if t.now == nil {
		t.now = time.Now
	}
	if err := t.SetVIPs(opts.VIPs); err != nil {
		return nil, err
	}
	return t, nil
}

// SetVIPs replaces the director's VIPs after checking that no protected
// subnet, peer or node uses one.
func (t *Table) SetVIPs(vips []netip.Addr) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	var errs []error
	for _, v := range vips {
		if err := ValidateAddr(v); err != nil {
			errs = append(errs, fmt.Errorf("VIP: %w", err))
			continue
		}
		if e, ok := t.subnets.Lookup(v); ok {
			errs = append(errs, fmt.Errorf("VIP %s lies inside protected subnet %s of tunnel %s", v, e.subnetOf(v), e.id))
		}
		if e, ok := t.peer(v); ok {
			errs = append(errs, fmt.Errorf("VIP %s is the peer address of tunnel %s", v, e.id))
		}
		for _, n := range t.nodes {
			if n.Addr == v {
				errs = append(errs, fmt.Errorf("VIP %s is the address of node %s", v, n.Name))
			}
		}
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	t.vips = slices.Clone(vips)
	return nil
}

// VIPs returns the director's VIPs.
func (t *Table) VIPs() []netip.Addr {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return slices.Clone(t.vips)
}

// IsVIP reports whether a is one of the director's VIPs.
func (t *Table) IsVIP(a netip.Addr) bool {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.isVIP(a)
}

// Epsilon returns the bounded-load slack in force.
func (t *Table) Epsilon() float64 { return t.epsilon }

// Choices returns d, the candidates a placement weighs by load (0: every
// active node).
func (t *Table) Choices() int { return t.choices }

// Revision returns the revision of the last applied change.
func (t *Table) Revision() uint64 {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.rev
}

// Len returns the number of tunnels.
func (t *Table) Len() int {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return len(t.tunnels)
}

func (e *entry) subnetOf(a netip.Addr) netip.Prefix {
	for _, p := range e.subnets {
		if p.Contains(a) {
			return p
		}
	}
	return netip.Prefix{}
}

func (t *Table) tunnelOf(e *entry) Tunnel {
	tu := Tunnel{
		ID:       e.id,
		Peer:     e.peer,
		Subnets:  e.subnets,
		Pinned:   e.pinned,
		Learned:  e.learned,
		Comment:  e.commentText(),
		Created:  time.Unix(int64(e.created), 0).UTC(),
		Updated:  time.Unix(int64(e.updated), 0).UTC(),
		Revision: e.rev,
	}
	if e.seen != 0 {
		tu.Seen = time.Unix(int64(e.seen), 0).UTC()
	}
	if n := t.byMark[e.mark]; n != nil {
		tu.Node = n.Name
	}
	return tu
}

// Tunnel returns the tunnel with the given id. The returned Subnets slice
// is shared with the table and must not be modified.
func (t *Table) Tunnel(id string) (Tunnel, bool) {
	t.mu.RLock()
	defer t.mu.RUnlock()
	o, ok := t.tunnels[id]
	e := o.e
	if !ok {
		return Tunnel{}, false
	}
	return t.tunnelOf(e), true
}

// LookupPeer returns the tunnel whose endpoint is the given address.
func (t *Table) LookupPeer(a netip.Addr) (Tunnel, bool) {
	t.mu.RLock()
	defer t.mu.RUnlock()
	e, ok := t.peer(a)
	if !ok {
		return Tunnel{}, false
	}
	return t.tunnelOf(e), true
}

// PeerMark returns the mark of the node owning the tunnel whose endpoint is
// a: the fast path the dataplane and the simulator use.
func (t *Table) PeerMark(a netip.Addr) (uint16, bool) {
	t.mu.RLock()
	e, ok := t.peer(a)
	t.mu.RUnlock()
	if !ok {
		return 0, false
	}
	return e.mark, true
}

// LookupSubnet returns the tunnel whose protected subnet contains a, and
// that subnet.
func (t *Table) LookupSubnet(a netip.Addr) (Tunnel, netip.Prefix, bool) {
	t.mu.RLock()
	defer t.mu.RUnlock()
	e, ok := t.subnets.Lookup(a)
	if !ok {
		return Tunnel{}, netip.Prefix{}, false
	}
	return t.tunnelOf(e), e.subnetOf(a), true
}

// SubnetMark returns the mark of the node owning the protected subnet that
// contains a.
func (t *Table) SubnetMark(a netip.Addr) (uint16, bool) {
	t.mu.RLock()
	e, ok := t.subnets.Lookup(a)
	t.mu.RUnlock()
	if !ok {
		return 0, false
	}
	return e.mark, true
}

// MatchKind says why an address matched a tunnel.
type MatchKind string

// The ways an address can match.
const (
	MatchPeer   MatchKind = "peer"
	MatchSubnet MatchKind = "subnet"
)

// Match is the answer to "who owns this address".
type Match struct {
	Addr   netip.Addr   `json:"addr"`
	By     MatchKind    `json:"by"`
	Prefix netip.Prefix `json:"prefix,omitzero"` // the protected subnet, when By is MatchSubnet
	Tunnel Tunnel       `json:"tunnel"`
	Node   Node         `json:"node"`
}

// Lookup answers which tunnel and node own an address: an exact peer match
// first (inbound IKE and ESP), then the longest protected subnet (return
// traffic).
func (t *Table) Lookup(a netip.Addr) (Match, bool) {
	t.mu.RLock()
	defer t.mu.RUnlock()
	m := Match{Addr: a}
	e, ok := t.peer(a)
	if ok {
		m.By = MatchPeer
	} else if e, ok = t.subnets.Lookup(a); ok {
		m.By = MatchSubnet
		m.Prefix = e.subnetOf(a)
	} else {
		return Match{}, false
	}
	m.Tunnel = t.tunnelOf(e)
	if n := t.byMark[e.mark]; n != nil {
		m.Node = *n
	}
	return m, true
}

// Node returns the node with the given name.
func (t *Table) Node(name string) (Node, bool) {
	t.mu.RLock()
	defer t.mu.RUnlock()
	n, ok := t.nodes[name]
	if !ok {
		return Node{}, false
	}
	return *n, true
}

// NodeByMark returns the node with the given mark.
func (t *Table) NodeByMark(mark uint16) (Node, bool) {
	t.mu.RLock()
	defer t.mu.RUnlock()
	if int(mark) > MaxMark || t.byMark[mark] == nil {
		return Node{}, false
	}
	return *t.byMark[mark], true
}

// Nodes returns all nodes sorted by name.
func (t *Table) Nodes() []Node {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.nodesLocked()
}

func (t *Table) nodesLocked() []Node {
	out := make([]Node, 0, len(t.nodes))
	for _, n := range t.nodes {
		out = append(out, *n)
	}
	slices.SortFunc(out, func(a, b Node) int { return cmp.Compare(a.Name, b.Name) })
	return out
}

// Counts returns the number of tunnels each node owns, by node name.
func (t *Table) Counts() map[string]int {
	t.mu.RLock()
	defer t.mu.RUnlock()
	out := make(map[string]int, len(t.nodes))
	for _, n := range t.nodes {
		out[n.Name] = t.count[n.Mark]
	}
	return out
}

// Tunnels returns all tunnels sorted by id. The Subnets slices are shared
// with the table and must not be modified.
func (t *Table) Tunnels() []Tunnel {
	return t.Filter(nil)
}

// Filter returns the tunnels for which keep returns true (all when keep is
// nil), sorted by id.
func (t *Table) Filter(keep func(*Tunnel) bool) []Tunnel {
	t.mu.RLock()
	defer t.mu.RUnlock()
	out := make([]Tunnel, 0, len(t.tunnels))
	for _, o := range t.tunnels {
		e := o.e
		tu := t.tunnelOf(e)
		if keep == nil || keep(&tu) {
			out = append(out, tu)
		}
	}
	slices.SortFunc(out, func(a, b Tunnel) int { return cmp.Compare(a.ID, b.ID) })
	return out
}

// TunnelsOfNode returns the tunnels owned by the named node, sorted by id.
func (t *Table) TunnelsOfNode(name string) []Tunnel {
	t.mu.RLock()
	n, ok := t.nodes[name]
	t.mu.RUnlock()
	if !ok {
		return nil
	}
	return t.Filter(func(tu *Tunnel) bool { return tu.Node == n.Name })
}

// Snapshot is a consistent copy of the whole table.
type Snapshot struct {
	Revision uint64
	Nodes    []Node
	Tunnels  []Tunnel
	// Buckets is the unknown-peer bucket assignment (nil: none).
	Buckets []uint16
}

// Snapshot copies the table under one read lock, so nodes, tunnels and
// revision belong together.
func (t *Table) Snapshot() Snapshot {
	t.mu.RLock()
	defer t.mu.RUnlock()
	s := Snapshot{Revision: t.rev, Nodes: t.nodesLocked(), Tunnels: make([]Tunnel, 0, len(t.tunnels)), Buckets: slices.Clone(t.buckets)}
	for _, o := range t.tunnels {
		e := o.e
		s.Tunnels = append(s.Tunnels, t.tunnelOf(e))
	}
	slices.SortFunc(s.Tunnels, func(a, b Tunnel) int { return cmp.Compare(a.ID, b.ID) })
	return s
}

// EachTunnel calls fn for every tunnel in no particular order, under the
// read lock: fn must not call back into the table. The Tunnel is reused
// between calls.
func (t *Table) EachTunnel(fn func(*Tunnel)) {
	t.mu.RLock()
	defer t.mu.RUnlock()
	var tu Tunnel
	for _, o := range t.tunnels {
		e := o.e
		tu = t.tunnelOf(e)
		fn(&tu)
	}
}

// EachKey calls fn with every tunnel's id, peer and subnets (the index
// keys), in no particular order and without building a Tunnel: the
// store's startup check runs it over a million tunnels.
func (t *Table) EachKey(fn func(id string, peer netip.Addr, subnets []netip.Prefix)) {
	t.mu.RLock()
	defer t.mu.RUnlock()
	for _, o := range t.tunnels {
		e := o.e
		fn(e.id, e.peer, e.subnets)
	}
}

// SubnetLen is the number of protected subnets.
func (t *Table) SubnetLen() int {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.subnets.Size()
}

// Marks calls peer for every peer address and subnet for every protected
// subnet, each with its owner's mark, in no particular order and under one
// read lock, and returns the revision they are of: the dataplane's maps.
func (t *Table) Marks(peer func(netip.Addr, uint16), subnet func(netip.Prefix, uint16)) (revision uint64) {
	t.mu.RLock()
	defer t.mu.RUnlock()
	// Every tunnel has a peer, and the prefix table holds exactly the
	// tunnels' subnets: each entry's own list is the walk (iterating the
	// prefix table cost a microsecond a prefix, a second at a million).
	t.peers.each(func(e *entry) {
		peer(e.peer, e.mark)
		for _, p := range e.subnets {
			subnet(p, e.mark)
		}
	})
	return t.rev
}
