// Package affinity holds the director's model of the farm: terminator nodes,
// IPsec tunnels (a peer address plus protected subnets) and which node owns
// each tunnel. It keeps the lookup indexes the dataplane is programmed from,
// enforces the table's invariants on every change, and schedules tunnels onto
// nodes.
//
// The package is pure Go: it touches neither the kernel nor the disk. The
// store persists what this package decides, and the director programs the
// kernel from it.
package affinity

import (
	"fmt"
	"net/netip"
	"slices"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/tunneldirector/tunneldirector/internal/enum"
)

// NodeState is the administrative and health state of a terminator node.
type NodeState uint8

const (
	// NodeActive nodes take new tunnels and keep their own.
	NodeActive NodeState = iota
	// NodeDraining nodes keep their tunnels but take no new ones; a
	// rebalance moves their tunnels away when the operator asks for it.
	NodeDraining
	// NodeDown nodes have failed: their tunnels are rescheduled at once.
	NodeDown
)

var nodeStateNames = [...]string{"active", "draining", "down"}

func (s NodeState) String() string { return enum.String(nodeStateNames[:], "NodeState", s) }

// MarshalText writes the state's name.
func (s NodeState) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// UnmarshalText parses the state's name.
func (s *NodeState) UnmarshalText(b []byte) error {
	v, err := ParseNodeState(string(b))
	*s = v
	return err
}

// ParseNodeState parses "active", "draining" or "down".
func ParseNodeState(s string) (NodeState, error) {
	if v, ok := enum.Parse[NodeState](nodeStateNames[:], s, true); ok {
		return v, nil
	}
	return 0, fmt.Errorf("unknown node state %q (want %s)", s, enum.Want(nodeStateNames[:]))
}

// MaxMark is the largest node mark. Marks index small kernel objects (one
// routing table and one IPVS service per node), so they stay small.
const MaxMark = 4095

// DefaultWeight is the weight of a node whose weight was not given.
const DefaultWeight = 100

// Node is one terminator (strongSwan or libreswan box) behind the director.
type Node struct {
	// Name identifies the node in the table, the CLI and imports.
	Name string `json:"name"`
	// Addr is the node's inside address: where the director forwards to.
	Addr netip.Addr `json:"address"`
	// Addr6 is the IPv6 inside address of a dual-stack node whose Addr
	// is IPv4: the next hop for the IPv6 traffic of its tunnels.
	Addr6 netip.Addr `json:"address6,omitzero"`
	// Weight scales the node's share of scheduled tunnels (1..10000).
	Weight uint32 `json:"weight"`
	// Capacity is the most tunnels the node may hold; 0 means no limit.
	Capacity int `json:"capacity"`
	// State is active, draining or down.
	State NodeState `json:"state"`
	// Mark is a small number (1..MaxMark) assigned when the node is added
	// and kept for the node's life; the dataplane derives the node's
	// packet mark, routing table and IPVS service from it. Zero in a
	// change asks the table to assign one.
	Mark uint16 `json:"mark"`
	// Comment is free text carried from the NMS.
	Comment string `json:"comment,omitempty"`
	// Health is what the director's health checks keep about the node
	// (empty unless they took it down or held it).
	Health NodeHealth `json:"health,omitzero"`
}

// LearnedPrefix starts the id of every tunnel the director learned (from
// a peer's first packet or from a node agent's SAs): "learned-" and the
// peer's address. The rest came from the NMS or an operator.
const LearnedPrefix = "learned-"

// Tunnel is one IPsec tunnel: the peer's endpoint address, the subnets
// protected behind it, and the node that holds its SAs.
type Tunnel struct {
	// ID is the NMS's name for the tunnel.
	ID string `json:"id"`
	// Peer is the tunnel endpoint address (the IKE/ESP source).
	Peer netip.Addr `json:"peer"`
	// Subnets are the protected subnets behind the peer; return traffic
	// to any address in them goes to the owner. A tunnel learned from
	// its first IKE packet has none until the node's XFRM agent reports
	// them; NMS files must list at least one.
	Subnets []netip.Prefix `json:"subnets"`
	// Node is the owner node's name. Empty in a change asks the
	// scheduler to choose one.
	Node string `json:"node"`
	// Pinned is true when the NMS chose the owner; the scheduler and a
	// rebalance leave pinned tunnels alone unless their node fails.
	Pinned bool `json:"pinned"`
	// Comment is free text carried from the NMS.
	Comment string `json:"comment,omitempty"`
	// Learned is true for a tunnel the director learned (from a peer's
	// first packet, or from a node agent's SAs) rather than took from the
	// NMS: the owner node's agent supplies its subnets, and it is removed
	// after learned_ttl without an SA on any node. An NMS import that
	// lists it with other content makes it an NMS tunnel.
	Learned bool `json:"learned,omitempty"`
	// Seen is, for a learned tunnel, when a node agent last reported an
	// SA of its peer (kept coarsely: the director refreshes it a few
	// times per learned_ttl, not at every report); zero before any.
	Seen time.Time `json:"seen,omitzero"`
	// Created and Updated are set by the table when the change is applied.
	Created time.Time `json:"created"`
	Updated time.Time `json:"updated"`
	// Revision is the table revision of the tunnel's last change.
	Revision uint64 `json:"revision"`
}

// SameContent reports whether two tunnels carry the same data an
// operator, the scheduler or the agents' merge sets (id, peer, subnets,
// owner, pin, comment, learned and its last-seen second), ignoring the
// times and revision the table stamps. Subnets compare as sets: the table
// keeps them in canonical order. A change to a tunnel of the same content
// is a no-op.
func (t *Tunnel) SameContent(o *Tunnel) bool {
	return t.ID == o.ID && t.Peer == o.Peer && t.Node == o.Node &&
		t.Pinned == o.Pinned && t.Comment == o.Comment && t.Learned == o.Learned &&
		unixSeconds(t.Seen) == unixSeconds(o.Seen) &&
		slices.Equal(t.Subnets, o.Subnets)
}

// Equal reports whether two tunnels are the same record: the same
// content, times and revision (what a replica must hold to equal its
// master).
func (t *Tunnel) Equal(o *Tunnel) bool {
	return t.SameContent(o) && t.Revision == o.Revision &&
		t.Created.Equal(o.Created) && t.Updated.Equal(o.Updated)
}

// Equal reports whether two nodes are the same record, mark and health
// record included.
func (n *Node) Equal(o *Node) bool {
	return n.Name == o.Name && n.Addr == o.Addr && n.Addr6 == o.Addr6 && n.Weight == o.Weight &&
		n.Capacity == o.Capacity && n.State == o.State && n.Mark == o.Mark && n.Comment == o.Comment &&
		n.Health.Equal(&o.Health)
}

// ComparePrefix orders prefixes by family, address, then length, the order
// in which tables and exports list them.
func ComparePrefix(a, b netip.Prefix) int {
	if c := a.Addr().Compare(b.Addr()); c != 0 {
		return c
	}
	return a.Bits() - b.Bits()
}

// ValidateID checks a tunnel id or node name: non-empty, at most 128 bytes,
// printable, no white space or separators that would break CSV or the CLI.
// Printable means graphic and not a space of any kind: control characters
// (C0 and C1, such as U+009B, a terminal escape), format characters (bidi
// overrides such as U+202E, zero-width joiners) and spaces such as NBSP
// would make two names look alike or rewrite an operator's terminal.
func ValidateID(kind, id string) error {
	if id == "" {
		return fmt.Errorf("%s is empty", kind)
	}
	if len(id) > 128 {
		return fmt.Errorf("%s %.20q... is longer than 128 bytes", kind, id)
	}
	if plainASCII(id) {
		return nil
	}
	for _, r := range id {
		if r == ',' || r == ';' || r == '"' || r == utf8.RuneError || !unicode.IsGraphic(r) || unicode.IsSpace(r) || unicode.Is(unicode.Zs, r) {
			return fmt.Errorf("%s %+q contains %+q (allowed: printable characters without space, comma, semicolon or quote)", kind, id, r)
		}
	}
	return nil
}

// plainASCII reports whether s is all printable ASCII other than space,
// comma, semicolon and quote: what ValidateID allows, decided without
// the Unicode tables (a store's load checks a million ids).
func plainASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c <= ' ' || c >= 0x7f || c == ',' || c == ';' || c == '"' {
			return false
		}
	}
	return true
}

// MaxComment is the longest comment a tunnel or node may carry.
const MaxComment = 1024

// ValidateComment checks a comment: at most MaxComment bytes of valid
// UTF-8 with no control characters but tab and newline, so every format
// carries it unchanged and a terminal shows it safely (a C1 control such
// as U+009B would be an escape sequence there).
func ValidateComment(s string) error {
	if len(s) > MaxComment {
		return fmt.Errorf("comment longer than %d bytes", MaxComment)
	}
	if !utf8.ValidString(s) {
		return fmt.Errorf("comment is not valid UTF-8")
	}
	for _, r := range s {
		if unicode.IsControl(r) && r != '\t' && r != '\n' || unicode.Is(unicode.Bidi_Control, r) {
			return fmt.Errorf("comment contains control character %+q", r)
		}
	}
	return nil
}

// ValidatePrefix checks a protected subnet: valid, no host bits set, not
// an IPv4-mapped IPv6 prefix, and no zone.
func ValidatePrefix(p netip.Prefix) error {
	if !p.IsValid() {
		return fmt.Errorf("invalid prefix")
	}
	if p.Addr().Is4In6() {
		return fmt.Errorf("prefix %s is IPv4-mapped IPv6; write it as IPv4", p)
	}
	if p.Addr().Zone() != "" {
		return fmt.Errorf("prefix %s has a zone", p)
	}
	if m := p.Masked(); m != p {
		return fmt.Errorf("prefix %s has host bits set (did you mean %s?)", p, m)
	}
	return nil
}

// ValidateAddr checks a peer or node address: valid, unicast-usable, not
// loopback, without zone, not IPv4-mapped IPv6.
func ValidateAddr(a netip.Addr) error {
	switch {
	case !a.IsValid():
		return fmt.Errorf("invalid address")
	case a.Zone() != "":
		return fmt.Errorf("address %s has a zone", a)
	case a.Is4In6():
		return fmt.Errorf("address %s is IPv4-mapped IPv6; write it as IPv4 %s", a, a.Unmap())
	case a.IsUnspecified():
		return fmt.Errorf("address %s is unspecified", a)
	case a.IsMulticast():
		return fmt.Errorf("address %s is multicast", a)
	case a.Is4() && a == netip.AddrFrom4([4]byte{255, 255, 255, 255}):
		return fmt.Errorf("address %s is broadcast", a)
	case a.IsLoopback():
		// A loopback address never arrives from outside: a peer or a
		// node there is a typo that would steer nothing.
		return fmt.Errorf("address %s is loopback", a)
	}
	return nil
}

// normalizeTunnel sorts the subnets so that equal tunnels compare equal
// and exports are stable; it copies the slice so the caller's stays intact.
func normalizeTunnel(t *Tunnel) {
	s := slices.Clone(t.Subnets)
	slices.SortFunc(s, ComparePrefix)
	t.Subnets = slices.Clip(s)
}
