package ipvs

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"golang.org/x/sys/unix"
)

// Names of the director's nftables objects.
const (
	chainName   = "prerouting"
	hashMapName = "nodehash"
)

// elemChunk bounds the elements per NEWSETELEM message: the element list is
// one netlink attribute, whose length is 16 bits, so 100,000 elements must
// be spread over many messages (all in the same batch).
const elemChunk = 1000

type famSets struct {
	v6          bool
	vips, peers *nftables.Set
	// seen holds the unknown peers logged in the last LearnInterval: a
	// peer is logged once per interval, not once per packet.
	seen *nftables.Set
}

type nftNames struct {
	table *nftables.Table
	fams  [2]famSets
	hash  *nftables.Set
	chain *nftables.Chain
}

// newNames returns fresh set descriptors: google/nftables assigns batch IDs
// into them, so they must not be shared between transactions.
func newNames(name string) *nftNames {
	t := &nftables.Table{Family: nftables.TableFamilyINet, Name: name}
	n := &nftNames{table: t}
	for i, v6 := range []bool{false, true} {
		kt, sfx := nftables.TypeIPAddr, "4"
		if v6 {
			kt, sfx = nftables.TypeIP6Addr, "6"
		}
		n.fams[i] = famSets{
			v6:    v6,
			vips:  &nftables.Set{Table: t, Name: "vips" + sfx, KeyType: kt, KeyByteOrder: binaryutil.BigEndian},
			peers: &nftables.Set{Table: t, Name: "peers" + sfx, IsMap: true, KeyType: kt, KeyByteOrder: binaryutil.BigEndian, DataType: nftables.TypeMark},
			seen: &nftables.Set{Table: t, Name: "seen" + sfx, KeyType: kt, KeyByteOrder: binaryutil.BigEndian,
				Dynamic: true, HasTimeout: true, Timeout: LearnInterval, Size: seenSize},
		}
	}
	// The hash map's key is the hash register (host order); typed as a
	// mark so nft(8) can print it.
	n.hash = &nftables.Set{Table: t, Name: hashMapName, IsMap: true, KeyType: nftables.TypeMark,
		KeyByteOrder: binaryutil.NativeEndian, DataType: nftables.TypeMark}
	n.chain = &nftables.Chain{Name: chainName, Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityMangle}
	return n
}

func (n *nftNames) allSets() []*nftables.Set {
	var out []*nftables.Set
	for _, f := range n.fams {
		out = append(out, f.vips, f.peers, f.seen)
	}
	return append(out, n.hash)
}

// subnetSet describes the exact-match map of one prefix length: key the
// masked destination (network order), data the owner's mark.
func (n *nftNames) subnetSet(l plen) *nftables.Set {
	kt := nftables.TypeIPAddr
	if l.v6 {
		kt = nftables.TypeIP6Addr
	}
	return &nftables.Set{Table: n.table, Name: l.setName(), IsMap: true, KeyType: kt,
		KeyByteOrder: binaryutil.BigEndian, DataType: nftables.TypeMark}
}

// legacySets are the interval maps of the layout before per-length maps; a
// table that still has them is recreated (in one transaction) so no stale
// map is left behind.
var legacySets = []string{"subnets4", "subnets6"}

// prefixMask returns the netmask of l as a byte string of the address
// length.
func prefixMask(l plen) []byte {
	n := 4
	if l.v6 {
		n = 16
	}
	m := make([]byte, n)
	for i := 0; i < l.bits; i++ {
		m[i/8] |= 0x80 >> (i % 8)
	}
	return m
}

// markBytes encodes a mark as the kernel's meta mark register holds it:
// host byte order (nft list shows byte-swapped marks otherwise).
func markBytes(m uint32) []byte { return binaryutil.NativeEndian.PutUint32(m) }

func markOf(b []byte) uint32 {
	if len(b) != 4 {
		return 0
	}
	return binaryutil.NativeEndian.Uint32(b)
}

type elemOp func(*nftables.Set, []nftables.SetElement) error

func chunked(op elemOp, s *nftables.Set, els []nftables.SetElement) error {
	for len(els) > 0 {
		n := min(len(els), elemChunk)
		if err := op(s, els[:n]); err != nil {
			return fmt.Errorf("set %s: %w", s.Name, err)
		}
		els = els[n:]
	}
	return nil
}

// buildNft queues plan p on c; the caller flushes.
func buildNft(c *nftables.Conn, cfg Config, mode Mode, p *nftPlan) error {
	if cfg.LogGroup == 0 {
		cfg.LogGroup = DefaultLogGroup
	}
	n := newNames(cfg.Table)
	if p.recreate {
		// add+delete+add: delete fails on a missing table, and the
		// whole batch must stay atomic.
		c.AddTable(n.table)
		c.DelTable(n.table)
		c.AddTable(n.table)
		for _, s := range n.allSets() {
			if err := c.AddSet(s, nil); err != nil {
				return fmt.Errorf("add set %s: %w", s.Name, err)
			}
		}
		c.AddChain(n.chain)
	}
	// Subnet maps: new ones before the rules that look them up (the rules
	// refer to them by the batch IDs AddSet assigns).
	subs := map[plen]*nftables.Set{}
	sub := func(l plen) *nftables.Set {
		if subs[l] == nil {
			subs[l] = n.subnetSet(l)
		}
		return subs[l]
	}
	for _, l := range p.addLens {
		if err := c.AddSet(sub(l), nil); err != nil {
			return fmt.Errorf("add set %s: %w", l.setName(), err)
		}
	}
	if p.chain {
		if !p.recreate {
			c.FlushChain(n.chain)
		}
		var lens []*nftables.Set
		for _, l := range p.lens {
			lens = append(lens, sub(l))
		}
		rules := chainRules(cfg, mode, n, p.hashN, p.seed, p.lens, lens)
		for i, ex := range rules {
			c.AddRule(&nftables.Rule{Table: n.table, Chain: n.chain, Exprs: ex,
				UserData: userdata.AppendString(nil, userdata.TypeComment, fmt.Sprintf("%s|%d|%d", p.sig, i, len(rules)))})
		}
	}
	// Deletions before additions: a changed element is a delete and an add
	// of the same key in the same transaction.
	var del, add [2]struct{ vips, peers []nftables.SetElement }
	delSub, addSub := map[plen][]nftables.SetElement{}, map[plen][]nftables.SetElement{}
	gone := map[plen]bool{}
	for _, l := range p.delLens {
		gone[l] = true
	}
	fi := func(a netip.Addr) int {
		if a.Is4() {
			return 0
		}
		return 1
	}
	for _, a := range p.delVIPs {
		del[fi(a)].vips = append(del[fi(a)].vips, nftables.SetElement{Key: a.AsSlice()})
	}
	for _, a := range p.addVIPs {
		add[fi(a)].vips = append(add[fi(a)].vips, nftables.SetElement{Key: a.AsSlice()})
	}
	for _, a := range p.delPeers {
		del[fi(a)].peers = append(del[fi(a)].peers, nftables.SetElement{Key: a.AsSlice()})
	}
	for a, m := range p.addPeers {
		add[fi(a)].peers = append(add[fi(a)].peers, nftables.SetElement{Key: a.AsSlice(), Val: markBytes(m)})
	}
	for _, pf := range p.delSubnets {
		// A deleted map takes its elements with it.
		if l := plenOf(pf); !gone[l] {
			delSub[l] = append(delSub[l], nftables.SetElement{Key: pf.Addr().AsSlice()})
		}
	}
	for pf, m := range p.addSubnets {
		l := plenOf(pf)
		addSub[l] = append(addSub[l], nftables.SetElement{Key: pf.Addr().AsSlice(), Val: markBytes(m)})
	}
	for i, f := range n.fams {
		for _, x := range []struct {
			s  *nftables.Set
			el []nftables.SetElement
		}{{f.vips, del[i].vips}, {f.peers, del[i].peers}} {
			if err := chunked(c.SetDeleteElements, x.s, x.el); err != nil {
				return err
			}
		}
	}
	for _, l := range sortedKeys(delSub, plenLess) {
		if err := chunked(c.SetDeleteElements, sub(l), delSub[l]); err != nil {
			return err
		}
	}
	var hdel, hadd []nftables.SetElement
	for _, k := range p.delHash {
		hdel = append(hdel, nftables.SetElement{Key: binaryutil.NativeEndian.PutUint32(k)})
	}
	for k, m := range p.addHash {
		hadd = append(hadd, nftables.SetElement{Key: binaryutil.NativeEndian.PutUint32(k), Val: markBytes(m)})
	}
	if err := chunked(c.SetDeleteElements, n.hash, hdel); err != nil {
		return err
	}
	for i, f := range n.fams {
		for _, x := range []struct {
			s  *nftables.Set
			el []nftables.SetElement
		}{{f.vips, add[i].vips}, {f.peers, add[i].peers}} {
			if err := chunked(c.SetAddElements, x.s, x.el); err != nil {
				return err
			}
		}
	}
	for _, l := range sortedKeys(addSub, plenLess) {
		if err := chunked(c.SetAddElements, sub(l), addSub[l]); err != nil {
			return err
		}
	}
	if err := chunked(c.SetAddElements, n.hash, hadd); err != nil {
		return err
	}
	// Maps whose last subnet went: after the chain flush above dropped the
	// rules that used them (the kernel refuses to delete a map in use).
	for _, l := range p.delLens {
		c.DelSet(sub(l))
	}
	return nil
}

// chainRules builds the classifier. Per family, for each tunnel selector
// (ESP, AH, UDP 500, UDP 4500) to a VIP: a known peer gets its owner's
// mark from the peer map, an unknown one gets the jhash pick; any packet to
// a protected subnet gets the owner's mark. In IPVS mode the IKE and NAT-T
// marks carry IKEBit so the fwmark rules leave them to the IPVS services.
func chainRules(cfg Config, mode Mode, n *nftNames, hashN int, seed uint32, lens []plen, subs []*nftables.Set) [][]expr.Any {
	var rules [][]expr.Any
	// Any ct expression makes the table depend on conntrack, which the NEW
	// event watcher needs; counting new flows is useful on its own.
	rules = append(rules, []expr.Any{
		&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(expr.CtStateBitNEW), Xor: binaryutil.NativeEndian.PutUint32(0)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(0)},
		&expr.Counter{},
	})
	type sel struct {
		ike bool
		ex  []expr.Any
	}
	proto := func(p byte) []expr.Any {
		return []expr.Any{&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1}, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{p}}}
	}
	udp := func(port uint16) []expr.Any {
		return append(proto(unix.IPPROTO_UDP),
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.BigEndian.PutUint16(port)})
	}
	sels := []sel{{false, proto(unix.IPPROTO_ESP)}, {false, proto(unix.IPPROTO_AH)}, {true, udp(500)}, {true, udp(4500)}}
	for _, f := range n.fams {
		nfproto, soff, doff, alen := byte(unix.NFPROTO_IPV4), uint32(12), uint32(16), uint32(4)
		if f.v6 {
			nfproto, soff, doff, alen = unix.NFPROTO_IPV6, 8, 24, 16
		}
		head := func(s sel) []expr.Any {
			ex := []expr.Any{
				&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
				&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{nfproto}},
			}
			ex = append(ex, s.ex...)
			return append(ex,
				&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: doff, Len: alen},
				&expr.Lookup{SourceRegister: 1, SetName: f.vips.Name, SetID: f.vips.ID},
				&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: soff, Len: alen},
			)
		}
		tail := func(s sel) []expr.Any {
			var ex []expr.Any
			if s.ike && mode == ModeIPVS {
				ex = append(ex, &expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
					Mask: binaryutil.NativeEndian.PutUint32(0xffffffff), Xor: binaryutil.NativeEndian.PutUint32(IKEBit)})
			}
			return append(ex, &expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: 1})
		}
		for _, s := range sels {
			// A known peer gets its owner's mark and leaves the chain
			// (accept ends this base chain only): a map lookup that misses
			// ends the rule, so the next rule sees unknown peers only, and
			// no "not in map" test is needed (lookups on a map without a
			// destination register are refused by older kernels, such as
			// Debian's 6.12).
			ex := head(s)
			ex = append(ex, &expr.Lookup{SourceRegister: 1, DestRegister: 1, IsDestRegSet: true, SetName: f.peers.Name, SetID: f.peers.ID})
			ex = append(ex, tail(s)...)
			rules = append(rules, append(ex, &expr.Verdict{Kind: expr.VerdictAccept}))
			if hashN > 0 {
				// An unknown peer: the jhash pick, then, once per
				// LearnInterval per peer, the packet goes to the NFLOG
				// group the learner reads (the seen set is checked,
				// then filled, then the packet logged).
				ex := head(s)
				ex = append(ex,
					&expr.Hash{SourceRegister: 1, DestRegister: 1, Length: alen, Modulus: uint32(hashN),
						Seed: effectiveSeed(seed), Type: expr.HashTypeJenkins},
					&expr.Lookup{SourceRegister: 1, DestRegister: 1, IsDestRegSet: true, SetName: n.hash.Name, SetID: n.hash.ID},
				)
				ex = append(ex, tail(s)...)
				ex = append(ex,
					&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: soff, Len: alen},
					&expr.Lookup{SourceRegister: 1, SetName: f.seen.Name, SetID: f.seen.ID, Invert: true},
					&expr.Dynset{SrcRegKey: 1, SetName: f.seen.Name, SetID: f.seen.ID, Operation: unix.NFT_DYNSET_OP_ADD},
					&expr.Log{Key: 1<<unix.NFTA_LOG_GROUP | 1<<unix.NFTA_LOG_SNAPLEN, Group: cfg.LogGroup, Snaplen: LogSnaplen},
				)
				rules = append(rules, ex)
			}
		}
		// One rule per subnet length of this family (lens is sorted
		// longest first): mask the destination to the length and look the
		// network up in that length's map. Subnets never overlap, so at
		// most one of these rules matches.
		for i, l := range lens {
			if l.v6 != f.v6 {
				continue
			}
			ex := []expr.Any{
				&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
				&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{nfproto}},
				&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: doff, Len: alen},
			}
			if l.bits < int(alen)*8 {
				ex = append(ex, &expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: alen,
					Mask: prefixMask(l), Xor: make([]byte, alen)})
			}
			rules = append(rules, append(ex,
				&expr.Lookup{SourceRegister: 1, DestRegister: 1, IsDestRegSet: true, SetName: subs[i].Name, SetID: subs[i].ID},
				&expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: 1},
			))
		}
	}
	// A new flow the classifier marked keeps the mark as its ct mark, so a
	// conntrack NEW event tells the director which node the kernel picked
	// for an unknown peer. Flows with other marks keep their ct mark.
	rules = append(rules, []expr.Any{
		&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(expr.CtStateBitNEW), Xor: binaryutil.NativeEndian.PutUint32(0)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(0)},
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 2, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(cfg.MarkMask &^ NodeBits), Xor: binaryutil.NativeEndian.PutUint32(0)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 2, Data: binaryutil.NativeEndian.PutUint32(cfg.MarkBase)},
		&expr.Ct{Key: expr.CtKeyMARK, SourceRegister: true, Register: 1},
	})
	return rules
}

// readNft dumps the table. A table with a missing set or chain, or with
// ranges that are not prefixes, is reported broken.
func readNft(c *nftables.Conn, cfg Config, elems func(*nftables.Set) ([]nftables.SetElement, error)) (*nftState, error) {
	s := newKstate().nft
	tables, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		return nil, fmt.Errorf("list tables: %w", err)
	}
	found := false
	for _, t := range tables {
		if t.Name == cfg.Table {
			found = true
		}
	}
	if !found {
		return &s, nil
	}
	s.table = true
	n := newNames(cfg.Table)
	sets, err := c.GetSets(n.table)
	if err != nil {
		return nil, fmt.Errorf("list sets: %w", err)
	}
	have := map[string]bool{}
	for _, st := range sets {
		have[st.Name] = true
		if l, ok := parsePlen(st.Name); ok {
			s.lens[l] = struct{}{}
		}
	}
	for _, name := range legacySets {
		if have[name] {
			s.broken = true
			return &s, nil
		}
	}
	for _, st := range n.allSets() {
		if !have[st.Name] {
			s.broken = true
			return &s, nil
		}
	}
	chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyINet)
	if err != nil {
		return nil, fmt.Errorf("list chains: %w", err)
	}
	hasChain := false
	for _, ch := range chains {
		if ch.Table.Name == cfg.Table && ch.Name == chainName {
			hasChain = true
		}
	}
	if !hasChain {
		s.broken = true
		return &s, nil
	}
	rules, err := c.GetRules(n.table, n.chain)
	if err != nil {
		return nil, fmt.Errorf("list rules of chain %s: %w", chainName, err)
	}
	s.sig = rulesSig(rules)
	for _, f := range n.fams {
		els, err := elems(f.vips)
		if err != nil {
			return nil, fmt.Errorf("list set %s: %w", f.vips.Name, err)
		}
		for _, e := range els {
			if a, ok := netip.AddrFromSlice(e.Key); ok {
				s.vips[a] = struct{}{}
			}
		}
		els, err = elems(f.peers)
		if err != nil {
			return nil, fmt.Errorf("list map %s: %w", f.peers.Name, err)
		}
		for _, e := range els {
			if a, ok := netip.AddrFromSlice(e.Key); ok {
				s.peers[a] = markOf(e.Val)
			}
		}
	}
	for _, l := range sortedLens(s.lens) {
		st := n.subnetSet(l)
		els, err := elems(st)
		if err != nil {
			return nil, fmt.Errorf("list map %s: %w", st.Name, err)
		}
		for _, e := range els {
			a, ok := netip.AddrFromSlice(e.Key)
			if !ok || a.Is6() != l.v6 {
				s.broken = true
				continue
			}
			p := netip.PrefixFrom(a, l.bits)
			if p.Masked() != p {
				// A key with host bits never matches a masked
				// destination: the map is not the director's.
				s.broken = true
				continue
			}
			s.subnets[p] = markOf(e.Val)
		}
	}
	els, err := elems(n.hash)
	if err != nil {
		return nil, fmt.Errorf("list map %s: %w", hashMapName, err)
	}
	for _, e := range els {
		if len(e.Key) == 4 {
			s.hash[binaryutil.NativeEndian.Uint32(e.Key)] = markOf(e.Val)
		}
	}
	return &s, nil
}

// rulesSig returns the signature every rule of the chain carries, or ""
// when a rule is missing, foreign or from another signature.
func rulesSig(rules []*nftables.Rule) string {
	sig := ""
	seen := map[int]bool{}
	total := -1
	for _, r := range rules {
		cm, ok := userdata.GetString(r.UserData, userdata.TypeComment)
		if !ok {
			return ""
		}
		parts := strings.Split(cm, "|")
		if len(parts) != 3 {
			return ""
		}
		i, err1 := strconv.Atoi(parts[1])
		t, err2 := strconv.Atoi(parts[2])
		if err1 != nil || err2 != nil || (sig != "" && parts[0] != sig) || (total >= 0 && t != total) || seen[i] {
			return ""
		}
		sig, total, seen[i] = parts[0], t, true
	}
	if total != len(rules) {
		return ""
	}
	return sig
}
