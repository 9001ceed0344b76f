package nft

import (
	"iter"
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
	// Chain rebuilds the chain's rules (flush + add) from Sig.
	Chain bool
	// Sig is the chain's signature after the plan.
	Sig Signature
	// AddLens / DelLens create and delete per-length subnet maps, each
	// with its rule in the classifier (unless Chain rebuilds them all); a
	// deleted map's elements go with it.
	AddLens, DelLens []Len

	AddVIPs, DelVIPs []netip.Addr
	// AddPeers and AddSubnets may be the very maps of the target the
	// plan was made for (a first load, a recreation): once made, a plan
	// is read, applied and dropped before that target changes.
	AddPeers   PeerMap
	DelPeers   []netip.Addr
	AddSubnets SubnetMap
	DelSubnets []netip.Prefix
	AddHash    map[uint32]uint32
	DelHash    []uint32
	// Digest, when set, replaces the digest set's element: the Digest of
	// the peer and subnet maps once the plan is applied (WithDigest).
	Digest *Digest
	// Sizes are the sizes of the peer and subnet maps the plan creates
	// (every one on Recreate, AddLens' otherwise), by set name.
	Sizes map[string]uint32
	// Grown says the table is recreated because the target no longer
	// fits a map's size.
	Grown bool
	// Left, set by Update, holds the values the model held for the
	// peers the plan deletes or changes: the marks of the nodes those
	// peers leave. The model may share its maps with the target (see
	// State.Share), and Update has changed the target, so after Update
	// the model's maps no longer say where a moved peer was.
	Left map[uint32]struct{}
	// counts, when set, is what Count reports (a grown plan's changes).
	counts *[3]int
	// update, set by Update, is the model's digest before the plan and
	// the share in it of the elements DelPeers and DelSubnets delete:
	// Update looked their values up anyway, and WithDigest need not
	// again (a node failure at a million tunnels deletes 200,000), nor
	// could it in a model sharing the target's maps.
	update *updateDigest
}

// updateDigest is what Update knows of the model's digest.
type updateDigest struct {
	base, dropped Digest
}

// Empty reports whether p changes nothing.
func (p *Plan) Empty() bool {
	return !p.Recreate && !p.Chain && len(p.AddLens)+len(p.DelLens)+len(p.AddVIPs)+len(p.DelVIPs)+p.AddPeers.Len()+len(p.DelPeers)+
		p.AddSubnets.Len()+len(p.DelSubnets)+len(p.AddHash)+len(p.DelHash) == 0 && p.Digest == nil
}

// Count returns the plan's element changes as added, changed, removed.
func (p *Plan) Count() (a, c, r int) {
	if p.counts != nil {
		return p.counts[0], p.counts[1], p.counts[2]
	}
	if p.Recreate || p.Chain {
		c++
	}
	a += len(p.AddVIPs) + p.AddPeers.Len() + p.AddSubnets.Len() + len(p.AddHash)
	r += len(p.DelVIPs) + len(p.DelPeers) + len(p.DelSubnets) + len(p.DelHash)
	// A changed element is a delete plus an add of the same key.
	ch := 0
	for _, k := range p.DelPeers {
		if _, ok := p.AddPeers.Get(k); ok {
			ch++
		}
	}
	for _, k := range p.DelSubnets {
		if _, ok := p.AddSubnets.Get(k); ok {
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

// elemMap is what PeerMap and SubnetMap share for a comparison.
type elemMap[K any] interface {
	Len() int
	Get(K) (uint32, bool)
	Set(K, uint32) bool
	All() iter.Seq2[K, uint32]
}

// diffElems is diffMap for the big maps.
func diffElems[K any, M any, PM interface {
	*M
	elemMap[K]
}](cur, want PM) (add M, del []K) {
	if cur.Len() == 0 {
		// Everything is new (a first load, a fresh backup's): the
		// plan reads want's map itself (see Plan.AddPeers).
		return *(*M)(want), nil
	}
	for k, v := range want.All() {
		if cv, ok := cur.Get(k); !ok || cv != v {
			PM(&add).Set(k, v)
			if ok {
				del = append(del, k)
			}
		}
	}
	for k := range cur.All() {
		if _, ok := want.Get(k); !ok {
			del = append(del, k)
		}
	}
	return add, del
}

// Diff computes the transaction that turns cur into want.
func Diff(cur, want *State) *Plan {
	if !cur.Table || cur.Broken || cur.Unread {
		return recreate(want)
	}
	p := &Plan{Sig: want.Sig}
	p.AddLens, p.DelLens = keysNotIn(want.Lens, cur.Lens), keysNotIn(cur.Lens, want.Lens)
	p.sizeNewLens(want)
	p.Chain = needsRebuild(cur, want.Sig)
	p.AddVIPs, p.DelVIPs = keysNotIn(want.VIPs, cur.VIPs), keysNotIn(cur.VIPs, want.VIPs)
	if !cur.SharesMaps(want) {
		// (Shared maps are one: nothing to compare. A restarted
		// director that adopted the kernel by its digest has them.)
		p.AddPeers, p.DelPeers = diffElems[netip.Addr](&cur.Peers, &want.Peers)
		p.AddSubnets, p.DelSubnets = diffElems[netip.Prefix](&cur.Subnets, &want.Subnets)
	}
	p.AddHash, p.DelHash = diffMap(cur.Hash, want.Hash)
	if overfills(cur, want) {
		return grown(p, want)
	}
	return p
}

// needsRebuild reports whether the chain of cur must be rebuilt for sig:
// when they were built from another signature, or their subnet rules are
// not those of cur's maps (lengths that appear or go otherwise add or
// delete their rule alone).
func needsRebuild(cur *State, sig Signature) bool {
	return !cur.Sig.sameButLens(sig) || !slices.Equal(cur.Sig.Lens, SortedLens(cur.Lens))
}

// recreate is the transaction that replaces the table with want.
func recreate(want *State) *Plan {
	p := &Plan{Sig: want.Sig, Recreate: true, Chain: true, Sizes: map[string]uint32{}}
	p.AddLens = SortedLens(want.Lens)
	p.AddVIPs = slices.Collect(maps.Keys(want.VIPs))
	// want's own maps (see Plan.AddPeers): a copy of a million
	// elements cost a second.
	p.AddPeers, p.AddSubnets = want.Peers, want.Subnets
	p.AddHash = maps.Clone(want.Hash)
	want.targetCounts(func(name string, n int) { p.Sizes[name] = MapSize(n) })
	return p
}

// grown is the recreation of the table for want in place of p, whose
// target overfills a map; it counts p's changes, not a whole table's.
func grown(p *Plan, want *State) *Plan {
	g := recreate(want)
	g.Grown = true
	a, c, r := p.Count()
	g.counts = &[3]int{a, c, r}
	return g
}

// sizeNewLens sizes the subnet maps p creates for want's subnets.
func (p *Plan) sizeNewLens(want *State) {
	for _, l := range p.AddLens {
		if p.Sizes == nil {
			p.Sizes = map[string]uint32{}
		}
		p.Sizes[l.SetName()] = MapSize(want.cnt[b2i(l.V6)][l.Bits])
	}
}

// Changes is a delta to a target's maps: what tunnel changes need, and
// bucket changes of the unknown-peer hash map (within the chain's HashN).
type Changes struct {
	// SetPeers and SetSubnets map keys to their owner's mark; Value
	// (required when either is set) turns a mark into the element's
	// value (the fwmark). The caller's maps are taken as they are: an
	// import of a million tunnels is one delta, and a converted copy of
	// it was a second map of millions.
	SetPeers   map[netip.Addr]uint16
	DelPeers   []netip.Addr
	SetSubnets map[netip.Prefix]uint16
	DelSubnets []netip.Prefix
	Value      func(mark uint16) uint32
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
// and rebuilds the chain in the same transaction. model's peers and
// subnets must be want's, as every transaction the plans describe leaves
// them (they may be the very same maps, see State.Share): the plan covers
// the keys c touches, no others.
func Update(model, want *State, c Changes) *Plan {
	// A key set with a new value is deleted first: a node failure's
	// moves delete as many keys as they set. Only keys the model holds
	// can be (an import into a small table deletes next to nothing).
	p := &Plan{Sig: model.Sig, AddPeers: NewPeerMap(len(c.SetPeers)), AddSubnets: NewSubnetMap(len(c.SetSubnets)),
		AddHash: map[uint32]uint32{}, Left: map[uint32]struct{}{},
		DelPeers:   make([]netip.Addr, 0, len(c.DelPeers)+min(len(c.SetPeers), model.Peers.Len())),
		DelSubnets: make([]netip.Prefix, 0, len(c.DelSubnets)+min(len(c.SetSubnets), model.Subnets.Len()))}
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
	// The plan is computed from model before want changes (model may
	// share want's maps): a key deleted and set again in one delta must
	// be deleted and added, even with its old value.
	u := &updateDigest{base: model.Digest()}
	dropped := &u.dropped
	// The values of DelPeers, for Left.
	was := make([]uint32, 0, cap(p.DelPeers))
	dropPeer := func(a netip.Addr, v uint32) {
		p.DelPeers = append(p.DelPeers, a)
		was = append(was, v)
		dropped.Sum += model.Peers.hash(a, v)
		dropped.N++
	}
	dropSubnet := func(pf netip.Prefix, v uint32) {
		p.DelSubnets = append(p.DelSubnets, pf)
		dropped.Sum += model.Subnets.hash(pf, v)
		dropped.N++
	}
	delPeer := make(map[netip.Addr]struct{}, len(c.DelPeers))
	for _, a := range c.DelPeers {
		a = a.Unmap()
		if _, dup := delPeer[a]; dup {
			continue
		}
		if v, ok := model.Peers.Get(a); ok {
			dropPeer(a, v)
			delPeer[a] = struct{}{}
		}
	}
	delSub := make(map[netip.Prefix]struct{}, len(c.DelSubnets))
	for _, pf := range c.DelSubnets {
		pf = pf.Masked()
		if _, dup := delSub[pf]; dup {
			continue
		}
		if v, ok := model.Subnets.Get(pf); ok {
			dropSubnet(pf, v)
			delSub[pf] = struct{}{}
		}
	}
	// The keys of SetPeers and SetSubnets are the table's, unmapped and
	// masked already, so no two of them are one key here.
	for a, m := range c.SetPeers {
		a, fm := a.Unmap(), c.Value(m)
		cur, ok := model.Peers.Get(a)
		_, del := delPeer[a]
		if ok && !del {
			if cur == fm {
				continue
			}
			dropPeer(a, cur)
		}
		p.AddPeers.Set(a, fm)
	}
	for pf, m := range c.SetSubnets {
		pf, fm := pf.Masked(), c.Value(m)
		cur, ok := model.Subnets.Get(pf)
		_, del := delSub[pf]
		if ok && !del {
			if cur == fm {
				continue
			}
			dropSubnet(pf, cur)
		}
		p.AddSubnets.Set(pf, fm)
	}
	p.update = u
	for i, a := range p.DelPeers {
		// A peer deleted and set again with its value stays.
		if v, ok := p.AddPeers.Get(a); !ok || v != was[i] {
			p.Left[was[i]] = struct{}{}
		}
	}
	// What the kernel gains, want gains too (keys new to both).
	want.Peers.GrowFor(&p.AddPeers)
	want.Subnets.GrowFor(&p.AddSubnets)
	for _, a := range c.DelPeers {
		want.Peers.Delete(a.Unmap())
	}
	// The lengths the delta touches, [IPv6][bits]: an array, as every
	// subnet of the delta marks one.
	var touched [2][129]bool
	touch := func(pf netip.Prefix) {
		if pf.IsValid() {
			touched[b2i(pf.Addr().Is6())][pf.Bits()] = true
		}
	}
	for _, pf := range c.DelSubnets {
		pf = pf.Masked()
		want.DelSubnet(pf)
		touch(pf)
	}
	for a, m := range c.SetPeers {
		want.Peers.Set(a.Unmap(), c.Value(m))
	}
	for pf, m := range c.SetSubnets {
		pf = pf.Masked()
		want.AddSubnet(pf, c.Value(m))
		touch(pf)
	}
	some := false
	for v6, bits := range touched {
		for b, t := range bits {
			if !t {
				continue
			}
			some = true
			l := Len{V6: v6 == 1, Bits: b}
			_, w := want.Lens[l]
			_, h := model.Lens[l]
			if w && !h {
				p.AddLens = append(p.AddLens, l)
			} else if h && !w {
				p.DelLens = append(p.DelLens, l)
			}
		}
	}
	if some {
		want.SyncLens()
	}
	if c.Nodes {
		// The caller replaced want's hash map for new nodes: at most
		// MaxHash elements, compared whole.
		p.AddHash, p.DelHash = diffMap(model.Hash, want.Hash)
	}
	if len(p.AddLens)+len(p.DelLens) > 0 || !model.Sig.Equal(want.Sig) {
		p.Chain = needsRebuild(model, want.Sig)
		p.Sig = want.Sig
	}
	if overfills(model, want) {
		// O(the table), once per growth by half of a map.
		g := grown(p, want)
		g.Left = p.Left
		return g
	}
	p.sizeNewLens(want)
	return p
}

// WithDigest sets p.Digest to the digest of model's maps after p when the
// kernel does not store that digest already: O(the plan's elements).
func (p *Plan) WithDigest(model *State) {
	if p.Recreate {
		d := Digest{Sum: p.AddPeers.sum + p.AddSubnets.sum, N: uint64(p.AddPeers.Len() + p.AddSubnets.Len())}
		p.Digest = &d
		return
	}
	if p.update != nil {
		// The model held what the target held before Update, so a
		// length the plan deletes lost every element it had in the
		// model to DelSubnets: they are in dropped.
		d := p.update.base
		d.Sum += p.AddPeers.sum + p.AddSubnets.sum - p.update.dropped.Sum
		d.N += uint64(p.AddPeers.Len()+p.AddSubnets.Len()) - p.update.dropped.N
		if !model.HasStored || model.Stored != d {
			p.Digest = &d
		}
		return
	}
	d := model.Digest()
	gone := map[Len]bool{}
	for _, l := range p.DelLens {
		gone[l] = true
	}
	for _, k := range p.DelPeers {
		if v, ok := model.Peers.Get(k); ok {
			d.Sum -= model.Peers.hash(k, v)
			d.N--
		}
	}
	deleted := make(map[netip.Prefix]bool, len(p.DelSubnets))
	for _, k := range p.DelSubnets {
		if v, ok := model.Subnets.Get(k); ok && !deleted[k] {
			deleted[k] = true
			d.Sum -= model.Subnets.hash(k, v)
			d.N--
		}
	}
	if len(gone) > 0 {
		// A deleted map takes its elements with it, named or not.
		for k, v := range model.Subnets.All() {
			if gone[LenOf(k)] && !deleted[k] {
				d.Sum -= model.Subnets.hash(k, v)
				d.N--
			}
		}
	}
	for k, v := range p.AddPeers.All() {
		d.Sum += model.Peers.hash(k, v)
		d.N++
	}
	for k, v := range p.AddSubnets.All() {
		d.Sum += model.Subnets.hash(k, v)
		d.N++
	}
	if !model.HasStored || model.Stored != d {
		p.Digest = &d
	}
}

// addAll sets add's elements in m: into an empty m, as a copy of add
// (much cheaper than key by key for a first load of millions).
func addAll[K any, M any, PM interface {
	*M
	elemMap[K]
	GrowFor(*M)
}](m, add PM, clone func(PM) M) {
	if m.Len() == 0 {
		*m = clone(add)
		return
	}
	m.GrowFor((*M)(add))
	for k, v := range add.All() {
		m.Set(k, v)
	}
}

// Apply updates s after the kernel accepted p.
func (s *State) Apply(p *Plan) {
	gone := s.applyTable(p)
	if len(gone) > 0 {
		// The kernel dropped a deleted map's elements with it, also any
		// the plan did not name (rare: lengths go seldom, so a scan is
		// fine).
		s.Subnets.DeleteLens(gone)
	}
	// A key the plan deletes and adds again (a move) is overwritten:
	// one operation on the large map instead of two.
	for _, k := range p.DelPeers {
		if _, again := p.AddPeers.Get(k); !again {
			s.Peers.Delete(k)
		}
	}
	addAll(&s.Peers, &p.AddPeers, (*PeerMap).Clone)
	for _, k := range p.DelSubnets {
		if _, again := p.AddSubnets.Get(k); !again {
			s.Subnets.Delete(k)
		}
	}
	addAll(&s.Subnets, &p.AddSubnets, (*SubnetMap).Clone)
}

// ApplyTo is Apply for a plan made to bring s to want (by Diff(s, want) or
// Update(s, want, ...)): s then shares want's peer and subnet maps
// (Share) instead of making its own equal to them.
func (s *State) ApplyTo(p *Plan, want *State) {
	s.applyTable(p)
	s.Share(want)
}

// applyTable updates s for p but for the peer and subnet elements, and
// returns the lengths whose maps p deletes.
func (s *State) applyTable(p *Plan) (gone map[Len]bool) {
	if p.Recreate {
		*s = *NewState()
		s.Table = true
	}
	maps.Copy(s.Sizes, p.Sizes)
	if len(p.DelLens) > 0 {
		gone = map[Len]bool{}
		for _, l := range p.DelLens {
			delete(s.Lens, l)
			delete(s.Sizes, l.SetName())
			gone[l] = true
		}
	}
	for _, l := range p.AddLens {
		s.Lens[l] = struct{}{}
	}
	if p.Chain || len(p.AddLens)+len(p.DelLens) > 0 {
		s.Sig = p.Sig
		s.Sig.Lens = slices.Clone(p.Sig.Lens)
	}
	for _, v := range p.DelVIPs {
		delete(s.VIPs, v)
	}
	for _, v := range p.AddVIPs {
		s.VIPs[v] = struct{}{}
	}
	for _, k := range p.DelHash {
		delete(s.Hash, k)
	}
	maps.Copy(s.Hash, p.AddHash)
	if p.Digest != nil {
		s.Stored, s.HasStored = *p.Digest, true
	}
	return gone
}
