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
)

var _ Dataplane = (*dataplane)(nil)

// dataplane is the Dataplane over the kernel seams.
type dataplane struct {
	cfg  Config
	mode Mode
	k    kernel
	lvs  lvs.Kernel // nil on a kernel without IPVS
	// model is what the director believes the kernel holds; nil until
	// the first Sync adopts the kernel's state.
	model *kstate
	// want is the target of the last Sync plus the Updates since.
	want *kstate
	// nodes of the last Sync by mark, to validate delta owners and to know
	// which node a moved peer leaves.
	nodes map[uint16]Node
}

// New returns a Dataplane for the kernel of the current network namespace.
// It probes IPVS (ModeAuto picks ModeIPVS when the kernel has it; Mode()
// says which mode is in force) and refuses to start when the configured mark
// range, routing tables or rule priority are used by objects the director
// does not own. In IPVS mode it sets net.ipv4.vs.expire_nodest_conn=1 (see
// ipvs/lvs).
func New(cfg Config) (Dataplane, error) {
	return newIn(cfg, nsTarget{})
}

// newInNamespace is New for the namespace ns (a test seam).
func newInNamespace(cfg Config, fd netns.NsHandle, path string) (*dataplane, error) {
	return newIn(cfg, nsTarget{fd: fd, path: path})
}

// newIn wires the real kernel of the target namespace to a dataplane.
func newIn(cfg Config, ns nsTarget) (*dataplane, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	k, err := newRealKernel(cfg, ns)
	if err != nil {
		return nil, err
	}
	var lk lvs.Kernel
	if cfg.Mode != ModeRouteOnly {
		lk, _, err = lvs.Open(ns.fd)
		if errors.Is(err, lvs.ErrNoIPVS) {
			lk, err = nil, nil
		}
		if err != nil {
			k.close()
			return nil, fmt.Errorf("open IPVS: %w", err)
		}
	}
	dp, err := newDataplane(cfg, k, lk)
	if err != nil {
		k.close()
		if lk != nil {
			lk.Close()
		}
		return nil, err
	}
	k.mode = dp.Mode
	return dp, nil
}

// newDataplane is the constructor over test seams; lk is nil on a kernel
// without IPVS.
func newDataplane(cfg Config, k kernel, lk lvs.Kernel) (*dataplane, error) {
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
	d := &dataplane{cfg: cfg, mode: mode, k: k, lvs: lk}
	if err := d.checkForeign(); err != nil {
		return nil, err
	}
	return d, nil
}

func (d *dataplane) Mode() Mode { return d.mode }

// checkForeign refuses a configuration whose rule priority, mark range or
// routing tables already hold objects without the director's protocol tag.
func (d *dataplane) checkForeign() error {
	c := d.cfg
	rules, err := d.k.listRules()
	if err != nil {
		return fmt.Errorf("list rules: %w", err)
	}
	for _, r := range rules {
		if r.proto == c.Protocol {
			continue
		}
		desc := fmt.Sprintf("rule pref %d fwmark %#x/%#x lookup %d (ipv6=%v, proto %d)", r.prio, r.mark, r.mask, r.table, r.v6, r.proto)
		switch {
		case r.prio == c.RulePriority:
			return fmt.Errorf("rule priority %d is already used by %s, which the director does not own", c.RulePriority, desc)
		case r.mark != 0 && c.inRange(r.mark, r.mask):
			return fmt.Errorf("mark range %#x/%#x is already used by %s, which the director does not own", c.MarkBase, c.MarkMask, desc)
		case c.ownsTable(r.table):
			return fmt.Errorf("routing table %d (range %d..%d) is already used by %s, which the director does not own", r.table, c.TableBase+1, c.TableBase+MaxMark, desc)
		}
	}
	routes, err := d.k.listRoutes()
	if err != nil {
		return fmt.Errorf("list routes: %w", err)
	}
	for _, r := range routes {
		if c.ownsTable(r.table) && r.proto != c.Protocol {
			return fmt.Errorf("routing table %d (range %d..%d) already holds route %s via %v (proto %d), which the director does not own",
				r.table, c.TableBase+1, c.TableBase+MaxMark, r.dst, r.gw, r.proto)
		}
	}
	return nil
}

// read returns the director's objects as the kernel holds them.
func (d *dataplane) read() (*kstate, error) {
	c := d.cfg
	s := newKstate()
	n, err := d.k.readNft()
	if err != nil {
		return nil, fmt.Errorf("read nftables table %s: %w", c.Table, err)
	}
	s.nft = *n
	rules, err := d.k.listRules()
	if err != nil {
		return nil, fmt.Errorf("list rules: %w", err)
	}
	var localAt0, localOurs [2]bool
	for _, r := range rules {
		f := 0
		if r.v6 {
			f = 1
		}
		if r.table == rtTableLocal && r.mark == 0 {
			if r.prio == 0 {
				localAt0[f] = true
			} else if r.prio == c.LocalRulePriority && r.proto == c.Protocol {
				localOurs[f] = true
			}
			continue
		}
		if r.proto == c.Protocol && r.prio == c.RulePriority && r.mask == c.MarkMask && c.ownsTable(r.table) {
			s.rules[ruleKey{r.v6, r.mark, r.table}] = struct{}{}
		}
	}
	for f := range 2 {
		s.local[f] = localOurs[f] && !localAt0[f]
	}
	routes, err := d.k.listRoutes()
	if err != nil {
		return nil, fmt.Errorf("list routes: %w", err)
	}
	for _, r := range routes {
		if c.ownsTable(r.table) && r.proto == c.Protocol && r.dst.Bits() == 0 {
			s.routes[routeKey{r.v6, r.table}] = r.gw
		}
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
	c := d.cfg
	k := d.k
	fail := func(e error) { failed = append(failed, e) }
	// Routes.
	for _, rk := range sortedKeys(want.routes, routeKeyLess) {
		gw := want.routes[rk]
		if cgw, ok := cur.routes[rk]; ok && cgw == gw {
			continue
		}
		r := kRoute{v6: rk.v6, table: rk.table, dst: defaultPrefix(rk.v6), gw: gw, proto: c.Protocol}
		if err := k.replaceRoute(r); err != nil {
			fail(fmt.Errorf("replace route %s via %s table %d (node mark %d): %w", r.dst, gw, rk.table, rk.table-c.TableBase, err))
			continue
		}
		if _, ok := cur.routes[rk]; ok {
			st.Changed++
		} else {
			st.Added++
		}
		cur.routes[rk] = gw
	}
	// Rules.
	for _, rk := range sortedKeys(want.rules, ruleKeyLess) {
		if _, ok := cur.rules[rk]; ok {
			continue
		}
		r := kRule{v6: rk.v6, prio: c.RulePriority, mark: rk.mark, mask: c.MarkMask, table: rk.table, proto: c.Protocol}
		if err := k.addRule(r); err != nil {
			fail(fmt.Errorf("add rule fwmark %#x/%#x lookup %d (%s): %w", rk.mark, c.MarkMask, rk.table, famName(rk.v6), err))
			continue
		}
		st.Added++
		cur.rules[rk] = struct{}{}
	}
	// The local rule: ours at LocalRulePriority first, then drop pref 0,
	// so local delivery never disappears in between.
	for f := range 2 {
		if !want.local[f] || cur.local[f] {
			continue
		}
		v6 := f == 1
		if err := d.moveLocal(v6); err != nil {
			fail(err)
			continue
		}
		st.Changed++
		cur.local[f] = true
	}
	// IPVS services.
	for _, sk := range sortedKeys(want.svcs, svcKeyLess) {
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
			fail(fmt.Errorf("fwmark service %#x for node %s (%s, %s): %w", sk.mark, dst.addr, famName(sk.v6), dst.fwd, err))
			continue
		}
		if ok {
			st.Changed++
		} else {
			st.Added++
		}
		cur.svcs[sk] = dst
	}
	// nftables: one transaction.
	p := planNft(&cur.nft, &want.nft)
	if !p.empty() {
		flush := d.leftMasq(cur, p)
		if err := k.applyNft(p); err != nil {
			return st, failed, fmt.Errorf("nftables transaction on table %s: %w", c.Table, err)
		}
		a, ch, r := p.count()
		st.Added += a
		st.Changed += ch
		st.Removed += r
		cur.nft.applyPlan(p)
		failed = append(failed, d.flushServices(cur, flush)...)
	}
	// Removals.
	for _, sk := range sortedKeys(cur.svcs, svcKeyLess) {
		if _, ok := want.svcs[sk]; ok {
			continue
		}
		if err := d.lvs.Remove(d.service(sk, cur.svcs[sk])); err != nil {
			fail(fmt.Errorf("delete fwmark service %#x (%s): %w", sk.mark, famName(sk.v6), err))
			continue
		}
		st.Removed++
		delete(cur.svcs, sk)
	}
	for _, rk := range sortedKeys(cur.rules, ruleKeyLess) {
		if _, ok := want.rules[rk]; ok {
			continue
		}
		r := kRule{v6: rk.v6, prio: c.RulePriority, mark: rk.mark, mask: c.MarkMask, table: rk.table, proto: c.Protocol}
		if err := k.delRule(r); err != nil {
			fail(fmt.Errorf("delete rule fwmark %#x lookup %d (%s): %w", rk.mark, rk.table, famName(rk.v6), err))
			continue
		}
		st.Removed++
		delete(cur.rules, rk)
	}
	for _, rk := range sortedKeys(cur.routes, routeKeyLess) {
		if _, ok := want.routes[rk]; ok {
			continue
		}
		r := kRoute{v6: rk.v6, table: rk.table, dst: defaultPrefix(rk.v6), gw: cur.routes[rk], proto: c.Protocol}
		if err := k.delRoute(r); err != nil {
			fail(fmt.Errorf("delete route %s table %d: %w", r.dst, rk.table, err))
			continue
		}
		st.Removed++
		delete(cur.routes, rk)
	}
	return st, failed, nil
}

// service is the lvs form of one of the director's services.
func (d *dataplane) service(sk svcKey, dst svcDest) lvs.Service {
	return lvs.Service{V6: sk.v6, Mark: sk.mark, OnePacket: dst.ops,
		Dests: []lvs.Dest{{Addr: dst.addr, Method: methodOf(dst.fwd)}}}
}

// leftMasq returns the services (of cur) whose node a peer leaves in plan p
// while they keep connection entries (masq, no one-packet scheduling): the
// entries would keep the moved peer's IKE and NAT-T on the old node.
func (d *dataplane) leftMasq(cur *kstate, p *nftPlan) []svcKey {
	if d.lvs == nil {
		return nil
	}
	marks := map[uint32]bool{}
	for _, a := range p.delPeers {
		if fm, ok := cur.nft.peers[a]; ok && p.addPeers[a] != fm {
			marks[fm|IKEBit] = true
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
	slices.SortFunc(out, svcKeyLess)
	return out
}

// flushServices drops the connection entries of the services sks by
// replacing each with itself (lvs.Replace): the peers that stay on the node
// re-create theirs with their next packet, the moved ones are scheduled by
// their new mark. IKE and NAT-T to that node pause while IPVS expires the
// entries (milliseconds); see README "Forwarding methods and moves".
func (d *dataplane) flushServices(cur *kstate, sks []svcKey) []error {
	var failed []error
	for _, sk := range sks {
		dst := cur.svcs[sk]
		if err := d.lvs.Replace(d.service(sk, dst), d.service(sk, dst)); err != nil {
			delete(cur.svcs, sk)
			failed = append(failed, fmt.Errorf("flush connection entries of fwmark service %#x (%s) after a move: %w", sk.mark, famName(sk.v6), err))
		}
	}
	return failed
}

func (d *dataplane) moveLocal(v6 bool) error {
	c := d.cfg
	ours := kRule{v6: v6, prio: c.LocalRulePriority, table: rtTableLocal, proto: c.Protocol}
	rules, err := d.k.listRules()
	if err != nil {
		return fmt.Errorf("list rules: %w", err)
	}
	have, at0 := false, false
	for _, r := range rules {
		if r.v6 != v6 || r.table != rtTableLocal || r.mark != 0 {
			continue
		}
		if r.prio == c.LocalRulePriority && r.proto == c.Protocol {
			have = true
		}
		if r.prio == 0 {
			at0 = true
		}
	}
	if !have {
		if err := d.k.addRule(ours); err != nil {
			return fmt.Errorf("add local rule at pref %d (%s): %w", c.LocalRulePriority, famName(v6), err)
		}
	}
	if at0 {
		if err := d.k.delRule(kRule{v6: v6, prio: 0, table: rtTableLocal}); err != nil {
			return fmt.Errorf("delete local rule at pref 0 (%s): %w", famName(v6), err)
		}
	}
	return nil
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
		cur, err := d.read()
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
	for a, m := range delta.SetPeers {
		if _, ok := d.nodes[m]; !ok {
			return Stats{}, fmt.Errorf("update: peer %s: owner mark %d is not a node", a, m)
		}
	}
	for pf, m := range delta.SetSubnets {
		if _, ok := d.nodes[m]; !ok {
			return Stats{}, fmt.Errorf("update: subnet %s: owner mark %d is not a node", pf, m)
		}
	}
	p := &nftPlan{sig: d.model.nft.sig, addPeers: map[netip.Addr]uint32{}, addSubnets: map[netip.Prefix]uint32{}}
	want := &d.want.nft
	model := &d.model.nft
	for _, a := range delta.DeletePeers {
		a = a.Unmap()
		delete(want.peers, a)
		if _, ok := model.peers[a]; ok {
			p.delPeers = append(p.delPeers, a)
		}
	}
	for _, pf := range delta.DeleteSubnets {
		pf = pf.Masked()
		want.delSubnet(pf)
		if _, ok := model.subnets[pf]; ok {
			p.delSubnets = append(p.delSubnets, pf)
		}
	}
	for a, m := range delta.SetPeers {
		a = a.Unmap()
		fm := c.Fwmark(m)
		want.peers[a] = fm
		cur, ok := model.peers[a]
		if ok && cur == fm {
			continue
		}
		if ok && !slices.Contains(p.delPeers, a) {
			p.delPeers = append(p.delPeers, a)
		}
		p.addPeers[a] = fm
	}
	for pf, m := range delta.SetSubnets {
		pf = pf.Masked()
		fm := c.Fwmark(m)
		want.addSubnet(pf, fm)
		cur, ok := model.subnets[pf]
		if ok && cur == fm {
			continue
		}
		if ok && !slices.Contains(p.delSubnets, pf) {
			p.delSubnets = append(p.delSubnets, pf)
		}
		p.addSubnets[pf] = fm
	}
	// A length that appears or goes creates or deletes its map and rebuilds
	// the chain, in the same transaction; only the touched lengths are
	// compared, so the common case stays O(delta).
	touched := map[plen]struct{}{}
	for _, pf := range delta.DeleteSubnets {
		touched[plenOf(pf.Masked())] = struct{}{}
	}
	for pf := range delta.SetSubnets {
		touched[plenOf(pf.Masked())] = struct{}{}
	}
	for l := range touched {
		_, w := want.lens[l]
		_, h := model.lens[l]
		if w && !h {
			p.addLens = append(p.addLens, l)
		} else if h && !w {
			p.delLens = append(p.delLens, l)
		}
	}
	if len(touched) > 0 {
		want.sig = lensSig(want.base, want.lens)
	}
	if len(p.addLens)+len(p.delLens) > 0 {
		p.chain = true
		p.lensOnly = model.sig == lensSig(want.base, model.lens)
		p.sig = want.sig
		p.lens = sortedLens(want.lens)
		p.hashN = len(want.hash)
		p.seed = want.seed
	}
	var st Stats
	var failed []error
	if !p.empty() {
		flush := d.leftMasq(d.model, p)
		if err := d.k.applyNft(p); err != nil {
			d.model = nil
			return st, fmt.Errorf("update: nftables transaction on table %s: %w", c.Table, err)
		}
		st.Added, st.Changed, st.Removed = p.count()
		model.applyPlan(p)
		failed = d.flushServices(d.model, flush)
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
	cur, err := d.read()
	if err != nil {
		return Stats{}, fmt.Errorf("verify: %w", err)
	}
	d.model = cur
	st, failed, err := d.reconcile(cur, d.want)
	st.Duration = time.Since(start)
	if err != nil {
		d.model = nil
		return st, fmt.Errorf("verify: repair: %w", errors.Join(append(failed, err)...))
	}
	return st, partial("verify: repair", failed)
}

func (d *dataplane) Read(ctx context.Context) (*Desired, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	s, err := d.read()
	if err != nil {
		return nil, fmt.Errorf("read: %w", err)
	}
	c := d.cfg
	out := &Desired{Peers: map[netip.Addr]uint16{}, Subnets: map[netip.Prefix]uint16{}}
	out.VIPs = sortedAddrs(s.nft.vips)
	for a, fm := range s.nft.peers {
		if m, ok := c.NodeOf(fm); ok {
			out.Peers[a] = m
		}
	}
	for p, fm := range s.nft.subnets {
		if m, ok := c.NodeOf(fm); ok {
			out.Subnets[p] = m
		}
	}
	fmt.Sscanf(sigSeed(s.nft.sig), "%v", &out.HashSeed)
	nodes := map[uint16]*Node{}
	node := func(m uint16) *Node {
		if nodes[m] == nil {
			nodes[m] = &Node{Mark: m, Name: fmt.Sprintf("mark%d", m)}
		}
		return nodes[m]
	}
	for rk, gw := range s.routes {
		n := node(uint16(rk.table - c.TableBase))
		if rk.v6 && gw.Is6() && n.Addr.IsValid() {
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
	for _, fm := range s.nft.hash {
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
	if err := d.k.deleteTable(); err != nil {
		errs = append(errs, fmt.Errorf("teardown: delete nftables table %s: %w", c.Table, err))
	}
	rules, err := d.k.listRules()
	if err != nil {
		errs = append(errs, fmt.Errorf("teardown: list rules: %w", err))
	}
	var at0, ours [2]bool
	for _, r := range rules {
		f := 0
		if r.v6 {
			f = 1
		}
		if r.table == rtTableLocal && r.prio == 0 {
			at0[f] = true
		}
		if r.proto != c.Protocol {
			continue
		}
		if r.table == rtTableLocal && r.prio == c.LocalRulePriority {
			ours[f] = true
			continue
		}
		if r.prio == c.RulePriority && c.ownsTable(r.table) {
			if err := d.k.delRule(r); err != nil {
				errs = append(errs, fmt.Errorf("teardown: delete rule fwmark %#x lookup %d: %w", r.mark, r.table, err))
			}
		}
	}
	for f := range 2 {
		v6 := f == 1
		if !at0[f] {
			if err := d.k.addRule(kRule{v6: v6, prio: 0, table: rtTableLocal, proto: rtprotKernel}); err != nil {
				errs = append(errs, fmt.Errorf("teardown: restore local rule at pref 0 (%s): %w", famName(v6), err))
				continue
			}
		}
		if ours[f] {
			if err := d.k.delRule(kRule{v6: v6, prio: c.LocalRulePriority, table: rtTableLocal, proto: c.Protocol}); err != nil {
				errs = append(errs, fmt.Errorf("teardown: delete moved local rule at pref %d (%s): %w", c.LocalRulePriority, famName(v6), err))
			}
		}
	}
	routes, err := d.k.listRoutes()
	if err != nil {
		errs = append(errs, fmt.Errorf("teardown: list routes: %w", err))
	}
	for _, r := range routes {
		if c.ownsTable(r.table) && r.proto == c.Protocol {
			if err := d.k.delRoute(r); err != nil {
				errs = append(errs, fmt.Errorf("teardown: delete route %s table %d: %w", r.dst, r.table, err))
			}
		}
	}
	d.model, d.want = nil, nil
	return errors.Join(errs...)
}

func (d *dataplane) Close() error {
	err := d.k.close()
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

const rtprotKernel = 2

func famName(v6 bool) string {
	if v6 {
		return "ipv6"
	}
	return "ipv4"
}

func defaultPrefix(v6 bool) netip.Prefix {
	if v6 {
		return netip.PrefixFrom(netip.IPv6Unspecified(), 0)
	}
	return netip.PrefixFrom(netip.IPv4Unspecified(), 0)
}

func sigSeed(sig string) string {
	var mode, seed string
	var n int
	fmt.Sscanf(sig, "td3 mode=%s seed=%s n=%d", &mode, &seed, &n)
	return seed
}

func sortedKeys[K comparable, V any](m map[K]V, less func(a, b K) int) []K {
	return slices.SortedFunc(maps.Keys(m), less)
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

func routeKeyLess(a, b routeKey) int {
	if a.table != b.table {
		return a.table - b.table
	}
	return b2i(a.v6) - b2i(b.v6)
}

func ruleKeyLess(a, b ruleKey) int {
	if a.table != b.table {
		return a.table - b.table
	}
	return b2i(a.v6) - b2i(b.v6)
}

func svcKeyLess(a, b svcKey) int {
	if a.mark != b.mark {
		return int(a.mark) - int(b.mark)
	}
	return b2i(a.v6) - b2i(b.v6)
}
