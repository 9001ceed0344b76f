package ipvs

import (
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"sort"
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

type svcDest struct {
	addr netip.Addr
	fwd  Forward
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
	c.rules = maps.Clone(s.rules)
	c.routes = maps.Clone(s.routes)
	c.svcs = maps.Clone(s.svcs)
	return &c
}

func chainSig(mode Mode, seed uint32, n int) string {
	return fmt.Sprintf("td2 mode=%s seed=%#x n=%d", mode, effectiveSeed(seed), n)
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
			t.rules[ruleKey{v6, c.fwmark(n.Mark), tbl}] = struct{}{}
			if mode == ModeIPVS {
				t.svcs[svcKey{v6, c.ikeMark(n.Mark)}] = svcDest{a, n.Forward}
			}
		}
	}
	slices.Sort(active)
	for i, m := range active {
		t.nft.hash[uint32(i)] = c.fwmark(m)
	}
	t.nft.sig = chainSig(mode, d.HashSeed, len(active))
	t.nft.seed = d.HashSeed
	for _, v := range d.VIPs {
		t.nft.vips[v.Unmap()] = struct{}{}
	}
	for a, m := range d.Peers {
		if !known[m] {
			return nil, fmt.Errorf("peer %s: owner mark %d is not a node", a, m)
		}
		t.nft.peers[a.Unmap()] = c.fwmark(m)
	}
	for p, m := range d.Subnets {
		if !known[m] {
			return nil, fmt.Errorf("subnet %s: owner mark %d is not a node", p, m)
		}
		t.nft.subnets[p.Masked()] = c.fwmark(m)
	}
	return t, nil
}

// nftPlan is one nftables transaction.
type nftPlan struct {
	// recreate deletes the table (if present) and creates it with its sets
	// and chain in the same transaction; the element lists then carry the
	// whole content.
	recreate bool
	// chain rebuilds the chain's rules (flush + add) with sig.
	chain bool
	sig   string
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
	return !p.recreate && !p.chain && len(p.addVIPs)+len(p.delVIPs)+len(p.addPeers)+len(p.delPeers)+
		len(p.addSubnets)+len(p.delSubnets)+len(p.addHash)+len(p.delHash) == 0
}

// count returns the plan's element changes as added, changed, removed.
func (p *nftPlan) count() (a, c, r int) {
	if p.chain || p.recreate {
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
	p := &nftPlan{sig: want.sig, hashN: len(want.hash), seed: want.seed}
	if !cur.table || cur.broken {
		p.recreate = true
		p.chain = true
		p.addVIPs = slices.Collect(maps.Keys(want.vips))
		p.addPeers = maps.Clone(want.peers)
		p.addSubnets = maps.Clone(want.subnets)
		p.addHash = maps.Clone(want.hash)
		return p
	}
	p.chain = cur.sig != want.sig
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
		*s = nftState{table: true, vips: map[netip.Addr]struct{}{}, peers: map[netip.Addr]uint32{},
			subnets: map[netip.Prefix]uint32{}, hash: map[uint32]uint32{}}
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

func sortedPrefixes[V any](m map[netip.Prefix]V) []netip.Prefix {
	out := slices.Collect(maps.Keys(m))
	sort.Slice(out, func(i, j int) bool { return out[i].Addr().Less(out[j].Addr()) })
	return out
}
