// Package nft is the director's nftables table: the classifier that marks
// packets to a VIP by their peer (a peer map per family, the jhash fallback
// for unknown peers, the first-packet log the learner reads) and packets to
// a protected subnet by their destination (an exact-match map per prefix
// length), as State; the transaction that turns one State into another, as
// Plan; building the rules; reading the table back; and the netlink
// transport that carries batches.
package nft

import (
	"encoding/json"
	"fmt"
	"maps"
	"net/netip"
	"reflect"
	"slices"
)

// State is the director's table as the kernel holds it (or as it should).
// Marks are full fwmark values.
type State struct {
	// Table says the table exists.
	Table bool
	// Sig describes the chain's rules; a chain whose rules do not all
	// carry the wanted signature is rebuilt.
	Sig     Signature
	VIPs    map[netip.Addr]struct{}
	Peers   PeerMap
	Subnets SubnetMap
	Hash    map[uint32]uint32 // unknown-peer bucket -> fwmark
	// Lens are the per-prefix-length subnet maps: in the kernel's state
	// the maps that exist, in a target the maps its subnets need.
	Lens map[Len]struct{}
	// Interrupted says a read's dump ran across a transaction (the
	// kernel flagged it NLM_F_DUMP_INTR): it may have missed elements.
	Interrupted bool
	// Stored is the Digest the digest set holds (HasStored: it holds
	// one): in a read state, what the director last committed; in the
	// model, what the last transaction wrote.
	Stored    Digest
	HasStored bool
	// Broken says a set or the chain is missing or holds something the
	// director cannot read (a key with host bits): the table is recreated.
	Broken bool
	// Unread says the peer and subnet maps were left unread although
	// they differ from the target (too many elements to read back):
	// Diff replaces the table whole, as for Broken.
	Unread bool
	// Sizes are the sizes the peer and subnet maps were created with, by
	// set name (MapSize): each such map holds at most that many elements.
	// A map missing here (made before the director sized its maps) is
	// unbounded.
	Sizes map[string]uint32
	// cnt counts a target's subnets per length, so an update learns in
	// O(1) whether it emptied or opened a length.
	cnt [2][129]int
}

// NewState returns an empty state (no table).
func NewState() *State {
	return &State{
		VIPs:  map[netip.Addr]struct{}{},
		Hash:  map[uint32]uint32{},
		Lens:  map[Len]struct{}{},
		Sizes: map[string]uint32{},
	}
}

// Clone returns a deep copy.
func (s *State) Clone() *State {
	c := *s
	c.Sig.Lens = slices.Clone(s.Sig.Lens)
	c.VIPs = maps.Clone(s.VIPs)
	c.Peers = s.Peers.Clone()
	c.Subnets = s.Subnets.Clone()
	c.Hash = maps.Clone(s.Hash)
	c.Lens = maps.Clone(s.Lens)
	c.Sizes = maps.Clone(s.Sizes)
	return &c
}

// Share makes s hold want's peer and subnet maps themselves, not a copy:
// the model of the kernel and the target hold the same elements after
// every transaction the director applies (Diff and Update bring the kernel
// to the target), and at a million tunnels a second copy cost a clone of
// 0.6 s at every restart and as much memory as the maps. They stay one
// until Update changes want's maps in place, which then are s's too:
// Update reads s's values before it changes them, records what the plan
// needs of them (Plan.Left, the digest), and ApplyTo shares again once the
// kernel took the plan. Until then s's maps must not be read, and nothing
// changes s's maps but want.
func (s *State) Share(want *State) { s.Peers, s.Subnets = want.Peers, want.Subnets }

// SharesMaps reports whether s holds o's very peer and subnet maps (Share)
// as they are, so that they are equal without a comparison.
func (s *State) SharesMaps(o *State) bool {
	return s.Peers.sum == o.Peers.sum && s.Subnets.sum == o.Subnets.sum &&
		sameMap(s.Peers.v4, o.Peers.v4) && sameMap(s.Peers.v6, o.Peers.v6) &&
		sameMap(s.Subnets.v4, o.Subnets.v4) && sameMap(s.Subnets.v6, o.Subnets.v6)
}

// sameMap reports whether a and b are one map (both nil: both empty).
func sameMap[K comparable](a, b map[K]uint32) bool {
	return reflect.ValueOf(a).UnsafePointer() == reflect.ValueOf(b).UnsafePointer()
}

// Signature is what the chain's rules are built from. Every rule carries
// it (JSON in the rule's comment), so reading the chain back tells whether
// it is the chain a target wants without decoding expressions.
type Signature struct {
	// Version of the chain layout; 0 means no valid signature was read.
	Version int `json:"v"`
	// IKEBit is set in the marks of IKE and NAT-T (IPVS mode), 0 in
	// route-only mode.
	IKEBit uint32 `json:"ike"`
	// Seed and HashN parameterise the unknown-peer hash (HashN buckets;
	// no hash rule when 0).
	Seed  uint32 `json:"seed"`
	HashN int    `json:"n"`
	// A mark m with m&RangeMask == MarkBase is the director's: the chain
	// copies such marks of new flows to their ct mark. RangeMask is the
	// configured mask without the node bits.
	MarkBase  uint32 `json:"base"`
	RangeMask uint32 `json:"mask"`
	// LogGroup is the NFLOG group of the first-packet log.
	LogGroup uint16 `json:"log"`
	// Lens are the subnet lengths with a rule, in chain order (lenLess).
	// In the kernel each has a rule of its own, added when its map
	// appears and deleted with it, so a rule's tag does not carry them.
	Lens []Len `json:"lens,omitempty"`
}

// Layout is the current chain layout version. 6: the unknown peers'
// window map (address -> first packet's mark) replaced the seen set, and
// the hash map holds the unknown-peer buckets. 7: the subnet rules leave
// packets to the director's own addresses alone (an upgraded daemon
// rebuilds the chain in one transaction). 8: the window map's data is
// the mark read back from the packet (not the bucket lookup's register),
// because nft 1.0.6 (Debian 12) aborts listing a dynset whose data is a
// map lookup. 9: each subnet length's rule is tagged with its length
// alone and is inserted before the last rule (the ct mark copy) or deleted
// with its map, so a length that appears or goes no longer rebuilds the
// chain: a rebuild binds every rule to its map again, which makes the
// kernel walk every element (0.34 s at a million tunnels).
const Layout = 9

// Equal reports whether two signatures build the same chain.
func (a Signature) Equal(b Signature) bool {
	return a.Version == b.Version && a.IKEBit == b.IKEBit && a.Seed == b.Seed && a.HashN == b.HashN &&
		a.MarkBase == b.MarkBase && a.RangeMask == b.RangeMask && a.LogGroup == b.LogGroup && slices.Equal(a.Lens, b.Lens)
}

// sameButLens reports whether a and b differ at most in their lengths,
// which a plan adds and deletes rule by rule without rebuilding the chain.
func (a Signature) sameButLens(b Signature) bool {
	a.Lens, b.Lens = nil, nil
	return a.Equal(b)
}

// ruleTag is the comment of a rule: of rule i of the n built from Sig
// (without its lengths), or of the rule of subnet length Len.
type ruleTag struct {
	Sig Signature `json:"sig"`
	I   int       `json:"i,omitempty"`
	N   int       `json:"n,omitempty"`
	Len *Len      `json:"len,omitempty"`
}

func (t ruleTag) encode() string {
	b, _ := json.Marshal(t)
	return string(b)
}

func decodeTag(s string) (ruleTag, error) {
	var t ruleTag
	if err := json.Unmarshal([]byte(s), &t); err != nil {
		return t, err
	}
	if t.Sig.Version != Layout {
		return t, fmt.Errorf("rule tag %q: not this layout", s)
	}
	if t.Len != nil {
		if t.I != 0 || t.N != 0 || len(t.Sig.Lens) != 0 || !t.Len.valid() {
			return t, fmt.Errorf("rule tag %q: not a subnet length's", s)
		}
		return t, nil
	}
	if t.N <= 0 || t.I < 0 || t.I >= t.N || len(t.Sig.Lens) != 0 {
		return t, fmt.Errorf("rule tag %q: not this layout", s)
	}
	return t, nil
}

// Len names one exact-match subnet map: a family and a prefix length.
// Protected subnets of different tunnels never overlap (the affinity table
// refuses a prefix inside another), so at most one subnet matches any
// destination and a hash map per length, looked up with the masked
// destination, classifies like an interval map; element changes in a hash
// map cost O(1) where the rbtree interval map walked all 200,000 elements.
type Len struct {
	V6   bool `json:"v6"`
	Bits int  `json:"bits"`
}

// LenOf is the map a prefix belongs in.
func LenOf(p netip.Prefix) Len { return Len{p.Addr().Is6(), p.Bits()} }

// SetName is the name of l's map.
func (l Len) SetName() string {
	if l.V6 {
		return fmt.Sprintf("sub6_%d", l.Bits)
	}
	return fmt.Sprintf("sub4_%d", l.Bits)
}

// parseLen is SetName's inverse; false for any other name.
func parseLen(name string) (Len, bool) {
	var fam, bits int
	var rest string
	if n, _ := fmt.Sscanf(name, "sub%d_%d%s", &fam, &bits, &rest); n != 2 {
		return Len{}, false
	}
	l := Len{fam == 6, bits}
	if (fam != 4 && fam != 6) || !l.valid() || l.SetName() != name {
		return Len{}, false
	}
	return l, true
}

// valid reports whether l is a prefix length of its family.
func (l Len) valid() bool { return l.Bits >= 0 && (l.Bits <= 32 || l.V6 && l.Bits <= 128) }

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

// lenLess orders IPv4 first, then longer prefixes first: the order of the
// chain's subnet rules (any order is correct, as subnets never overlap, but
// the most specific first is what a reader expects).
func lenLess(a, b Len) int {
	if a.V6 != b.V6 {
		return b2i(a.V6) - b2i(b.V6)
	}
	return b.Bits - a.Bits
}

// SortedLens returns the lengths of m in chain order.
func SortedLens(m map[Len]struct{}) []Len { return slices.SortedFunc(maps.Keys(m), lenLess) }

// AddSubnet and DelSubnet change a target's subnets together with its
// per-length counts and maps. The counts are an array and a new or removed
// key shows in the map's length, so a Sync of 100,000 subnets pays no extra
// hashing for them.
func (s *State) AddSubnet(p netip.Prefix, m uint32) {
	if s.Subnets.Set(p, m) {
		s.countNew(p)
	}
}

// FillSubnet is AddSubnet with SubnetMap.Fill: it says whether p was new,
// and when it was not, Subnets.Resum must follow.
func (s *State) FillSubnet(p netip.Prefix, m uint32) (added bool) {
	if !s.Subnets.Fill(p, m) {
		return false
	}
	s.countNew(p)
	return true
}

// countNew counts a subnet new to the target at its length.
func (s *State) countNew(p netip.Prefix) {
	l := LenOf(p)
	c := &s.cnt[b2i(l.V6)][l.Bits]
	if *c++; *c == 1 {
		s.Lens[l] = struct{}{}
	}
}

// DelSubnet is AddSubnet's inverse.
func (s *State) DelSubnet(p netip.Prefix) {
	if !s.Subnets.Delete(p) {
		return
	}
	l := LenOf(p)
	c := &s.cnt[b2i(l.V6)][l.Bits]
	if *c--; *c == 0 {
		delete(s.Lens, l)
	}
}

// SyncLens sets the signature's lengths from the maps a target needs.
func (s *State) SyncLens() { s.Sig.Lens = SortedLens(s.Lens) }

// The peer and subnet maps are created with a size: the kernel then gives
// them its fixed-size hash, whose buckets are allocated once, instead of the
// resizable one, which rehashes its way up while a transaction fills it. A
// full load of a million tunnels took 10.3 s (6.6 s in the kernel)
// unsized and 5.8 s (2.9 s) sized. The size is also the most elements the
// kernel lets the map hold, so a plan that would fill a map past its size
// replaces the table with maps sized for the new content (Diff, Update):
// each size leaves room for half as much again, so that happens once per
// growth by half of a map.
const minMapSize = 1024

// MapSize is the size a peer or subnet map of n elements is created with:
// the power of two at or above 1.5 n (and minMapSize).
func MapSize(n int) uint32 {
	want := max(uint64(n)+uint64(n)/2, minMapSize)
	size := uint64(minMapSize)
	for size < want {
		size <<= 1
	}
	return uint32(min(size, 1<<31))
}

// peerSetName is the name of a family's peer map.
func peerSetName(v6 bool) string {
	if v6 {
		return "peers6"
	}
	return "peers4"
}

// targetCounts calls f with the name and element count of every peer and
// subnet map a target needs (its subnet counts are kept by AddSubnet).
func (s *State) targetCounts(f func(name string, n int)) {
	f(peerSetName(false), len(s.Peers.v4))
	f(peerSetName(true), len(s.Peers.v6))
	for l := range s.Lens {
		f(l.SetName(), s.cnt[b2i(l.V6)][l.Bits])
	}
}

// overfills reports whether a target of want's content would put more
// elements into one of cur's maps than it was created for.
func overfills(cur, want *State) bool {
	over := false
	want.targetCounts(func(name string, n int) {
		if size := cur.Sizes[name]; size > 0 && uint64(n) > uint64(size) {
			over = true
		}
	})
	return over
}

// MapCounts returns the element count of every peer and subnet map s
// holds, by set name, counted from the elements.
func (s *State) MapCounts() map[string]int {
	out := map[string]int{peerSetName(false): len(s.Peers.v4), peerSetName(true): len(s.Peers.v6)}
	for p := range s.Subnets.All() {
		out[LenOf(p).SetName()]++
	}
	return out
}
