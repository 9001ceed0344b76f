// Package ipvs is everything that talks to the kernel dataplane: the
// nftables classifier (peer and protected-subnet maps to node marks), one
// IPVS fwmark service per node for IKE and NAT-T, and the fwmark policy
// routes that carry ESP, AH and return traffic (and, in route-only mode on
// kernels without IPVS, everything). See ../shared/DESIGN.md.
//
// The director gives a Dataplane the desired state; the Dataplane diffs it
// against what it knows the kernel holds and applies the difference in
// batches (one nftables transaction per change). Verify reads the kernel
// back and repairs what someone else changed.
package ipvs

import (
	"context"
	"net/netip"
	"time"
)

// Mode is how inbound IKE and NAT-T reach the nodes.
type Mode uint8

const (
	// ModeAuto picks ModeIPVS when the kernel has IPVS, else ModeRouteOnly.
	ModeAuto Mode = iota
	// ModeIPVS forwards UDP 500/4500 through one IPVS fwmark service per
	// node; ESP, AH and return traffic go by fwmark policy routes.
	ModeIPVS
	// ModeRouteOnly forwards all inbound traffic by fwmark policy routes.
	ModeRouteOnly
)

func (m Mode) String() string { return nameOf(modeNames, m) }

// Forward is the IPVS forwarding method of a node.
type Forward uint8

// Forwarding methods, as ipvsadm names them.
const (
	ForwardDR     Forward = iota // direct routing (-g), the default
	ForwardTunnel                // IP-in-IP (-i)
	ForwardMasq                  // NAT (-m)
)

func (f Forward) String() string { return nameOf(forwardNames, f) }

// Node is one terminator node as the dataplane sees it.
type Node struct {
	Mark uint16     // the node's affinity mark (1..4095)
	Name string     // for logs and errors
	Addr netip.Addr // inside address: next hop and IPVS real server
	// Addr6 is the node's IPv6 inside address when Addr is IPv4 (a node
	// without one gets no IPv6 route, rule or service).
	Addr6   netip.Addr
	Forward Forward
	// Active nodes receive unknown peers by the kernel's hash fallback
	// when Desired has no Buckets.
	Active bool
	// Down nodes hold no tunnels and get no IPVS service (their routes
	// stay, so a node coming back up changes nothing but the service).
	Down bool
}

// Desired is the whole state the kernel should hold.
type Desired struct {
	VIPs  []netip.Addr
	Nodes []Node
	// Peers maps tunnel endpoints to the owner's mark.
	Peers map[netip.Addr]uint16
	// Subnets maps protected subnets to the owner's mark.
	Subnets map[netip.Prefix]uint16
	// Marks, when set, stands for Peers and Subnets (left nil): it calls
	// peer for every tunnel endpoint and subnet for every protected
	// subnet, with the owner's mark. A daemon hands its table over this
	// way, so a million tunnels are not copied into Go maps for a Sync;
	// MarksPeers and MarksSubnets (how many it yields) size the
	// dataplane's own maps: growing a map of millions rehashes it.
	Marks                    func(peer func(netip.Addr, uint16), subnet func(netip.Prefix, uint16))
	MarksPeers, MarksSubnets int
	// HashSeed seeds the kernel's jhash of an unknown peer's address.
	HashSeed uint32
	// Buckets is the unknown-peer bucket map: the kernel hashes an
	// unknown peer's address into len(Buckets) buckets (Bucket) and marks
	// it for node Buckets[i]; 0, or a mark no node has, steers that
	// bucket nowhere. Nil: one bucket per active node, in mark order (the
	// hash over the active nodes, HashPick), for a table that holds no
	// buckets.
	Buckets []uint16
}

// Each calls peer and subnet for every tunnel endpoint and protected
// subnet of d, from Marks or from the maps.
func (d *Desired) Each(peer func(netip.Addr, uint16), subnet func(netip.Prefix, uint16)) {
	if d.Marks != nil {
		d.Marks(peer, subnet)
		return
	}
	for a, m := range d.Peers {
		peer(a, m)
	}
	for p, m := range d.Subnets {
		subnet(p, m)
	}
}

// WithMaps returns d with Peers and Subnets filled from Marks (a copy;
// d itself when it has no Marks): for tests and fakes that want maps.
func (d *Desired) WithMaps() *Desired {
	if d.Marks == nil {
		return d
	}
	c := *d
	c.Marks, c.MarksPeers, c.MarksSubnets = nil, 0, 0
	c.Peers, c.Subnets = make(map[netip.Addr]uint16, d.MarksPeers), make(map[netip.Prefix]uint16, d.MarksSubnets)
	d.Marks(func(a netip.Addr, m uint16) { c.Peers[a] = m }, func(p netip.Prefix, m uint16) { c.Subnets[p] = m })
	return &c
}

// Delta is a change to the peer, subnet and bucket maps, and optionally to
// the nodes: what a batch of table changes needs (pins and bucket steps
// among them; a node going down is its new state plus the moves of its
// tunnels), applied without comparing the whole maps: the element changes
// as one nftables transaction, which also carries the hash map and chain
// when the nodes changed them.
type Delta struct {
	SetPeers      map[netip.Addr]uint16
	DeletePeers   []netip.Addr
	SetSubnets    map[netip.Prefix]uint16
	DeleteSubnets []netip.Prefix
	// Nodes, when not nil, are all the nodes after the delta: their
	// routes, services, the unknown-peer hash and the chain follow them
	// (routes and services added before the maps point at them, removed
	// after).
	Nodes []Node
	// Buckets gives unknown-peer buckets new nodes (0: none), within the
	// bucket count of the last Sync, which must have had Buckets: a
	// change of count is a Sync.
	Buckets map[int]uint16
}

// Stats says what an Apply, Update or Verify did.
type Stats struct {
	Added, Changed, Removed int
	// Reloaded is the elements a recreation of the table loaded besides
	// the changes counted (a map outgrew its size): work of a bulk
	// change's size.
	Reloaded int
	Duration time.Duration
	// Pending says a Verify left a background read of the maps running
	// (it started one, or the one it started before has not arrived):
	// call Verify again soon to compare and repair them.
	Pending bool
}

// Dataplane programs the kernel. Implementations are safe for use by one
// goroutine at a time (the reconciler).
type Dataplane interface {
	// Mode is the mode in force.
	Mode() Mode
	// Sync makes the kernel equal to d: on the first call it reads what
	// the kernel already holds (adopting a previous run's state without
	// interrupting traffic) and applies only the difference.
	Sync(ctx context.Context, d *Desired) (Stats, error)
	// Update applies a delta: the maps in one transaction, and the nodes'
	// routes and services around it when Delta.Nodes is set.
	Update(ctx context.Context, d *Delta) (Stats, error)
	// Verify reads the kernel back, compares it with the last synced
	// state, and repairs every difference; Stats counts the repairs. The
	// maps are read in the background: a Verify that leaves the read
	// running says so (Stats.Pending), and a later one compares it.
	Verify(ctx context.Context) (Stats, error)
	// Read returns what the kernel holds, as a Desired.
	Read(ctx context.Context) (*Desired, error)
	// Teardown removes everything the director owns, and nothing else.
	Teardown(ctx context.Context) error
	// Close releases netlink sockets; the kernel stays programmed.
	Close() error
}
