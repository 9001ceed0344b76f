package ipvs

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"time"

	"github.com/vishvananda/netns"

	"github.com/tunneldirector/tunneldirector/ipvs/lvs"
	"github.com/tunneldirector/tunneldirector/ipvs/nft"
	"github.com/tunneldirector/tunneldirector/ipvs/route"
)

var _ Dataplane = (*dataplane)(nil)

// dataplane is the Dataplane over one seam per kernel facility.
type dataplane struct {
	cfg  Config
	rc   route.Config
	mode Mode
	nft  nft.Kernel
	rt   route.Kernel
	lvs  lvs.Kernel // nil on a kernel without IPVS, and in route-only mode
	// model is what the director believes the kernel holds; nil until
	// the first Sync adopts the kernel's state.
	model *kstate
	// want is the target of the last Sync plus the Updates since.
	want *kstate
	// nodes of the last Sync by mark, to validate delta owners.
	nodes map[uint16]Node
	// gen is the nftables ruleset generation at which model.nft was
	// last known to equal the kernel (genKnown): while the kernel's
	// generation stays there, nobody changed the table and Verify need
	// not read its maps back. verifies counts Verify calls, so every
	// fullVerifyEvery-th reads them anyway.
	gen      uint32
	genKnown bool
	verifies int
	// readTook is how long the last background read ran, readDone
	// when a Verify took it: the periodic full read waits readDuty
	// times readTook after the last one.
	readDone time.Time
	readTook time.Duration
	// now is the clock (time.Now; tests step their own).
	now func() time.Time
	// adopted counts first Syncs that took the maps from the digest
	// instead of reading them back; reloaded those that replaced maps
	// differing from the target and holding over reloadOver elements
	// without reading them.
	adopted, reloaded int
	reloadOver        uint64
	// pending is the background read of the nftables table a Verify
	// started (nil: none). Transactions go on while it runs; the keys
	// they touch (touched) are taken from the model when the read
	// arrives, as the read may have seen them before or after; a
	// transaction that changed the table's structure (shape) discards it.
	pending <-chan nft.ReadResult
	touched touchedKeys
	// buckets is the unknown-peer bucket count of the last Sync, 0 when
	// it had no Buckets (one bucket per active node): a delta may change
	// buckets only within it. bucketMarks are the buckets as of the last
	// Sync and the Updates since (nil without), for a delta that changes
	// the nodes.
	buckets     int
	bucketMarks []uint16
}

// fullVerifyEvery is how often Verify reads the maps back although the
// ruleset generation says nothing changed: the backstop for a foreign
// transaction committed between one of the director's and its reading of
// the generation.
const fullVerifyEvery = 10

// readDuty bounds the periodic full read to a share of the time: the next
// one waits readDuty times as long as the last one took. At a million
// tunnels a read keeps a core busy for a minute or two (the kernel walks a
// set's hash from the start for every dump message), and every
// fullVerifyEvery verifies at the default 30 s would have kept it busy a
// third of the time; a foreign change (the generation moved) is still
// read at once.
const readDuty = 10

// reloadOver is the size of the maps (elements) above which a first Sync
// that finds them different from its target replaces the table in one
// transaction instead of reading the maps back: the kernel re-walks a
// set's hash for every dump message, so a read of 100,000 elements takes
// about 0.6 s and one of 2,000,000 over two minutes, while loading them
// takes seconds. Packets see the old table until the new one commits.
const reloadOver = 200_000

// maxConfirm bounds how many elements a read lacks that confirmMissed
// asks for one by one.
const maxConfirm = 10000

// touchedKeys are what the director's transactions changed during a
// background read.
type touchedKeys struct {
	peers   map[netip.Addr]struct{}
	subnets map[netip.Prefix]struct{}
	hash    map[uint32]struct{}
	tx      bool // any transaction: the stored digest is the model's
	shape   bool // sets, chain or VIPs changed: the read is discarded
}

// note records the keys of a plan applied during a background read.
func (t *touchedKeys) note(p *nft.Plan) {
	t.tx = true
	if p.Recreate || p.Chain || len(p.AddLens)+len(p.DelLens)+len(p.AddVIPs)+len(p.DelVIPs) > 0 {
		t.shape = true
		return
	}
	for _, a := range p.DelPeers {
		t.peers[a] = struct{}{}
	}
	for a := range p.AddPeers.All() {
		t.peers[a] = struct{}{}
	}
	for _, pf := range p.DelSubnets {
		t.subnets[pf] = struct{}{}
	}
	for pf := range p.AddSubnets.All() {
		t.subnets[pf] = struct{}{}
	}
	for _, k := range p.DelHash {
		t.hash[k] = struct{}{}
	}
	for k := range p.AddHash {
		t.hash[k] = struct{}{}
	}
}

// overlay gives read the model's value of every touched key.
func (t *touchedKeys) overlay(read, model *nft.State) {
	for a := range t.peers {
		if v, ok := model.Peers.Get(a); ok {
			read.Peers.Set(a, v)
		} else {
			read.Peers.Delete(a)
		}
	}
	for pf := range t.subnets {
		if v, ok := model.Subnets.Get(pf); ok {
			read.Subnets.Set(pf, v)
		} else {
			read.Subnets.Delete(pf)
		}
	}
	for k := range t.hash {
		if v, ok := model.Hash[k]; ok {
			read.Hash[k] = v
		} else {
			delete(read.Hash, k)
		}
	}
	if t.tx {
		read.Stored, read.HasStored = model.Stored, model.HasStored
	}
}

// applyNft runs p as one transaction and keeps gen: known only when the
// generation moved by exactly this transaction.
func (d *dataplane) applyNft(p *nft.Plan) error {
	g0, err0 := d.nft.Gen()
	if err := d.nft.Apply(p); err != nil {
		d.genKnown = false
		return err
	}
	g1, err1 := d.nft.Gen()
	// Known only when the chain is unbroken: the generation was where
	// the model was last known to match, and moved by this transaction
	// alone (a foreign one before it must not be covered by it).
	d.gen, d.genKnown = g1, d.genKnown && g0 == d.gen && err0 == nil && err1 == nil && g1 == g0+1
	if d.pending != nil {
		d.touched.note(p)
	}
	return nil
}

// New returns a Dataplane for the kernel of the current network namespace.
// It probes IPVS (ModeAuto picks ModeIPVS when the kernel has it; Mode()
// says which mode is in force) and refuses to start when the configured mark
// range, routing tables or rule priority are used by objects the director
// does not own. In IPVS mode it sets net.ipv4.vs.expire_nodest_conn=1 (see
// ipvs/lvs).
func New(cfg Config) (Dataplane, error) {
	return newIn(cfg, 0)
}

// newIn wires the real kernel of namespace ns (0: the caller's) to a
// dataplane.
func newIn(cfg Config, ns netns.NsHandle) (*dataplane, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	nk, err := nft.Open(cfg.Table, ns)
	if err != nil {
		return nil, err
	}
	rk, err := route.Open(ns, cfg.InsideIface)
	if err != nil {
		nk.Close()
		return nil, err
	}
	var lk lvs.Kernel
	if cfg.Mode != ModeRouteOnly {
		lk, _, err = lvs.Open(ns)
		if errors.Is(err, lvs.ErrNoIPVS) {
			lk, err = nil, nil
		}
		if err != nil {
			nk.Close()
			rk.Close()
			return nil, fmt.Errorf("open IPVS: %w", err)
		}
	}
	dp, err := newDataplane(cfg, nk, rk, lk)
	if err != nil {
		nk.Close()
		rk.Close()
		if lk != nil {
			lk.Close()
		}
		return nil, err
	}
	return dp, nil
}

// newDataplane is the constructor over test seams; lk is nil on a kernel
// without IPVS.
func newDataplane(cfg Config, nk nft.Kernel, rk route.Kernel, lk lvs.Kernel) (*dataplane, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	mode := cfg.Mode
	switch mode {
	case ModeAuto:
		mode = ModeRouteOnly
		if lk != nil {
			mode = ModeIPVS
		}
	case ModeIPVS:
		if lk == nil {
			return nil, errors.New("mode ipvs: the kernel has no IPVS generic netlink family (load ip_vs)")
		}
	case ModeRouteOnly:
		// IPVS, if present, is not the director's in this mode.
		lk = nil
	}
	d := &dataplane{cfg: cfg, rc: cfg.routeConfig(), mode: mode, nft: nk, rt: rk, lvs: lk, reloadOver: reloadOver, now: time.Now}
	if err := d.rc.Foreign(rk); err != nil {
		return nil, err
	}
	return d, nil
}

func (d *dataplane) Mode() Mode { return d.mode }

// read returns the director's objects as the kernel holds them; with
// known set, the nftables part is known (the caller proved it current by
// the ruleset generation, or by the maps' digest).
func (d *dataplane) read(known *nft.State) (*kstate, error) {
	c := d.cfg
	s := &kstate{svcs: map[svcKey]svcDest{}, nft: known}
	var err error
	if known == nil {
		// The generation before the read: a change during it moves the
		// kernel past gen, so the next Verify reads again.
		g, gerr := d.nft.Gen()
		if s.nft, err = d.nft.Read(); err != nil {
			return nil, err
		}
		d.gen, d.genKnown = g, gerr == nil
	}
	if s.rt, err = d.rc.Read(d.rt); err != nil {
		return nil, err
	}
	if d.lvs != nil {
		svcs, err := d.lvs.Services()
		if err != nil {
			return nil, err
		}
		for _, sv := range svcs {
			if _, ok := c.NodeOf(sv.Mark); !ok || sv.Mark&IKEBit == 0 {
				continue
			}
			// A service whose destinations are not exactly one is not
			// what the director makes: the zero svcDest never equals a
			// target, so it is replaced.
			dst := svcDest{}
			if len(sv.Dests) == 1 {
				dst = svcDest{addr: sv.Dests[0].Addr, fwd: forwardOf(sv.Dests[0].Method), ops: sv.OnePacket}
			}
			s.svcs[svcKey{sv.V6, sv.Mark}] = dst
		}
	}
	return s, nil
}

// adopt returns what the kernel holds for a first Sync to want. The peer
// and subnet maps are not read back when the digest the director's last
// transaction stored with them equals want's: a restarted director then
// takes want's maps as the kernel's in O(1) kernel reads instead of
// dumping a million elements (minutes: the kernel restarts its hash walk
// for every dump message). What someone else changed in the maps while no
// director ran is found by a later Verify's full read (the generation
// check or every fullVerifyEvery verifies), as it is while one runs.
// Nor are they read when they differ and hold over reloadOver elements:
// the model then says so (Unread) and the Sync replaces the table.
func (d *dataplane) adopt(want *kstate) (*kstate, error) {
	g, gerr := d.nft.Gen()
	meta, err := d.nft.ReadMeta()
	if err != nil {
		return nil, err
	}
	intact := meta.Table && !meta.Broken && meta.HasStored
	switch {
	case intact && meta.Stored == want.nft.Digest():
		meta.Share(want.nft)
	case intact && meta.Stored.N > d.reloadOver:
		// The maps differ from the target (the director stopped
		// between a commit to its store and the kernel's, or the store
		// was restored) and are too large to read back: replace them.
		meta.Unread = true
	default:
		return d.read(nil)
	}
	s, err := d.read(meta)
	if err != nil {
		return nil, err
	}
	d.gen, d.genKnown = g, gerr == nil
	if meta.Unread {
		d.reloaded++
	} else {
		d.adopted++
	}
	return s, nil
}

// reconcile makes the kernel hold want, given that it holds cur, and
// returns what it changed. Additions go first in dependency order (IPVS
// needs the routes to accept a destination; the nft maps should only point
// at marks that already route), removals last in reverse order.
//
// An object the kernel refuses (a route to a node the director cannot
// reach, say) does not stop the others: its error is collected in failed
// and the rest is applied, so one unreachable node never leaves the farm
// unsteered; cur keeps saying what the kernel really holds, so the next
// Verify tries the failed objects again. Only a failed nftables
// transaction (the maps, all or nothing) is returned as err.
func (d *dataplane) reconcile(cur, want *kstate) (st Stats, failed []error, err error) {
	return d.reconcileMaps(cur, want, true)
}

// reconcileMaps is reconcile, comparing the nftables part only with maps
// (Verify leaves it out when the ruleset generation proved the model
// current: a comparison of the whole maps is what it avoids).
func (d *dataplane) reconcileMaps(cur, want *kstate, withMaps bool) (st Stats, failed []error, err error) {
	st, failed = d.addNodes(cur, want)
	// nftables: one transaction.
	p := &nft.Plan{}
	if withMaps {
		p = nft.Diff(cur.nft, want.nft)
		p.WithDigest(cur.nft)
	}
	if !p.Empty() {
		flush := leftMasq(cur, p)
		if err := d.applyNft(p); err != nil {
			return st, failed, err
		}
		a, ch, r := p.Count()
		st.Added += a
		st.Changed += ch
		st.Removed += r
		st.Reloaded += reloaded(p, a+ch)
		cur.nft.ApplyTo(p, want.nft)
		failed = append(failed, d.flushServices(cur, flush)...)
	} else if withMaps {
		// Equal maps (Diff compared them, or they are shared already):
		// one copy is enough, so a Sync or a full read that changed
		// nothing does not leave the model a second copy of the table.
		cur.nft.Share(want.nft)
	}
	n, f := d.removeNodes(cur, want)
	st.Removed += n
	return st, append(failed, f...), nil
}

// addNodes adds and changes the routes and IPVS services want has and cur
// lacks, updating cur: what must exist before the maps point at a node.
func (d *dataplane) addNodes(cur, want *kstate) (st Stats, failed []error) {
	n, f := d.rc.AddMissing(d.rt, cur.rt, want.rt)
	st.Added, st.Changed = n.Added, n.Changed
	failed = f
	for _, sk := range slices.SortedFunc(maps.Keys(want.svcs), svcKeyCmp) {
		dst := want.svcs[sk]
		old, ok := cur.svcs[sk]
		if ok && old == dst {
			continue
		}
		svc := d.service(sk, dst)
		var err error
		if ok {
			// Replace waits for the old service's connection entries to
			// go: a service adopted without one-packet scheduling must
			// not keep peers on stale entries.
			err = d.lvs.Replace(d.service(sk, old), svc)
		} else {
			err = d.lvs.Add(svc)
		}
		if err != nil {
			if ok {
				delete(cur.svcs, sk) // Replace may have removed it
			}
			failed = append(failed, fmt.Errorf("fwmark service %#x for node %s (%s, %s): %w", sk.mark, dst.addr, route.Family(sk.v6), dst.fwd, err))
			continue
		}
		if ok {
			st.Changed++
		} else {
			st.Added++
		}
		cur.svcs[sk] = dst
	}
	return st, failed
}

// removeNodes removes the services and routes cur has and want does not,
// updating cur: after the maps stopped pointing at them.
func (d *dataplane) removeNodes(cur, want *kstate) (removed int, failed []error) {
	for _, sk := range slices.SortedFunc(maps.Keys(cur.svcs), svcKeyCmp) {
		if _, ok := want.svcs[sk]; ok {
			continue
		}
		if err := d.lvs.Remove(d.service(sk, cur.svcs[sk])); err != nil {
			failed = append(failed, fmt.Errorf("delete fwmark service %#x (%s): %w", sk.mark, route.Family(sk.v6), err))
			continue
		}
		removed++
		delete(cur.svcs, sk)
	}
	n, f := d.rc.RemoveStale(d.rt, cur.rt, want.rt)
	return removed + n.Removed, append(failed, f...)
}

// reloaded is the elements a recreation loads besides the counted ones.
func reloaded(p *nft.Plan, counted int) int {
	if !p.Recreate {
		return 0
	}
	return max(0, p.AddPeers.Len()+p.AddSubnets.Len()-counted)
}

// service is the lvs form of one of the director's services.
func (d *dataplane) service(sk svcKey, dst svcDest) lvs.Service {
	return lvs.Service{V6: sk.v6, Mark: sk.mark, OnePacket: dst.ops,
		Dests: []lvs.Dest{{Addr: dst.addr, Method: methodOf(dst.fwd)}}}
}

// leftMasq returns the services (of cur) whose node a peer leaves in plan p
// while they keep connection entries (masq, no one-packet scheduling): the
// entries would keep the moved peer's IKE and NAT-T on the old node.
func leftMasq(cur *kstate, p *nft.Plan) []svcKey {
	if len(cur.svcs) == 0 {
		return nil
	}
	if p.Recreate && cur.nft.Table && (cur.nft.Unread || cur.nft.Broken) {
		// The table is replaced without its peers having been read:
		// any of them may move, so every masq service is flushed (one
		// pause of IKE and NAT-T at a restart that reloads the maps).
		var out []svcKey
		for sk, dst := range cur.svcs {
			if !dst.ops {
				out = append(out, sk)
			}
		}
		slices.SortFunc(out, svcKeyCmp)
		return out
	}
	marks := map[uint32]bool{}
	switch {
	case p.Left != nil:
		// An Update's plan: the model's maps may already be the
		// target's (nft.State.Share), so the plan says where its
		// peers were.
		for fm := range p.Left {
			marks[fm|IKEBit] = true
		}
	case p.Grown:
		// The maps are replaced whole: a moved peer is one whose
		// mark differs from the model's.
		for a, fm := range cur.nft.Peers.All() {
			if nm, ok := p.AddPeers.Get(a); !ok || nm != fm {
				marks[fm|IKEBit] = true
			}
		}
		fallthrough
	default:
		for _, a := range p.DelPeers {
			if fm, ok := cur.nft.Peers.Get(a); ok {
				if nm, _ := p.AddPeers.Get(a); nm == fm {
					continue
				}
				marks[fm|IKEBit] = true
			}
		}
	}
	var out []svcKey
	for m := range marks {
		for _, v6 := range []bool{false, true} {
			sk := svcKey{v6, m}
			if dst, ok := cur.svcs[sk]; ok && !dst.ops {
				out = append(out, sk)
			}
		}
	}
	slices.SortFunc(out, svcKeyCmp)
	return out
}

// flushServices drops the connection entries of the services sks by
// replacing each with itself (lvs.Replace): the peers that stay on the node
// re-create theirs with their next packet, the moved ones are scheduled by
// their new mark. IKE and NAT-T to that node pause while IPVS expires the
// entries; see README "Forwarding methods and moves".
func (d *dataplane) flushServices(cur *kstate, sks []svcKey) []error {
	var failed []error
	for _, sk := range sks {
		dst := cur.svcs[sk]
		if err := d.lvs.Replace(d.service(sk, dst), d.service(sk, dst)); err != nil {
			delete(cur.svcs, sk)
			failed = append(failed, fmt.Errorf("flush connection entries of fwmark service %#x (%s) after a move: %w", sk.mark, route.Family(sk.v6), err))
		}
	}
	return failed
}

func (d *dataplane) Sync(ctx context.Context, des *Desired) (Stats, error) {
	start := time.Now()
	if err := ctx.Err(); err != nil {
		return Stats{}, err
	}
	want, err := d.cfg.target(d.mode, des)
	if err != nil {
		return Stats{}, fmt.Errorf("sync: %w", err)
	}
	if d.model == nil {
		cur, err := d.adopt(want)
		if err != nil {
			return Stats{}, fmt.Errorf("sync: adopt kernel state: %w", err)
		}
		d.model = cur
	}
	d.want = want
	d.nodes = map[uint16]Node{}
	for _, n := range des.Nodes {
		d.nodes[n.Mark] = n
	}
	d.buckets = len(des.Buckets)
	d.bucketMarks = slices.Clone(des.Buckets)
	st, failed, err := d.reconcile(d.model, want)
	st.Duration = time.Since(start)
	if err != nil {
		// The model may no longer match the kernel; re-read next time.
		d.model = nil
		return st, fmt.Errorf("sync: %w", errors.Join(append(failed, err)...))
	}
	return st, partial("sync", failed)
}

func (d *dataplane) Update(ctx context.Context, delta *Delta) (Stats, error) {
	start := time.Now()
	if err := ctx.Err(); err != nil {
		return Stats{}, err
	}
	if d.want == nil || d.model == nil {
		return Stats{}, errors.New("update: no Sync yet (or the last one failed): nothing to apply a delta to")
	}
	c := d.cfg
	// Validate first: a refused delta must leave the target untouched.
	nodes := d.nodes
	if delta.Nodes != nil {
		nodes = make(map[uint16]Node, len(delta.Nodes))
		for _, n := range delta.Nodes {
			nodes[n.Mark] = n
		}
	}
	for a, m := range delta.SetPeers {
		if _, ok := nodes[m]; !ok {
			return Stats{}, fmt.Errorf("update: peer %s: owner mark %d is not a node", a, m)
		}
	}
	for pf, m := range delta.SetSubnets {
		if _, ok := nodes[m]; !ok {
			return Stats{}, fmt.Errorf("update: subnet %s: owner mark %d is not a node", pf, m)
		}
	}
	ch := nft.Changes{SetPeers: delta.SetPeers, DelPeers: delta.DeletePeers,
		SetSubnets: delta.SetSubnets, DelSubnets: delta.DeleteSubnets, Value: c.Fwmark}
	if len(delta.Buckets) > 0 {
		ch.SetHash = make(map[uint32]uint32, len(delta.Buckets))
	}
	for i, m := range delta.Buckets {
		if i < 0 || i >= d.buckets {
			return Stats{}, fmt.Errorf("update: unknown-peer bucket %d outside the %d of the last sync (a new bucket count needs a sync)", i, d.buckets)
		}
		// As in target: a bucket without a node holds no element.
		if _, ok := nodes[m]; ok && m != 0 {
			ch.SetHash[uint32(i)] = c.Fwmark(m)
		} else {
			ch.DelHash = append(ch.DelHash, uint32(i))
		}
	}
	var nt *kstate
	if delta.Nodes != nil {
		// The node-dependent part of a target (routes, services, hash
		// map, chain) for the buckets after the delta, without the
		// peer and subnet maps: O(nodes + buckets).
		var buckets []uint16
		if d.bucketMarks != nil {
			buckets = slices.Clone(d.bucketMarks)
			for i, m := range delta.Buckets {
				buckets[i] = m
			}
		}
		var err error
		if nt, err = c.target(d.mode, &Desired{Nodes: delta.Nodes, HashSeed: d.want.nft.Sig.Seed, Buckets: buckets}); err != nil {
			return Stats{}, fmt.Errorf("update: %w", err)
		}
		d.nodes = nodes
		d.want.rt, d.want.svcs, d.want.nft.Hash = nt.rt, nt.svcs, nt.nft.Hash
		sig := nt.nft.Sig
		sig.Lens = d.want.nft.Sig.Lens
		d.want.nft.Sig = sig
		ch.Nodes = true
	}
	for i, m := range delta.Buckets {
		if d.bucketMarks != nil {
			d.bucketMarks[i] = m
		}
	}
	p := nft.Update(d.model.nft, d.want.nft, ch)
	p.WithDigest(d.model.nft)
	var st Stats
	var failed []error
	if nt != nil {
		// Routes and services first, so the maps never point at a mark
		// that does not route (as reconcile does).
		st, failed = d.addNodes(d.model, d.want)
	}
	if !p.Empty() {
		flush := leftMasq(d.model, p)
		if err := d.applyNft(p); err != nil {
			d.model = nil
			return st, fmt.Errorf("update: %w", errors.Join(append(failed, err)...))
		}
		a, chg, r := p.Count()
		st.Added += a
		st.Changed += chg
		st.Removed += r
		st.Reloaded += reloaded(p, a+chg)
		d.model.nft.ApplyTo(p, d.want.nft)
		failed = append(failed, d.flushServices(d.model, flush)...)
	}
	if nt != nil {
		n, f := d.removeNodes(d.model, d.want)
		st.Removed += n
		failed = append(failed, f...)
	}
	st.Duration = time.Since(start)
	return st, partial("update", failed)
}

func (d *dataplane) Verify(ctx context.Context) (Stats, error) {
	start := time.Now()
	if err := ctx.Err(); err != nil {
		return Stats{}, err
	}
	if d.want == nil {
		return Stats{}, errors.New("verify: no Sync yet: nothing to compare with")
	}
	d.verifies++
	// The maps are read back only when the ruleset generation moved
	// since the director's last transaction (or every fullVerifyEvery
	// verifies): at a million tunnels the read takes minutes, the
	// generation one message. The read runs in the background, on
	// connections of its own, so table changes reach the kernel while
	// it does. Routes and services are read every time.
	var known *nft.State
	var err error
	withMaps, pending := true, false
	switch {
	case d.model == nil:
		// Nothing to compare a background read with: read now.
	case d.pending != nil:
		select {
		case r := <-d.pending:
			known, withMaps, err = d.takeRead(r)
		default:
			// Still reading; routes and services were verified when
			// it started.
			return Stats{Pending: true, Duration: time.Since(start)}, nil
		}
	case d.mapsMayDiffer():
		d.startRead()
		known, withMaps, pending = d.model.nft, false, true
	default:
		known, withMaps = d.model.nft, false
	}
	if err != nil {
		return Stats{}, fmt.Errorf("verify: %w", err)
	}
	cur, err := d.read(known)
	if err != nil {
		return Stats{}, fmt.Errorf("verify: %w", err)
	}
	d.model = cur
	st, failed, err := d.reconcileMaps(cur, d.want, withMaps)
	st.Duration, st.Pending = time.Since(start), pending
	if err != nil {
		d.model = nil
		return st, fmt.Errorf("verify: repair: %w", errors.Join(append(failed, err)...))
	}
	return st, partial("verify: repair", failed)
}

// mapsMayDiffer says whether the maps need reading back: someone else's
// transaction may have changed them, or it is the periodic full read.
func (d *dataplane) mapsMayDiffer() bool {
	if !d.genKnown {
		return true
	}
	if d.verifies%fullVerifyEvery == 0 && d.now().Sub(d.readDone) >= readDuty*d.readTook {
		return true
	}
	g, err := d.nft.Gen()
	return err != nil || g != d.gen
}

// startRead starts a background read of the table. The model is compared
// with it as of the current generation: the director's own transactions
// carry that on (applyNft), anyone else's breaks it and the next Verify
// reads again.
func (d *dataplane) startRead() {
	g, err := d.nft.Gen()
	d.gen, d.genKnown = g, err == nil
	d.touched = touchedKeys{peers: map[netip.Addr]struct{}{}, subnets: map[netip.Prefix]struct{}{}, hash: map[uint32]struct{}{}}
	d.pending = d.nft.ReadInBackground()
}

// takeRead takes a background read that arrived: with the model's values
// for the keys the director's transactions touched meanwhile, and true.
// A read that failed (its error is returned) or saw a structure the
// director has changed since is dropped (false) and the next Verify reads
// again.
func (d *dataplane) takeRead(r nft.ReadResult) (*nft.State, bool, error) {
	d.pending = nil
	d.readDone, d.readTook = d.now(), r.Took
	if r.Err != nil || d.touched.shape {
		d.genKnown = false
		return d.model.nft, false, r.Err
	}
	if r.State.Table && !r.State.Broken {
		d.touched.overlay(r.State, d.model.nft)
		if r.State.Interrupted || d.touched.tx {
			if err := d.confirmMissed(r.State); err != nil {
				d.genKnown = false
				return d.model.nft, false, err
			}
		}
	}
	return r.State, true, nil
}

// confirmMissed asks the kernel, key by key, for the elements the model
// has and a read across transactions lacks: the kernel resumes a set dump
// by counting elements from the start of its hash walk, so the director's
// own deletions and additions during the read can make it skip one (one
// in a million, measured with 8,000 moves during the read; the kernel
// did not flag those dumps NLM_F_DUMP_INTR). Re-adding them would count
// as drift that never was. Beyond maxConfirm missing elements the read is
// taken as it is: that is drift (a flushed map), not a skip.
func (d *dataplane) confirmMissed(read *nft.State) error {
	var peers []netip.Addr
	var subnets []netip.Prefix
	for a := range d.model.nft.Peers.All() {
		if _, ok := read.Peers.Get(a); !ok {
			peers = append(peers, a)
		}
	}
	for p := range d.model.nft.Subnets.All() {
		if _, ok := read.Subnets.Get(p); !ok {
			subnets = append(subnets, p)
		}
	}
	if n := len(peers) + len(subnets); n == 0 || n > maxConfirm {
		return nil
	}
	pm, sm, err := d.nft.Confirm(peers, subnets)
	if err != nil {
		return err
	}
	for a, v := range pm.All() {
		read.Peers.Set(a, v)
	}
	for p, v := range sm.All() {
		read.Subnets.Set(p, v)
	}
	return nil
}

func (d *dataplane) Read(ctx context.Context) (*Desired, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	s, err := d.read(nil)
	if err != nil {
		return nil, fmt.Errorf("read: %w", err)
	}
	c := d.cfg
	out := &Desired{Peers: map[netip.Addr]uint16{}, Subnets: map[netip.Prefix]uint16{}, HashSeed: s.nft.Sig.Seed,
		Buckets: make([]uint16, min(s.nft.Sig.HashN, nft.MaxHash))}
	for i, fm := range s.nft.Hash {
		if m, ok := c.NodeOf(fm); ok && int(i) < len(out.Buckets) {
			out.Buckets[i] = m
		}
	}
	out.VIPs = sortedAddrs(s.nft.VIPs)
	for a, fm := range s.nft.Peers.All() {
		if m, ok := c.NodeOf(fm); ok {
			out.Peers[a] = m
		}
	}
	for p, fm := range s.nft.Subnets.All() {
		if m, ok := c.NodeOf(fm); ok {
			out.Subnets[p] = m
		}
	}
	nodes := map[uint16]*Node{}
	node := func(m uint16) *Node {
		if nodes[m] == nil {
			nodes[m] = &Node{Mark: m, Name: fmt.Sprintf("mark%d", m)}
		}
		return nodes[m]
	}
	for rk, gw := range s.rt.Routes {
		n := node(uint16(rk.Table - c.TableBase))
		if rk.V6 && gw.Is6() && n.Addr.IsValid() {
			n.Addr6 = gw
		} else if gw.Is4() || !n.Addr.IsValid() {
			if n.Addr.Is6() {
				n.Addr6 = n.Addr
			}
			n.Addr = gw
		} else {
			n.Addr6 = gw
		}
	}
	for sk, dst := range s.svcs {
		if m, ok := c.NodeOf(sk.mark); ok {
			node(m).Forward = dst.fwd
		}
	}
	for _, fm := range s.nft.Hash {
		if m, ok := c.NodeOf(fm); ok {
			node(m).Active = true
		}
	}
	for _, m := range slices.Sorted(maps.Keys(nodes)) {
		out.Nodes = append(out.Nodes, *nodes[m])
	}
	return out, nil
}

func (d *dataplane) Teardown(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	c := d.cfg
	var errs []error
	if d.lvs != nil {
		svcs, err := d.lvs.Services()
		if err != nil {
			errs = append(errs, fmt.Errorf("teardown: %w", err))
		}
		for _, s := range svcs {
			if _, ok := c.NodeOf(s.Mark); ok && s.Mark&IKEBit != 0 {
				if err := d.lvs.Remove(s); err != nil {
					errs = append(errs, fmt.Errorf("teardown: %w", err))
				}
			}
		}
	}
	if err := d.nft.DeleteTable(); err != nil {
		errs = append(errs, fmt.Errorf("teardown: delete nftables table %s: %w", c.Table, err))
	}
	if err := d.rc.Teardown(d.rt); err != nil {
		errs = append(errs, fmt.Errorf("teardown: %w", err))
	}
	d.model, d.want = nil, nil
	return errors.Join(errs...)
}

func (d *dataplane) Close() error {
	err := errors.Join(d.nft.Close(), d.rt.Close())
	if d.lvs != nil {
		err = errors.Join(err, d.lvs.Close())
	}
	return err
}

// PartialError says that a Sync, Update or Verify applied everything but
// the objects it lists (each error names its object: a route to a node the
// director cannot reach, say). The kernel steers for everything else; the
// next Verify tries the failed objects again.
type PartialError struct {
	Op     string
	Failed []error
}

func (e *PartialError) Error() string {
	return fmt.Sprintf("%s: %d object(s) not programmed, the rest applied: %v", e.Op, len(e.Failed), errors.Join(e.Failed...))
}

// Unwrap returns the per-object errors.
func (e *PartialError) Unwrap() []error { return e.Failed }

func partial(op string, failed []error) error {
	if len(failed) == 0 {
		return nil
	}
	return &PartialError{Op: op, Failed: failed}
}

// methodOf and forwardOf translate between the configured forwarding
// method and IPVS's.
func methodOf(f Forward) lvs.Method {
	switch f {
	case ForwardTunnel:
		return lvs.Tunnel
	case ForwardMasq:
		return lvs.Masquerade
	}
	return lvs.DirectRoute
}

func forwardOf(m lvs.Method) Forward {
	switch m {
	case lvs.Tunnel:
		return ForwardTunnel
	case lvs.Masquerade:
		return ForwardMasq
	}
	return ForwardDR
}
