package nft

import (
	"maps"
	"net/netip"
	"slices"
)

// Plan is one nftables transaction.
type Plan struct {
	// Recreate deletes the table (if present) and creates it with its sets
	// and chain in the same transaction; the element lists then carry the
	// whole content.
	Recreate bool
	// Chain rebuilds the chain's rules (flush + add) from Sig. LensOnly
	// says the rebuild is only for lengths that appear or go: internal
	// structure, not a change Count reports.
	Chain    bool
	LensOnly bool
	Sig      Signature
	// AddLens / DelLens create and delete per-length subnet maps; a
	// deleted map's elements go with it.
	AddLens, DelLens []Len

	AddVIPs, DelVIPs []netip.Addr
	AddPeers         map[netip.Addr]uint32
	DelPeers         []netip.Addr
	AddSubnets       map[netip.Prefix]uint32
	DelSubnets       []netip.Prefix
	AddHash          map[uint32]uint32
	DelHash          []uint32
}

// Empty reports whether p changes nothing.
func (p *Plan) Empty() bool {
	return !p.Recreate && !p.Chain && len(p.AddLens)+len(p.DelLens)+len(p.AddVIPs)+len(p.DelVIPs)+len(p.AddPeers)+len(p.DelPeers)+
		len(p.AddSubnets)+len(p.DelSubnets)+len(p.AddHash)+len(p.DelHash) == 0
}

// Count returns the plan's element changes as added, changed, removed.
func (p *Plan) Count() (a, c, r int) {
	if p.Recreate || p.Chain && !p.LensOnly {
		c++
	}
	a += len(p.AddVIPs) + len(p.AddPeers) + len(p.AddSubnets) + len(p.AddHash)
	r += len(p.DelVIPs) + len(p.DelPeers) + len(p.DelSubnets) + len(p.DelHash)
	// A changed element is a delete plus an add of the same key.
	ch := 0
	for _, k := range p.DelPeers {
		if _, ok := p.AddPeers[k]; ok {
			ch++
		}
	}
	for _, k := range p.DelSubnets {
		if _, ok := p.AddSubnets[k]; ok {
			ch++
		}
	}
	for _, k := range p.DelHash {
		if _, ok := p.AddHash[k]; ok {
			ch++
		}
	}
	return a - ch, c + ch, r - ch
}

// keysNotIn lists the keys of a that b lacks (nil when none).
func keysNotIn[K comparable, V any](a, b map[K]V) []K {
	var out []K
	for k := range a {
		if _, ok := b[k]; !ok {
			out = append(out, k)
		}
	}
	return out
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

// Diff computes the transaction that turns cur into want.
func Diff(cur, want *State) *Plan {
	p := &Plan{Sig: want.Sig}
	if !cur.Table || cur.Broken {
		p.Recreate = true
		p.Chain = true
		p.AddLens = SortedLens(want.Lens)
		p.AddVIPs = slices.Collect(maps.Keys(want.VIPs))
		p.AddPeers = maps.Clone(want.Peers)
		p.AddSubnets = maps.Clone(want.Subnets)
		p.AddHash = maps.Clone(want.Hash)
		return p
	}
	p.AddLens, p.DelLens = keysNotIn(want.Lens, cur.Lens), keysNotIn(cur.Lens, want.Lens)
	// The signature names the lengths, so a chain that matches it has a
	// rule for every wanted map; a changed length set rebuilds it anyway.
	p.Chain = !cur.Sig.Equal(want.Sig) || len(p.AddLens)+len(p.DelLens) > 0
	p.LensOnly = p.Chain && cur.Sig.Version == Layout && cur.Sig.sameButLens(want.Sig)
	p.AddVIPs, p.DelVIPs = keysNotIn(want.VIPs, cur.VIPs), keysNotIn(cur.VIPs, want.VIPs)
	p.AddPeers, p.DelPeers = diffMap(cur.Peers, want.Peers)
	p.AddSubnets, p.DelSubnets = diffMap(cur.Subnets, want.Subnets)
	p.AddHash, p.DelHash = diffMap(cur.Hash, want.Hash)
	return p
}

// Changes is a delta to a target's maps: what tunnel changes need, and
// bucket changes of the unknown-peer hash map (within the chain's HashN).
type Changes struct {
	SetPeers   map[netip.Addr]uint32
	DelPeers   []netip.Addr
	SetSubnets map[netip.Prefix]uint32
	DelSubnets []netip.Prefix
	SetHash    map[uint32]uint32
	DelHash    []uint32
	// Nodes says the caller set want's hash map and signature for a new
	// set of nodes: Update compares the hash map whole and rebuilds the
	// chain when the signature changed.
	Nodes bool
}

// Update applies c to want and returns the transaction that brings model
// (what the kernel holds) along, in O(len(c)) plus the hash map's few
// elements and the chain's signature: only the touched lengths are
// compared, and a length that appears or goes creates or deletes its map
// and rebuilds the chain in the same transaction.
func Update(model, want *State, c Changes) *Plan {
	p := &Plan{Sig: model.Sig, AddPeers: make(map[netip.Addr]uint32, len(c.SetPeers)), AddSubnets: make(map[netip.Prefix]uint32, len(c.SetSubnets)),
		AddHash: map[uint32]uint32{}}
	// Buckets: a step changes up to all of them, so deletions are
	// tracked in a set rather than searched.
	hdel := make(map[uint32]bool, len(c.DelHash))
	for _, k := range c.DelHash {
		delete(want.Hash, k)
		if _, ok := model.Hash[k]; ok && !hdel[k] {
			p.DelHash = append(p.DelHash, k)
			hdel[k] = true
		}
	}
	for k, fm := range c.SetHash {
		want.Hash[k] = fm
		cur, ok := model.Hash[k]
		if ok && cur == fm {
			continue
		}
		if ok && !hdel[k] {
			p.DelHash = append(p.DelHash, k)
			hdel[k] = true
		}
		p.AddHash[k] = fm
	}
	// Peers and subnets likewise (a node going down at a million
	// tunnels moves 60,000 of them).
	delPeer := make(map[netip.Addr]struct{}, len(c.DelPeers))
	for _, a := range c.DelPeers {
		a = a.Unmap()
		delete(want.Peers, a)
		if _, ok := model.Peers[a]; ok {
			p.DelPeers = append(p.DelPeers, a)
			delPeer[a] = struct{}{}
		}
	}
	delSub := make(map[netip.Prefix]struct{}, len(c.DelSubnets))
	for _, pf := range c.DelSubnets {
		pf = pf.Masked()
		want.DelSubnet(pf)
		if _, ok := model.Subnets[pf]; ok {
			p.DelSubnets = append(p.DelSubnets, pf)
			delSub[pf] = struct{}{}
		}
	}
	for a, fm := range c.SetPeers {
		a = a.Unmap()
		want.Peers[a] = fm
		cur, ok := model.Peers[a]
		if ok && cur == fm {
			continue
		}
		if _, del := delPeer[a]; ok && !del {
			p.DelPeers = append(p.DelPeers, a)
		}
		p.AddPeers[a] = fm
	}
	for pf, fm := range c.SetSubnets {
		pf = pf.Masked()
		want.AddSubnet(pf, fm)
		cur, ok := model.Subnets[pf]
		if ok && cur == fm {
			continue
		}
		if _, del := delSub[pf]; ok && !del {
			p.DelSubnets = append(p.DelSubnets, pf)
		}
		p.AddSubnets[pf] = fm
	}
	touched := map[Len]struct{}{}
	for _, pf := range c.DelSubnets {
		touched[LenOf(pf.Masked())] = struct{}{}
	}
	for pf := range c.SetSubnets {
		touched[LenOf(pf.Masked())] = struct{}{}
	}
	for l := range touched {
		_, w := want.Lens[l]
		_, h := model.Lens[l]
		if w && !h {
			p.AddLens = append(p.AddLens, l)
		} else if h && !w {
			p.DelLens = append(p.DelLens, l)
		}
	}
	if len(touched) > 0 {
		want.SyncLens()
	}
	if c.Nodes {
		// The caller replaced want's hash map for new nodes: at most
		// MaxHash elements, compared whole.
		p.AddHash, p.DelHash = diffMap(model.Hash, want.Hash)
	}
	if len(p.AddLens)+len(p.DelLens) > 0 || !model.Sig.Equal(want.Sig) {
		p.Chain = true
		p.LensOnly = model.Sig.Version == Layout && model.Sig.sameButLens(want.Sig)
		p.Sig = want.Sig
	}
	return p
}

// Apply updates s after the kernel accepted p.
func (s *State) Apply(p *Plan) {
	if p.Recreate {
		*s = *NewState()
		s.Table = true
	}
	if len(p.DelLens) > 0 {
		// The kernel dropped a deleted map's elements with it, also any
		// the plan did not name (rare: lengths go seldom, so a scan is
		// fine).
		gone := map[Len]bool{}
		for _, l := range p.DelLens {
			delete(s.Lens, l)
			gone[l] = true
		}
		for pf := range s.Subnets {
			if gone[LenOf(pf)] {
				delete(s.Subnets, pf)
			}
		}
	}
	for _, l := range p.AddLens {
		s.Lens[l] = struct{}{}
	}
	if p.Chain {
		s.Sig = p.Sig
		s.Sig.Lens = slices.Clone(p.Sig.Lens)
	}
	for _, v := range p.DelVIPs {
		delete(s.VIPs, v)
	}
	for _, v := range p.AddVIPs {
		s.VIPs[v] = struct{}{}
	}
	for _, k := range p.DelPeers {
		delete(s.Peers, k)
	}
	maps.Copy(s.Peers, p.AddPeers)
	for _, k := range p.DelSubnets {
		delete(s.Subnets, k)
	}
	maps.Copy(s.Subnets, p.AddSubnets)
	for _, k := range p.DelHash {
		delete(s.Hash, k)
	}
	maps.Copy(s.Hash, p.AddHash)
}
