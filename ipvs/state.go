package ipvs

import (
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
)

// nftState is the director's nftables table as the kernel holds it (or as
// it should hold it). Marks are full fwmark values.
type nftState struct {
	table bool
	// sig identifies the chain's rules (mode, hash modulus and seed); a
	// chain whose rules do not all carry it is rebuilt.
	sig     string
	seed    uint32
	vips    map[netip.Addr]struct{}
	peers   map[netip.Addr]uint32
	subnets map[netip.Prefix]uint32
	hash    map[uint32]uint32 // hash index -> fwmark
	// lens are the per-prefix-length subnet maps: in the kernel's state
	// the maps that exist, in a target the maps its subnets need.
	lens map[plen]struct{}
	// base is a target's chain signature without the subnet lengths
	// (sig adds them); cnt counts a target's subnets per length, so an
	// Update learns in O(1) whether it emptied or opened a length.
	base string
	cnt  [2][129]int
	// broken says a set is missing or holds something the director cannot
	// read (a range that is not a prefix): the table is recreated.
	broken bool
}

type ruleKey struct {
	v6    bool
	mark  uint32
	table int
}

type routeKey struct {
	v6    bool
	table int
}

type svcKey struct {
	v6   bool
	mark uint32
}

// svcDest is a fwmark service's one destination and how it is made.
type svcDest struct {
	addr netip.Addr
	fwd  Forward
	// ops is one-packet scheduling (see ipvs/lvs): on for dr and tunnel,
	// so every datagram follows the peer's current mark; off for masq,
	// whose replies need the connection entries to be translated.
	ops bool
}

// kstate is everything the director programs.
type kstate struct {
	nft    nftState
	rules  map[ruleKey]struct{}
	routes map[routeKey]netip.Addr
	// local[0] / local[1]: the IPv4 / IPv6 local rule sits at
	// LocalRulePriority and not at 0.
	local [2]bool
	svcs  map[svcKey]svcDest
}

func newKstate() *kstate {
	return &kstate{
		nft: nftState{
			vips:    map[netip.Addr]struct{}{},
			peers:   map[netip.Addr]uint32{},
			subnets: map[netip.Prefix]uint32{},
			hash:    map[uint32]uint32{},
			lens:    map[plen]struct{}{},
		},
		rules:  map[ruleKey]struct{}{},
		routes: map[routeKey]netip.Addr{},
		svcs:   map[svcKey]svcDest{},
	}
}

func (s *kstate) clone() *kstate {
	c := *s
	c.nft.vips = maps.Clone(s.nft.vips)
	c.nft.peers = maps.Clone(s.nft.peers)
	c.nft.subnets = maps.Clone(s.nft.subnets)
	c.nft.hash = maps.Clone(s.nft.hash)
	c.nft.lens = maps.Clone(s.nft.lens)
	c.rules = maps.Clone(s.rules)
	c.routes = maps.Clone(s.routes)
	c.svcs = maps.Clone(s.svcs)
	return &c
}

func chainSig(mode Mode, seed uint32, n int) string {
	return fmt.Sprintf("td3 mode=%s seed=%#x n=%d", mode, effectiveSeed(seed), n)
}

// plen names one exact-match subnet map: a family and a prefix length.
// Protected subnets of different tunnels never overlap (the affinity table
// refuses a prefix inside another), so at most one subnet matches any
// destination and a hash map per length, looked up with the masked
// destination, classifies like an interval map; element changes in a hash
// map cost O(1) where the rbtree interval map walked all 200,000 elements.
type plen struct {
	v6   bool
	bits int
}

func plenOf(p netip.Prefix) plen { return plen{p.Addr().Is6(), p.Bits()} }

func (l plen) setName() string {
	if l.v6 {
		return fmt.Sprintf("sub6_%d", l.bits)
	}
	return fmt.Sprintf("sub4_%d", l.bits)
}

// parsePlen is setName's inverse; false for any other name.
func parsePlen(name string) (plen, bool) {
	var fam, bits int
	var rest string
	if n, _ := fmt.Sscanf(name, "sub%d_%d%s", &fam, &bits, &rest); n != 2 {
		return plen{}, false
	}
	l := plen{fam == 6, bits}
	if (fam != 4 && fam != 6) || bits < 0 || bits > 32 && !l.v6 || bits > 128 || l.setName() != name {
		return plen{}, false
	}
	return l, true
}

// plenLess orders IPv4 first, then longer prefixes first: the order of the
// chain's subnet rules (any order is correct, as subnets never overlap, but
// the most specific first is what a reader expects).
func plenLess(a, b plen) int {
	if a.v6 != b.v6 {
		return b2i(a.v6) - b2i(b.v6)
	}
	return b.bits - a.bits
}

func sortedLens(m map[plen]struct{}) []plen { return sortedKeys(m, plenLess) }

// lensSig is the chain signature for base with subnet rules for lens: the
// chain is rebuilt when a length appears or goes, and a chain whose rules
// do not match the maps is detected as drift.
func lensSig(base string, lens map[plen]struct{}) string {
	var b strings.Builder
	b.WriteString(base)
	b.WriteString(" sub=")
	for i, l := range sortedLens(lens) {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, "%d/%d", 4+2*b2i(l.v6), l.bits)
	}
	return b.String()
}

// addSubnet and delSubnet change a target's subnets together with its
// per-length counts and maps. The counts are an array and a new or removed
// key shows in the map's length, so a Sync of 100,000 subnets pays no extra
// hashing for them.
func (s *nftState) addSubnet(p netip.Prefix, m uint32) {
	n := len(s.subnets)
	s.subnets[p] = m
	if len(s.subnets) == n {
		return
	}
	l := plenOf(p)
	c := &s.cnt[b2i(l.v6)][l.bits]
	if *c++; *c == 1 {
		s.lens[l] = struct{}{}
	}
}

func (s *nftState) delSubnet(p netip.Prefix) {
	n := len(s.subnets)
	delete(s.subnets, p)
	if len(s.subnets) == n {
		return
	}
	l := plenOf(p)
	c := &s.cnt[b2i(l.v6)][l.bits]
	if *c--; *c == 0 {
		delete(s.lens, l)
	}
}

func nodeAddr(n Node, v6 bool) netip.Addr {
	if v6 {
		if n.Addr6.IsValid() {
			return n.Addr6
		}
		if n.Addr.Is6() {
			return n.Addr
		}
		return netip.Addr{}
	}
	if n.Addr.Is4() {
		return n.Addr
	}
	return netip.Addr{}
}

// target turns the desired state into the kernel state to hold.
func (c Config) target(mode Mode, d *Desired) (*kstate, error) {
	t := newKstate()
	t.nft.table = true
	t.local = [2]bool{true, true}
	known := map[uint16]bool{}
	var active []uint16
	for _, n := range d.Nodes {
		if n.Mark == 0 || n.Mark > MaxMark {
			return nil, fmt.Errorf("node %s: mark %d outside 1..%d", n.Name, n.Mark, MaxMark)
		}
		if known[n.Mark] {
			return nil, fmt.Errorf("node %s: mark %d used twice", n.Name, n.Mark)
		}
		known[n.Mark] = true
		if n.Active {
			active = append(active, n.Mark)
		}
		for _, v6 := range []bool{false, true} {
			a := nodeAddr(n, v6)
			if !a.IsValid() {
				continue
			}
			tbl := c.routeTable(n.Mark)
			t.routes[routeKey{v6, tbl}] = a
			t.rules[ruleKey{v6, c.Fwmark(n.Mark), tbl}] = struct{}{}
			// A down node gets no service: a peer's entries still
			// pointing at it then lose their destination and the
			// peer's next packet is scheduled by its new mark.
			if mode == ModeIPVS && !n.Down {
				t.svcs[svcKey{v6, c.IKEMark(n.Mark)}] = svcDest{a, n.Forward, n.Forward != ForwardMasq}
			}
		}
	}
	slices.Sort(active)
	for i, m := range active {
		t.nft.hash[uint32(i)] = c.Fwmark(m)
	}
	t.nft.base = chainSig(mode, d.HashSeed, len(active))
	t.nft.seed = d.HashSeed
	for _, v := range d.VIPs {
		t.nft.vips[v.Unmap()] = struct{}{}
	}
	for a, m := range d.Peers {
		if !known[m] {
			return nil, fmt.Errorf("peer %s: owner mark %d is not a node", a, m)
		}
		t.nft.peers[a.Unmap()] = c.Fwmark(m)
	}
	for p, m := range d.Subnets {
		if !known[m] {
			return nil, fmt.Errorf("subnet %s: owner mark %d is not a node", p, m)
		}
		t.nft.addSubnet(p.Masked(), c.Fwmark(m))
	}
	t.nft.sig = lensSig(t.nft.base, t.nft.lens)
	return t, nil
}

// nftPlan is one nftables transaction.
type nftPlan struct {
	// recreate deletes the table (if present) and creates it with its sets
	// and chain in the same transaction; the element lists then carry the
	// whole content.
	recreate bool
	// chain rebuilds the chain's rules (flush + add) with sig and one
	// subnet rule per length in lens. lensOnly says the rebuild is only
	// for lengths that appear or go: internal structure, not a change the
	// stats report.
	chain    bool
	lensOnly bool
	sig      string
	lens     []plen
	// addLens / delLens create and delete per-length subnet maps; a
	// deleted map's elements go with it.
	addLens, delLens []plen
	// hashN and seed parameterise the chain's hash rules.
	hashN int
	seed  uint32

	addVIPs, delVIPs []netip.Addr
	addPeers         map[netip.Addr]uint32
	delPeers         []netip.Addr
	addSubnets       map[netip.Prefix]uint32
	delSubnets       []netip.Prefix
	addHash          map[uint32]uint32
	delHash          []uint32
}

func (p *nftPlan) empty() bool {
	return !p.recreate && !p.chain && len(p.addLens)+len(p.delLens)+len(p.addVIPs)+len(p.delVIPs)+len(p.addPeers)+len(p.delPeers)+
		len(p.addSubnets)+len(p.delSubnets)+len(p.addHash)+len(p.delHash) == 0
}

// count returns the plan's element changes as added, changed, removed.
func (p *nftPlan) count() (a, c, r int) {
	if p.recreate || p.chain && !p.lensOnly {
		c++
	}
	a += len(p.addVIPs) + len(p.addPeers) + len(p.addSubnets) + len(p.addHash)
	r += len(p.delVIPs) + len(p.delPeers) + len(p.delSubnets) + len(p.delHash)
	// A changed element is a delete plus an add of the same key.
	ch := 0
	for _, k := range p.delPeers {
		if _, ok := p.addPeers[k]; ok {
			ch++
		}
	}
	for _, k := range p.delSubnets {
		if _, ok := p.addSubnets[k]; ok {
			ch++
		}
	}
	for _, k := range p.delHash {
		if _, ok := p.addHash[k]; ok {
			ch++
		}
	}
	return a - ch, c + ch, r - ch
}

func diffMap[K comparable](cur, want map[K]uint32) (add map[K]uint32, del []K) {
	add = map[K]uint32{}
	for k, v := range want {
		if cv, ok := cur[k]; !ok || cv != v {
			add[k] = v
			if ok {
				del = append(del, k)
			}
		}
	}
	for k := range cur {
		if _, ok := want[k]; !ok {
			del = append(del, k)
		}
	}
	return add, del
}

// planNft computes the transaction that turns cur into want.
func planNft(cur, want *nftState) *nftPlan {
	p := &nftPlan{sig: want.sig, hashN: len(want.hash), seed: want.seed, lens: sortedLens(want.lens)}
	if !cur.table || cur.broken {
		p.recreate = true
		p.chain = true
		p.addLens = p.lens
		p.addVIPs = slices.Collect(maps.Keys(want.vips))
		p.addPeers = maps.Clone(want.peers)
		p.addSubnets = maps.Clone(want.subnets)
		p.addHash = maps.Clone(want.hash)
		return p
	}
	for l := range want.lens {
		if _, ok := cur.lens[l]; !ok {
			p.addLens = append(p.addLens, l)
		}
	}
	for l := range cur.lens {
		if _, ok := want.lens[l]; !ok {
			p.delLens = append(p.delLens, l)
		}
	}
	// The signature names the lengths, so a chain that matches it has a
	// rule for every wanted map; a changed length set rebuilds it anyway.
	p.chain = cur.sig != want.sig || len(p.addLens)+len(p.delLens) > 0
	p.lensOnly = p.chain && want.base != "" && cur.sig == lensSig(want.base, cur.lens)
	for v := range want.vips {
		if _, ok := cur.vips[v]; !ok {
			p.addVIPs = append(p.addVIPs, v)
		}
	}
	for v := range cur.vips {
		if _, ok := want.vips[v]; !ok {
			p.delVIPs = append(p.delVIPs, v)
		}
	}
	p.addPeers, p.delPeers = diffMap(cur.peers, want.peers)
	p.addSubnets, p.delSubnets = diffMap(cur.subnets, want.subnets)
	p.addHash, p.delHash = diffMap(cur.hash, want.hash)
	return p
}

// applyPlan updates the model after the kernel accepted p.
func (s *nftState) applyPlan(p *nftPlan) {
	if p.recreate {
		*s = newKstate().nft
		s.table = true
	}
	if len(p.delLens) > 0 {
		// The kernel dropped a deleted map's elements with it, also any
		// the plan did not name (rare: lengths go seldom, so a scan is
		// fine).
		gone := map[plen]bool{}
		for _, l := range p.delLens {
			delete(s.lens, l)
			gone[l] = true
		}
		for pf := range s.subnets {
			if gone[plenOf(pf)] {
				delete(s.subnets, pf)
			}
		}
	}
	for _, l := range p.addLens {
		s.lens[l] = struct{}{}
	}
	if p.chain {
		s.sig = p.sig
	}
	for _, v := range p.delVIPs {
		delete(s.vips, v)
	}
	for _, v := range p.addVIPs {
		s.vips[v] = struct{}{}
	}
	for _, k := range p.delPeers {
		delete(s.peers, k)
	}
	maps.Copy(s.peers, p.addPeers)
	for _, k := range p.delSubnets {
		delete(s.subnets, k)
	}
	maps.Copy(s.subnets, p.addSubnets)
	for _, k := range p.delHash {
		delete(s.hash, k)
	}
	maps.Copy(s.hash, p.addHash)
}

func sortedAddrs(m map[netip.Addr]struct{}) []netip.Addr {
	out := slices.Collect(maps.Keys(m))
	slices.SortFunc(out, func(a, b netip.Addr) int { return a.Compare(b) })
	return out
}
